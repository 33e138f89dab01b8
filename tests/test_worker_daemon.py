"""The Python worker daemon (hierarchy/worker_daemon.py) our Spark sessions fork workers from."""

from __future__ import annotations

import importlib
import os
import sys
import zipfile
import zipimport

import pytest

from hierarchy import worker_daemon


def _zip(path, files: dict) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return str(path)


@pytest.fixture
def zip_check(monkeypatch):
    """The check installed on zipimporter for this test only; counts directory reads."""
    monkeypatch.setattr(zipimport.zipimporter, "invalidate_caches",
                        zipimport.zipimporter.invalidate_caches)
    monkeypatch.setattr(worker_daemon, "_STAMPS", {})
    reads = []
    original = zipimport._read_directory

    def counting(archive):
        reads.append(archive)
        return original(archive)

    monkeypatch.setattr(zipimport, "_read_directory", counting)
    worker_daemon.install_zip_cache_check()
    return reads


def test_an_unchanged_archive_is_not_reread_and_a_changed_one_is(tmp_path, monkeypatch,
                                                                 zip_check):
    archive = _zip(tmp_path / "pkgs.zip", {"zdmod_a.py": "VALUE = 1\n"})
    monkeypatch.syspath_prepend(archive)
    for name in ("zdmod_a", "zdmod_b"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert importlib.import_module("zdmod_a").VALUE == 1

    before = zip_check.count(archive)
    for _ in range(5):  # what PySpark's worker does before every task
        importlib.invalidate_caches()
    assert zip_check.count(archive) == before + 1  # once to stamp it, then never again

    # a rewritten archive (other size and inode) is read again: new modules are found
    os.remove(archive)
    _zip(archive, {"zdmod_a.py": "VALUE = 1\n", "zdmod_b.py": "VALUE = 'added later'\n"})
    importlib.invalidate_caches()
    assert importlib.import_module("zdmod_b").VALUE == "added later"


def test_installing_twice_wraps_the_original_once(monkeypatch, zip_check):
    first = zipimport.zipimporter.invalidate_caches
    worker_daemon.install_zip_cache_check()
    assert zipimport.zipimporter.invalidate_caches.__wrapped__ is first.__wrapped__


def test_installed_pyspark_is_preferred_only_at_the_same_version(tmp_path):
    spark_zip = _zip(tmp_path / "pyspark.zip",
                     {"pyspark/version.py": "__version__: str = '3.5.3'\n"})
    py4j = str(tmp_path / "py4j-0.10.9.7-src.zip")
    path = [spark_zip, py4j, "/site-packages"]
    assert worker_daemon.prefer_installed_pyspark(path, "3.5.3") == \
        [py4j, "/site-packages", spark_zip]
    # another version: the zip matches the JVM, the environment's copy may not
    assert worker_daemon.prefer_installed_pyspark(path, "3.5.1") == path
    assert worker_daemon.prefer_installed_pyspark(path, None) == path
    assert worker_daemon.prefer_installed_pyspark(["/site-packages"], "3.5.3") == \
        ["/site-packages"]
    (tmp_path / "other").mkdir()
    broken = _zip(tmp_path / "other" / "pyspark.zip", {})  # no version.py: kept as it is
    assert worker_daemon.prefer_installed_pyspark([broken, "/x"], "3.5.3") == [broken, "/x"]


def test_py4j_zip_is_moved_the_same_way(tmp_path):
    py4j = _zip(tmp_path / "py4j-0.10.9.7-src.zip",
                {"py4j/version.py": "__version__ = '0.10.9.7'\n"})
    spark_zip = str(tmp_path / "pyspark.zip")
    path = [spark_zip, py4j, "/site-packages"]
    assert worker_daemon.prefer_installed_pyspark(path, "0.10.9.7", "py4j") == \
        [spark_zip, "/site-packages", py4j]
    assert worker_daemon.prefer_installed_pyspark(path, "0.10.9.5", "py4j") == path


def test_installed_version_is_the_copy_an_import_would_load(tmp_path):
    for folder, version in (("first", "3.5.3"), ("second", "3.4.0")):
        (tmp_path / folder / "pyspark").mkdir(parents=True)
        (tmp_path / folder / "pyspark" / "version.py").write_text(
            f'__version__: str = "{version}"\n')
    archive = _zip(tmp_path / "pyspark.zip",
                   {"pyspark/version.py": "__version__: str = '9.9.9'\n"})
    path = [archive, str(tmp_path / "nothing"), str(tmp_path / "first"),
            str(tmp_path / "second")]
    assert worker_daemon._installed_version("pyspark", path) == "3.5.3"  # zips are skipped
    assert worker_daemon._installed_version("pyspark", path[3:]) == "3.4.0"
    assert worker_daemon._installed_version("py4j", path) is None
    import pyspark

    assert worker_daemon._installed_version("pyspark", sys.path) == pyspark.__version__


def test_archives_opened_before_the_fork_are_not_reread_after_it(tmp_path, monkeypatch,
                                                                  zip_check):
    archive = _zip(tmp_path / "early.zip", {"zdmod_c.py": "VALUE = 3\n"})
    monkeypatch.syspath_prepend(archive)
    monkeypatch.delitem(sys.modules, "zdmod_c", raising=False)
    assert importlib.import_module("zdmod_c").VALUE == 3  # the daemon's imports
    worker_daemon.stamp_open_archives()                   # then, before it forks
    before = zip_check.count(archive)
    importlib.invalidate_caches()                         # a worker's first task
    assert zip_check.count(archive) == before


def test_spark_workers_fork_from_the_daemon(spark):
    """The session's workers run with the check installed and pyspark from the environment
    (same version as the zip Spark puts on the path); tasks reuse the workers."""
    conf = spark.sparkContext.getConf()
    assert conf.get("spark.python.daemon.module") == "hierarchy.worker_daemon"
    sc = spark.sparkContext

    def _worker_state(_):  # nested: pickled by value, the workers cannot import tests/
        import os
        import zipimport

        import py4j
        import pyspark

        from hierarchy import worker_daemon as wd

        return (os.getpid(), pyspark.__file__ + py4j.__file__,
                hasattr(zipimport.zipimporter.invalidate_caches, "__wrapped__"),
                sorted(wd._STAMPS), os.environ.get("MALLOC_MMAP_THRESHOLD_"))

    states = sc.parallelize(range(8), 8).map(_worker_state).collect()
    for _pid, files, checked, stamped, mmap_threshold in states:
        assert checked
        # spark.conf's executorEnv reaches the workers: glibc reuses row-group buffers
        assert mmap_threshold == conf.get("spark.executorEnv.MALLOC_MMAP_THRESHOLD_") \
            == "67108864"
        assert ".zip" not in files, files
        # the zips on the worker's path were stamped by PySpark's per-task invalidation
        assert any(s.endswith(".zip") for s in stamped), stamped
    assert len({s[0] for s in states}) <= sc.defaultParallelism
