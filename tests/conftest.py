import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT.parent / "shared" / "data" / "cdiscount"

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# the project data root of every config the tests load, their subprocesses included: never
# the user's ~/hierarchy (its Derby metastore admits one process at a time)
os.environ["HIERARCHY_HOME"] = tempfile.mkdtemp(prefix="hierarchy-home-")


def real_file(name: str) -> Path:
    path = REAL / name
    if not path.exists():
        pytest.skip(f"official sample {path} not present (the project never ships it)")
    return path


@pytest.fixture(scope="session")
def real_bson() -> Path:
    return real_file("train_example.bson")


@pytest.fixture(scope="session")
def real_categories() -> Path:
    return real_file("category_names.csv")


@pytest.fixture(scope="session")
def cfg(tmp_path_factory):
    from hierarchy.contracts.config import load_config

    # the test session's own metastore: Derby lets one JVM at a time open a database
    wh = tmp_path_factory.mktemp("warehouse")
    return load_config(overrides=["spark.master=local[2]", "ingest.progress=false",
                                  f"catalog.warehouse={wh}",
                                  f"catalog.metastore={wh / 'metastore_db'}"])


@pytest.fixture(scope="session")
def spark(cfg):
    from hierarchy.spark import get_spark

    session = get_spark(cfg, "tests")
    yield session
    session.stop()


def ingested_synth(spark, root: Path, products: int, seed: int, test_products: int,
                   overrides=()) -> str:
    """A small `small`-taxonomy catalog generated under ``root/synth`` and its train dump
    ingested into ``root/ds`` (returned) with local[2] and ``ingest.*`` overrides."""
    from hierarchy.contracts.config import load_config
    from hierarchy.ingest.pipeline import run_ingest
    from hierarchy.synth import generate

    generate(str(root / "synth"), products=products, seed=seed, taxonomy="small",
             test_products=test_products, workers=1, progress=False)
    cfg = load_config(overrides=["spark.master=local[2]", "ingest.progress=false",
                                 *(f"ingest.{o}" for o in overrides)])
    out = str(root / "ds")
    run_ingest(spark, cfg, [str(root / "synth" / "train.bson")],
               str(root / "synth" / "category_names.csv"), out, "train")
    return out


@pytest.fixture
def fresh_keras():
    """Keras' global session and dtype policy reset around a test (mixed precision is global)."""
    import tensorflow as tf

    tf.keras.backend.clear_session()
    tf.keras.mixed_precision.set_global_policy("float32")
    yield
    tf.keras.mixed_precision.set_global_policy("float32")
    tf.keras.backend.clear_session()
