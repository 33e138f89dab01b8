"""The driver JVM's class-data-sharing archive (hierarchy/spark_cds.py): dumped for real by
spark-submit, used by a real session, and never passed to a JVM it does not match."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from hierarchy import spark_cds
from hierarchy.contracts.config import load_config
from hierarchy.spark import _merge_java_options, metastore_conf

SESSION = textwrap.dedent("""
    import sys
    from hierarchy.contracts.config import load_config
    from hierarchy.spark import get_spark, stop_spark

    spark = get_spark(load_config(None, sys.argv[1:]), "cds", catalog=False)
    print("options", spark.conf.get("spark.driver.extraJavaOptions", ""))
    print("sum", spark.sparkContext.parallelize(range(10), 2).sum())
    stop_spark(spark)
""")


def _session(cwd, *overrides):
    return subprocess.run([sys.executable, "-c", SESSION, "spark.master=local[2]", *overrides],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cds")
    cfg = load_config(None, [f"spark.cds_archive={folder / 'spark.jsa'}"])
    path = spark_cds.build(cfg)
    return cfg, path


def test_dumped_archive_is_mapped_by_a_session(dumped, tmp_path):
    cfg, path = dumped
    assert os.path.isfile(path)
    made = json.loads(open(path + ".json").read())
    assert made["archive_size"] == os.path.getsize(path) > 10e6
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".part")]
    assert spark_cds.build(cfg) == path  # up to date: nothing dumped again
    assert json.loads(open(path + ".json").read()) == made

    # -Xshare:on: the JVM refuses to start unless it maps the archive; the user's own option
    # and the archive's are both passed
    done = _session(tmp_path, f"spark.cds_archive={path}",
                    "spark.conf.spark.driver.extraJavaOptions=-Xshare:on")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == f"options -Xshare:on -XX:SharedArchiveFile={path}", lines
    assert lines[1] == "sum 45"


def test_truncated_archive_is_never_passed_to_the_jvm(dumped, tmp_path, caplog):
    # what a dump killed half-way would leave under the final name: the JVM dies of SIGBUS
    # mapping it, so the session must start without it
    _, path = dumped
    cut = tmp_path / "spark.jsa"
    with open(path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(1 << 20))
    shutil.copy(path + ".json", str(cut) + ".json")
    cfg = load_config(None, [f"spark.cds_archive={cut}"])
    with caplog.at_level(logging.WARNING, logger="hierarchy.spark_cds"):
        assert spark_cds.java_options(cfg, {}) is None
        assert spark_cds.java_options(cfg, {}) is None
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and str(cut) in warned[0] and "hierarchy.spark_cds" in warned[0]
    done = _session(tmp_path, f"spark.cds_archive={cut}")
    assert done.returncode == 0, done.stderr[-3000:]
    options, total = done.stdout.splitlines()
    assert "SharedArchiveFile" not in options and total == "sum 45"


def test_archive_of_another_jvm_is_not_used(dumped, tmp_path):
    _, path = dumped
    other = tmp_path / "spark.jsa"
    shutil.copy(path, other)
    made = json.loads(open(path + ".json").read())
    (tmp_path / "spark.jsa.json").write_text(json.dumps({**made, "java": "/opt/jdk-21/bin/java"}))
    cfg = load_config(None, [f"spark.cds_archive={other}"])
    assert spark_cds.java_options(cfg, {}) is None
    (tmp_path / "spark.jsa.json").write_text(json.dumps(made))
    assert spark_cds.java_options(cfg, {}) == f"-XX:SharedArchiveFile={other}"
    # a class path the archive was not dumped with: the JVM would refuse it with a warning
    assert spark_cds.java_options(cfg, {"spark.driver.extraClassPath": "/x.jar"}) is None


def test_missing_or_off():
    cfg = load_config(None, ["spark.cds_archive=/nonexistent/spark.jsa"])
    assert spark_cds.java_options(cfg, {}) is None
    assert spark_cds.archive_path(load_config(None, ["spark.cds_archive="])) is None
    auto = spark_cds.archive_path(load_config(None, []))
    assert auto.startswith(sys.prefix) and auto.endswith(".jsa")


def test_java_options_add_up(tmp_path):
    catalog = load_config(None, [f"catalog.metastore={tmp_path / 'metastore_db'}"]).catalog
    derby = metastore_conf(catalog)
    conf = _merge_java_options(derby, {"spark.driver.extraJavaOptions": "-Dx=1",
                                       "spark.sql.shuffle.partitions": "8"})
    conf = _merge_java_options(conf, {"spark.driver.extraJavaOptions":
                                      "-XX:SharedArchiveFile=/a.jsa"})
    assert conf["spark.driver.extraJavaOptions"] == (
        f"-Dderby.system.home={tmp_path} -Dx=1 -XX:SharedArchiveFile=/a.jsa")
    assert conf["spark.sql.shuffle.partitions"] == "8"
    assert _merge_java_options({"a": "b"}, {}) == {"a": "b"}
