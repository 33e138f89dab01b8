"""Schemas of the ingest outputs: the Petastorm ``images`` Unischema and the plain Parquet
``products`` and ``quarantine`` tables (DESIGN.md, "Ingest output")."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from petastorm.codecs import ScalarCodec
from petastorm.unischema import Unischema, UnischemaField
from pyspark.sql.types import BinaryType, IntegerType, LongType, StringType

SPLITS = ("train", "val", "test")
KINDS = ("train", "test")

# `split` is the Hive partition column (images/split=train/...): it is in the Unischema so
# readers can select and filter on it, and not stored inside the files.
ImagesSchema = Unischema("CdiscountImages", [
    UnischemaField("product_id", np.int64, (), ScalarCodec(LongType()), False),
    UnischemaField("img_idx", np.int32, (), ScalarCodec(IntegerType()), False),
    UnischemaField("category_id", np.int64, (), ScalarCodec(LongType()), True),
    UnischemaField("l1", np.int32, (), ScalarCodec(IntegerType()), True),
    UnischemaField("l2", np.int32, (), ScalarCodec(IntegerType()), True),
    UnischemaField("l3", np.int32, (), ScalarCodec(IntegerType()), True),
    UnischemaField("split", np.str_, (), ScalarCodec(StringType()), False),
    UnischemaField("nbytes", np.int32, (), ScalarCodec(IntegerType()), False),
    UnischemaField("md5", np.str_, (), ScalarCodec(StringType()), False),
    # The source JPEG, byte for byte: training decodes it in TensorFlow, nothing re-encodes.
    UnischemaField("jpeg", np.bytes_, (), ScalarCodec(BinaryType()), False),
])

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
