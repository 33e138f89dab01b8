"""Human-readable summary of an ingest run (what `hierarchy ingest` and `make demo` print)."""

from __future__ import annotations

from typing import List


def summary_lines(output: str, kind: str, entry: dict) -> List[str]:
    c, t = entry["counts"], entry["timings"]
    a = entry.get("append")
    # an append's speed is the dump's, not the kind's total
    mb = (sum(f["size"] for f in a["inputs"]) if a else c["input_bytes"]) / 1e6
    lines = [
        f"ingest {kind} -> {output}  ({entry['tasks']} tasks, {t['total_s']:.1f} s, "
        f"{mb / max(t['total_s'], 1e-9):.1f} MB/s)",
        f"  documents {c['documents']:,}  products {c['products']:,}  images {c['images']:,}  "
        f"({c['image_bytes'] / 1e6:.1f} MB of JPEG)",
    ]
    for split, n in c["per_split"].items():
        lines.append(f"  split {split:<5} products {n['products']:,}  images {n['images']:,}")
    bad = c["bad_documents"] + c["corrupt_regions"]
    lines.append(f"  unusable documents/regions {bad:,} ({entry['bad_fraction']:.2%})")
    for reason, n in c["quarantine"].items():
        lines.append(f"  quarantine {reason:<22} {n:,}")
    if a:
        what = f"snapshot {a['snapshot']}" if a["committed"] else \
            f"nothing committed (snapshot {a['snapshot']} stays current)"
        lines.append(f"  append: {a['added']:,} added, {a['replaced']:,} replaced, "
                     f"{a['unchanged']:,} unchanged, {a['quarantined']:,} quarantined -> {what}")
    return lines
