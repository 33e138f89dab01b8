"""The command shapes schedulers call: `hierarchy synth`, `spark-submit jobs/ingest.py`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hierarchy.cli import main

ROOT = Path(__file__).resolve().parent.parent
SPARK_SUBMIT = Path(sys.executable).parent / "spark-submit"

pytestmark = pytest.mark.spark


def spark_submit(*args, tmp_path):
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable}
    return subprocess.run(
        [str(SPARK_SUBMIT), "--master", "local[2]", str(ROOT / "jobs" / "ingest.py"), *args,
         "ingest.progress=false"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--output", str(out), "--products", "40", "--seed", "5",
                 "--test-products", "10", "ingest.progress=false"]) == 0
    return out


def test_synth_command_writes_the_three_files(catalog):
    assert {p.name for p in catalog.iterdir()} == {"train.bson", "test.bson",
                                                    "category_names.csv", "test_solution.csv"}


def test_spark_submit_ingest_job(catalog, tmp_path):
    out = tmp_path / "ds"
    r = spark_submit("--input", str(catalog / "train.bson"), "--categories",
                     str(catalog / "category_names.csv"), "--output", str(out),
                     tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "products 40" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kinds"]["train"]["status"] == "complete"


def test_spark_submit_refuses_bad_input_with_exit_code_3(catalog, tmp_path):
    bad = tmp_path / "bad.bson"
    data = (catalog / "train.bson").read_bytes()
    bad.write_bytes(data[: len(data) // 3] + b"\x00" * 5000 + data[len(data) // 3 + 5000:])
    r = spark_submit("--input", str(bad), "--categories", str(catalog / "category_names.csv"),
                     "--output", str(tmp_path / "ds"), tmp_path=tmp_path)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "above ingest.max_bad_fraction=0.01" in r.stdout + r.stderr
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_spark_and_python_chatter_goes_to_the_jobs_log_file_unless_verbose(catalog, tmp_path):
    """A job's console holds its own lines; Spark's log4j warnings (the loopback host name,
    Hive's configuration notes) land in the log file the summary line names. -v prints them."""
    hierarchy = Path(sys.executable).parent / "hierarchy"
    logs = tmp_path / "logs"

    def ingest(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(hierarchy), "ingest", "--input", str(catalog / "train.bson"), "--categories",
             str(catalog / "category_names.csv"), "--output", str(tmp_path / "ds"),
             "ingest.progress=false", "spark.master=local[1]", f"spark.log_dir={logs}",
             *extra], capture_output=True, text=True, timeout=300)

    quiet = ingest()
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert not [line for line in quiet.stderr.splitlines()
                if " WARN " in line or "log4j" in line or "setLogLevel" in line], quiet.stderr
    log = Path(json.loads(quiet.stdout.strip().splitlines()[-1])["log"])
    assert log.parent == logs and log.name.startswith("ingest-")
    assert " WARN " in log.read_text()  # Spark's notes are kept, in the file
    loud = ingest("-v")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert " WARN " in loud.stderr and "log" not in json.loads(
        loud.stdout.strip().splitlines()[-1])
