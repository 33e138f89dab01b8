"""The dataset's schemas (DESIGN.md, "Ingest output"): the Parquet schema of each table, the
Petastorm Unischema of ``images/`` (what Petastorm readers, training and scoring, see) and
the ``images/_common_metadata`` file that carries it.

The Unischema is built on first use: importing petastorm and pyspark costs every Spark
worker half a second, and only the commit and the readers need it."""

from __future__ import annotations

import functools
import json
import pickle
from typing import Dict

import pyarrow as pa
import pyarrow.parquet as pq

from hierarchy.contracts import storage

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


@functools.cache
def images_unischema():
    """The Petastorm Unischema of ``images/``. ``split`` is the Hive partition column
    (images/split=train/...): it is in the Unischema so readers can select and filter on it,
    and not stored inside the files."""
    import numpy as np
    from petastorm.codecs import ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField
    from pyspark.sql.types import BinaryType, IntegerType, LongType, StringType

    return Unischema("CdiscountImages", [
        UnischemaField("product_id", np.int64, (), ScalarCodec(LongType()), False),
        UnischemaField("img_idx", np.int32, (), ScalarCodec(IntegerType()), False),
        UnischemaField("category_id", np.int64, (), ScalarCodec(LongType()), True),
        UnischemaField("l1", np.int32, (), ScalarCodec(IntegerType()), True),
        UnischemaField("l2", np.int32, (), ScalarCodec(IntegerType()), True),
        UnischemaField("l3", np.int32, (), ScalarCodec(IntegerType()), True),
        UnischemaField("split", np.str_, (), ScalarCodec(StringType()), False),
        UnischemaField("nbytes", np.int32, (), ScalarCodec(IntegerType()), False),
        UnischemaField("md5", np.str_, (), ScalarCodec(StringType()), False),
        # The source JPEG, byte for byte: training decodes it in TensorFlow, nothing
        # re-encodes.
        UnischemaField("jpeg", np.bytes_, (), ScalarCodec(BinaryType()), False),
    ])


# ------------------------------------------------------------------------------ metadata
def read_row_groups(images_url: str) -> Dict[str, int]:
    """The row-group index of ``images/_common_metadata``; empty when there is none."""
    from petastorm.etl.dataset_metadata import ROW_GROUPS_PER_FILE_KEY

    url = storage.join(images_url, "_common_metadata")
    if not storage.exists(url):
        return {}
    fs, path = storage.resolve(url)
    with fs.open_input_file(path) as fh:
        meta = pq.read_metadata(fh).metadata or {}
    raw = meta.get(ROW_GROUPS_PER_FILE_KEY)
    return json.loads(raw) if raw else {}


def write_metadata(images_url: str, row_groups: Dict[str, int]) -> None:
    """``images/_common_metadata`` as petastorm's ``materialize_dataset`` leaves it (the
    pickled Unischema and the row-group count of every part file), from counts the writers
    already know. materialize_dataset gets them from a Spark job that opens every part's
    footer (~2-3 s of a 1 GB ingest, and one footer per file at 58 GB); its readers only
    need this one file. ``row_groups`` must name every part file under images/: petastorm
    fails on a file the index does not list."""
    from petastorm.etl.dataset_metadata import ROW_GROUPS_PER_FILE_KEY, UNISCHEMA_KEY

    schema = IMAGES_FILE.with_metadata({
        UNISCHEMA_KEY: pickle.dumps(images_unischema()),
        ROW_GROUPS_PER_FILE_KEY: json.dumps(dict(sorted(row_groups.items()))).encode(),
    })
    with storage.atomic_output(storage.join(images_url, "_common_metadata")) as (fs, tmp):
        pq.write_metadata(schema, tmp, filesystem=fs)


def part_row_groups(images_url: str, keys) -> Dict[str, int]:
    """Row-group counts read from the footers of the given part files (the fallback for a
    file the index does not know)."""
    out = {}
    for key in keys:
        fs, path = storage.resolve(storage.join(images_url, key))
        with fs.open_input_file(path) as fh:
            out[key] = pq.read_metadata(fh).num_row_groups
    return out
