"""The Petastorm Unischema of ``images/``: what Petastorm readers (training, scoring) see."""

import json
import pickle
from typing import Dict

import numpy as np
import pyarrow.parquet as pq
from petastorm.codecs import ScalarCodec
from petastorm.unischema import Unischema, UnischemaField
from pyspark.sql.types import BinaryType, IntegerType, LongType, StringType

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



# ------------------------------------------------------------------------------ metadata
def read_row_groups(images_url: str) -> Dict[str, int]:
    """The row-group index of ``images/_common_metadata``; empty when there is none."""
    from petastorm.etl.dataset_metadata import ROW_GROUPS_PER_FILE_KEY

    from hierarchy import storage

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

    from hierarchy import storage
    from hierarchy.ingest.schema import IMAGES_FILE

    schema = IMAGES_FILE.with_metadata({
        UNISCHEMA_KEY: pickle.dumps(ImagesSchema),
        ROW_GROUPS_PER_FILE_KEY: json.dumps(dict(sorted(row_groups.items()))).encode(),
    })
    with storage.atomic_output(storage.join(images_url, "_common_metadata")) as (fs, tmp):
        pq.write_metadata(schema, tmp, filesystem=fs)


def part_row_groups(images_url: str, keys) -> Dict[str, int]:
    """Row-group counts read from the footers of the given part files (the fallback for a
    file the index does not know)."""
    from hierarchy import storage

    out = {}
    for key in keys:
        fs, path = storage.resolve(storage.join(images_url, key))
        with fs.open_input_file(path) as fh:
            out[key] = pq.read_metadata(fh).num_row_groups
    return out
