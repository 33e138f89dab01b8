"""The Petastorm Unischema of ``images/``: what Petastorm readers (training, scoring) see."""

import numpy as np
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

