"""Parquet schemas of the ingest outputs (DESIGN.md, "Ingest output"); the Petastorm
Unischema of ``images`` is in :mod:`hierarchy.ingest.unischema` (importing petastorm costs
every Spark worker half a second, and only the commit needs it)."""

from __future__ import annotations

import pyarrow as pa

# What a file under images/split=*/ holds (the partition column lives in the path).
IMAGES_FILE = pa.schema([
    pa.field("product_id", pa.int64(), nullable=False),
    pa.field("img_idx", pa.int32(), nullable=False),
    pa.field("category_id", pa.int64()),
    pa.field("l1", pa.int32()),
    pa.field("l2", pa.int32()),
    pa.field("l3", pa.int32()),
    pa.field("nbytes", pa.int32(), nullable=False),
    pa.field("md5", pa.string(), nullable=False),
    pa.field("jpeg", pa.binary(), nullable=False),
])

# One row per usable product (partitioned by ingest kind: products/kind=train/...).
# Test products are kept even with no usable picture: the submission needs a row for each.
PRODUCTS_FILE = pa.schema([
    pa.field("product_id", pa.int64(), nullable=False),
    pa.field("category_id", pa.int64()),
    pa.field("l1", pa.int32()),
    pa.field("l2", pa.int32()),
    pa.field("l3", pa.int32()),
    pa.field("split", pa.string(), nullable=False),
    pa.field("n_images", pa.int32(), nullable=False),
    pa.field("n_bad_images", pa.int32(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("length", pa.int64(), nullable=False),
])

# Everything that could not be used, document or picture (quarantine/kind=train/...).
QUARANTINE_FILE = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("length", pa.int64(), nullable=False),
    pa.field("product_id", pa.int64()),
    pa.field("img_idx", pa.int32()),
    pa.field("level", pa.string(), nullable=False),   # region | document | image
    pa.field("reason", pa.string(), nullable=False),  # stable code, counted in the manifest
    pa.field("detail", pa.string(), nullable=False),  # what exactly was wrong, for a human
])


def images_key(split: str, part: str) -> str:
    """A part file's key in Petastorm's row-group index: its path relative to ``images/``."""
    return f"split={split}/{part}"
