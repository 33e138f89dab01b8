"""A digest of what `make demo` produced, to tell two versions of the code apart by their
outputs, not their logs: `python tools/demo_digest.py data/demo` prints one line per output
(the dataset's counts, the submission, every predictions partition, the evaluation's metrics,
the curation table) with a hash of its content. Clocks (timings, scoring and curation times,
paths of temporary folders) are left out; everything a user reads is in.

Compare two trees: run `make demo` in each (or `make demo DEMO=...`), then diff the digests.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pandas as pd

# what changes from one run to the next whatever the code: clocks and durations
CLOCK_KEYS = {"timings", "seconds", "started", "finished", "updated", "scored_at", "curated_at",
              "phases", "phases_s", "created", "mtime", "run_seconds", "log", "generated_at"}


ROOT = [""]  # the demo folder's absolute path: two trees put their outputs in two places


def _clean(value):
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in sorted(value.items()) if k not in CLOCK_KEYS}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, str) and ROOT[0]:
        return value.replace(ROOT[0], "<demo>")
    return value


def _hash(obj) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _frame(path: Path, sort: list) -> pd.DataFrame:
    df = pd.read_parquet(path)
    df = df[[c for c in df.columns if c not in CLOCK_KEYS]]
    return df.sort_values(sort).reset_index(drop=True)


def _frame_hash(df: pd.DataFrame) -> str:
    rows = df.astype(str).to_dict("records")
    return _hash(rows)


def digest(demo: Path) -> list:
    out = []
    ROOT[0] = str(demo.resolve())
    manifest = json.loads((demo / "dataset" / "manifest.json").read_text())
    out.append(("manifest counts", _hash(_clean({k: v.get("counts") for k, v in
                                                 manifest["kinds"].items()}))))
    sub = (demo / "output" / "submission.csv").read_text()
    out.append((f"submission.csv ({sub.count(chr(10)) - 1} rows)", _hash(sub)))
    table = demo / "warehouse" / "predictions"
    for part in sorted(table.glob("run_id=*/split=*/strategy=*")):
        df = _frame(part, ["product_id"])
        out.append((f"predictions {part.relative_to(table)} ({len(df)} rows)", _frame_hash(df)))
    report = demo / "output" / "evaluation" / "demo" / "report.json"
    metrics = _clean(json.loads(report.read_text()))
    for key in sorted(metrics):
        out.append((f"report.json {key}", _hash(metrics[key])))
    curation = _frame(demo / "dataset" / "curation", ["product_id", "img_idx"])
    out.append((f"curation ({len(curation)} rows)", _frame_hash(curation)))
    return out


if __name__ == "__main__":
    for name, h in digest(Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo")):
        print(f"{h}  {name}")
