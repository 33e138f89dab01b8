"""The curation report: ``report.md``, ``summary.json`` and PNG contact sheets of the largest
groups, the placeholders and the conflicts, drawn from the review queue (a bounded sample:
``curate.review_max_groups`` x ``curate.review_pictures`` pictures at most)."""

from __future__ import annotations

import io
from typing import Dict, List

from hierarchy.contracts import storage
from hierarchy.contracts.curation import FLAGS

THUMB = 96


def _read(path: str):
    return storage.read_parquet(path) if storage.exists(path) else None


def contact_sheet(groups: List[dict], pictures: Dict[str, List[dict]], title: str,
                  per_row: int = 8):
    """One row per group: its label, then up to ``per_row`` thumbnails (decoded for display
    only; the dataset's bytes are untouched)."""
    from PIL import Image, ImageDraw

    label_w, pad = 260, 6
    height = 28 + len(groups) * (THUMB + pad)
    sheet = Image.new("RGB", (label_w + per_row * (THUMB + pad), max(height, 60)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), title, fill=(0, 0, 0))
    for row, group in enumerate(groups):
        y = 28 + row * (THUMB + pad)
        text = (f"{group['review_group']}\n{group['pictures']} pictures, "
                f"{group['products']} products\n{group['categories']} categories\n"
                + ", ".join(group["flags"]))
        draw.multiline_text((pad, y + 4), text, fill=(40, 40, 40), spacing=3)
        for col, pic in enumerate(pictures.get(group["review_group"], [])[:per_row]):
            with Image.open(io.BytesIO(pic["jpeg"])) as im:
                im.draft("RGB", (THUMB, THUMB))
                thumb = im.convert("RGB").resize((THUMB, THUMB))
            sheet.paste(thumb, (label_w + col * (THUMB + pad), y))
    return sheet


def write_report(report_dir: str, summary: dict, sheet_groups: int = 8) -> str:
    groups_t = _read(storage.join(report_dir, "review", "groups"))
    pics_t = _read(storage.join(report_dir, "review", "pictures"))
    groups = groups_t.to_pylist() if groups_t is not None else []
    pictures: Dict[str, List[dict]] = {}
    for pic in (pics_t.to_pylist() if pics_t is not None else []):
        pictures.setdefault(pic["review_group"], []).append(pic)
    for v in pictures.values():
        v.sort(key=lambda p: (p["product_id"], p["img_idx"]))
    sheets = {
        "largest_groups.png": ("largest groups", sorted(
            [g for g in groups if g["pictures"] > 1], key=lambda g: -g["pictures"])),
        "placeholders.png": ("placeholders", [g for g in groups if "placeholder" in g["flags"]]),
        "conflicts.png": ("conflicting labels",
                          [g for g in groups if "conflicting_labels" in g["flags"]]),
    }
    written = []
    for name, (title, chosen) in sheets.items():
        if not chosen:
            continue
        image = contact_sheet(chosen[:sheet_groups], pictures, f"{title} ({len(chosen)} in "
                                                              f"the review queue)")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        storage.write_bytes_atomic(storage.join(report_dir, name), buf.getvalue())
        written.append(name)
    c, g = summary["counts"], summary["grouping"]
    lines = [
        "# Curation report", "",
        f"Dataset `{summary['data']}`: {c['pictures']} pictures, {c['flagged']} flagged, "
        f"{c['groups']} groups of two or more, {c['undecodable']} that do not decode, "
        f"{c['reviewed']} with a review decision.", "",
        "| flag | pictures |", "|---|---|",
        *[f"| {f} | {c[f]} |" for f in FLAGS], "",
        "## Near-duplicate search", "",
        f"Hash: {summary['hash_algorithm']}. Distance <= {summary['config']['near_distance']} "
        f"bits; {g['tables']} band tables of {g['key_bits']}-bit keys over "
        f"{g['distinct_hashes']} distinct hashes.", "",
        f"- comparisons made: {g['comparisons']} (all pairs would be {g['all_pairs']}: "
        f"{g['comparisons'] / max(g['all_pairs'], 1):.2e} of them)",
        f"- largest bucket: {g['largest_bucket']} hashes; edges found: {g['edges']}; "
        f"connected-components rounds: {g['rounds']}", "",
        "## Time", "",
        *[f"- {k}: {v} s" for k, v in summary["seconds"].items()], "",
        "## Review queue (most urgent first)", "",
        "| group | pictures | products | categories | flags | reason |",
        "|---|---|---|---|---|---|",
        *[f"| {x['review_group']} | {x['pictures']} | {x['products']} | {x['categories']} | "
          f"{', '.join(x['flags'])} | {x['reason'] or ''} |" for x in groups[:30]], "",
        *[f"![{name}]({name})" for name in written],
    ]
    path = storage.join(report_dir, "report.md")
    storage.write_text_atomic(path, "\n".join(lines) + "\n")
    storage.write_json_atomic(storage.join(report_dir, "summary.json"), summary)
    return path
