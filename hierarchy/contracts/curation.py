"""The curation contract: the ``curation`` and ``reviews`` tables of a dataset, and what
training reads from them.

```
<data>/curation/split=train|val|test/part-*.parquet   one row per picture: hash, stats, flags
<data>/reviews/part-<time>-<id>.parquet               review decisions, append-only
<data>/curation_report/                               report.md, *.png, summary.json, review/
<data>/curation_hashes/part-*.parquet                 each distinct picture's hash, by MD5
```

Both are registered in the Spark catalog (``catalog.curation_table``, ``catalog.reviews_table``)
as external tables over these folders. ``curate`` rewrites ``curation/`` whole (a re-run
replaces its own output); the review page only ever adds a file to ``reviews/``, one per
submitted decision, so two reviewers never overwrite each other. The latest decision about a
picture wins.

Training (:class:`Exclusion`) reads the flags and the reviews with pyarrow, a few columns per
file, on each worker — never the pictures, never through the driver.

``curation_hashes/`` is curate's own memory: the perceptual hash and statistics of every
distinct picture (by its MD5, with the hash algorithm and version that made them), so a
later curate decodes only pictures it has never seen.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from hierarchy.contracts import storage
from hierarchy.contracts.dataset import Dataset

CURATION, REVIEWS, REPORT, HASHES = "curation", "reviews", "curation_report", "curation_hashes"
FLAGS = ("blank", "placeholder", "duplicate", "near_duplicate", "conflicting_labels", "leakage")
DECISIONS = ("keep", "drop", "relabel")
KEY_BITS = 16  # a picture's key: product_id << 16 | img_idx (Cdiscount products hold <= 4)

REVIEWS_SCHEMA = pa.schema([
    pa.field("review_id", pa.string(), nullable=False),
    pa.field("target", pa.string(), nullable=False),       # group | picture: what was clicked
    pa.field("group_id", pa.string()),
    pa.field("product_id", pa.int64(), nullable=False),
    pa.field("img_idx", pa.int32(), nullable=False),
    pa.field("decision", pa.string(), nullable=False),     # keep | drop | relabel
    pa.field("category_id", pa.int64()),                   # relabel: the right category
    pa.field("reviewer", pa.string(), nullable=False),
    pa.field("decided_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("note", pa.string()),
])


def curation_path(data: str, split: Optional[str] = None) -> str:
    return Dataset(data).path(CURATION, *([f"split={split}"] if split else []))


def reviews_path(data: str) -> str:
    return Dataset(data).path(REVIEWS)


def report_path(data: str) -> str:
    return Dataset(data).path(REPORT)


def hashes_path(data: str) -> str:
    return Dataset(data).path(HASHES)


def has_curation(data: str) -> bool:
    """Whether ``curate`` wrote the dataset's table (some split=*/ folder with a part file)."""
    return any(not is_file and name.startswith("split=") and storage.list_files(loc, ".parquet")
               for name, loc, is_file in storage.list_dir(curation_path(data)))


def picture_key(product_id, img_idx):
    """int64 key of (product_id, img_idx), vectorised over numpy arrays."""
    return (np.asarray(product_id, dtype=np.int64) << KEY_BITS) | np.asarray(img_idx, np.int64)


# ---------------------------------------------------------------------------- reviews
def append_reviews(data: str, rows: Sequence[dict]) -> str:
    """Write one decision file (all of ``rows``, stamped now) into ``reviews/``; returns it."""
    now = dt.datetime.now(dt.UTC)
    review_id = uuid.uuid4().hex
    table = pa.Table.from_pylist([{
        "review_id": review_id, "target": r["target"], "group_id": r.get("group_id"),
        "product_id": int(r["product_id"]), "img_idx": int(r["img_idx"]),
        "decision": r["decision"], "category_id": r.get("category_id"),
        "reviewer": r["reviewer"], "decided_at": now, "note": r.get("note")} for r in rows],
        schema=REVIEWS_SCHEMA)
    import pyarrow.parquet as pq

    folder = reviews_path(data)
    storage.make_dir(folder)
    path = storage.join(folder, f"part-{now:%Y%m%dT%H%M%S%f}-{review_id[:12]}.parquet")
    out = storage.atomic_output(path)
    pq.write_table(table, out.tmp, filesystem=out.fs)
    out.commit()
    return path


def read_reviews(data: str) -> pa.Table:
    """Every decision, oldest first (empty table when nobody reviewed anything)."""
    tables = [storage.read_parquet(path, schema=REVIEWS_SCHEMA)
              for path in storage.list_files(reviews_path(data), ".parquet")]
    if not tables:
        return REVIEWS_SCHEMA.empty_table()
    return pa.concat_tables(tables).sort_by([("decided_at", "ascending"),
                                             ("review_id", "ascending")])


