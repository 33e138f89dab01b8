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
    from hierarchy.config import load_config

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