def latest_reviews(data: str) -> Dict[int, dict]:
    """{picture key: its latest decision row} (a later decision replaces an earlier one)."""
    out: Dict[int, dict] = {}
    for row in read_reviews(data).to_pylist():
        out[int(picture_key(row["product_id"], row["img_idx"]))] = row
    return out


# ---------------------------------------------------------------------------- training
class Exclusion:
    """What training leaves out of one dataset, and the labels reviewers corrected.

    A picture is left out when a reviewer dropped it; or when it carries one of ``flags``
    (``train.exclude``) and no reviewer said keep. A validation picture is also left out when
    its duplicate group reaches into train (``leakage``): the group stays on the train side,
    and validation measures pictures the model has not seen. ``relabel`` decisions give a
    picture a new category (:attr:`relabels`, by category id)."""

    def __init__(self, data: str, flags: Iterable[str] = ()):
        self.data, self.flags = data, tuple(flags)
        unknown = [f for f in self.flags if f not in FLAGS]
        if unknown:
            raise ValueError(f"train.exclude: unknown flag(s) {unknown}; one of {', '.join(FLAGS)}")
        self.curated = has_curation(data)
        reviews = latest_reviews(data)
        self.relabels: Dict[int, int] = {k: int(r["category_id"]) for k, r in reviews.items()
                                         if r["decision"] == "relabel" and r["category_id"]}
        dropped = np.array(sorted(k for k, r in reviews.items() if r["decision"] == "drop"),
                           np.int64)
        kept = np.array(sorted(k for k, r in reviews.items() if r["decision"] == "keep"),
                        np.int64)
        self._keys: Dict[str, np.ndarray] = {}
        self._l1: Dict[str, np.ndarray] = {}
        self.reasons: Dict[str, Dict[str, int]] = {}
        columns = ["product_id", "img_idx", "l1", *sorted(set(self.flags) | {"leakage"})]
        for split in ("train", "val"):
            keys: List[np.ndarray] = []
            l1s: List[np.ndarray] = []
            reasons = {"review_drop": 0, **{f: 0 for f in self.flags}, "leakage": 0}
            files = storage.list_files(curation_path(data, split), ".parquet") \
                if self.curated else []
            for path in files:
                t = storage.read_parquet(path, columns=columns)
                key = picture_key(t.column("product_id").to_numpy(),
                                  t.column("img_idx").to_numpy())
                was_dropped = np.isin(key, dropped)
                was_kept = np.isin(key, kept)
                out = was_dropped.copy()
                reasons["review_drop"] += int(was_dropped.sum())
                for flag in self.flags:
                    hit = t.column(flag).to_numpy(zero_copy_only=False) & ~was_kept & ~out
                    reasons[flag] += int(hit.sum())
                    out |= hit
                if split == "val":
                    hit = t.column("leakage").to_numpy(zero_copy_only=False) & ~out
                    reasons["leakage"] += int(hit.sum())
                    out |= hit
                keys.append(key[out])
                l1s.append(t.column("l1").to_numpy(zero_copy_only=False)[out])
            order = np.argsort(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
            self._keys[split] = np.concatenate(keys)[order] if keys else np.zeros(0, np.int64)
            self._l1[split] = np.concatenate(l1s)[order] if l1s else np.zeros(0, np.int64)
            self.reasons[split] = reasons
        # a reviewer's drop counts even for a picture the last curate did not see flagged
        self._dropped_uncurated = dropped

    def keys(self, split: str) -> np.ndarray:
        """Sorted int64 keys (:func:`picture_key`) of the split's pictures left out."""
        return np.union1d(self._keys.get(split, np.zeros(0, np.int64)), self._dropped_uncurated)

    def count(self, split: str, branch: Optional[int] = None) -> int:
        """Pictures of the split (or of one level-1 branch in it) the curation table leaves
        out (the drops of pictures it does not list cannot be counted per split)."""
        l1 = self._l1.get(split, np.zeros(0))
        return int(len(l1) if branch is None else np.count_nonzero(l1 == branch))

    @property
    def active(self) -> bool:
        return bool(any(len(k) for k in self._keys.values()) or self.relabels
                    or len(self._dropped_uncurated))

    def summary(self) -> dict:
        return {"curated": self.curated, "exclude": list(self.flags),
                "left_out": {s: self.count(s) for s in ("train", "val")},
                "reasons": self.reasons, "relabelled": len(self.relabels)}
