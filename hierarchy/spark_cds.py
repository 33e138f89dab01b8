"""Class-data sharing (AppCDS) for the driver JVM of local Spark sessions.

A Spark driver loads ~10k classes from 250 jars at start-up and again on its first job; with
a dynamic CDS archive (JDK 13+) the JVM maps them pre-parsed and pre-verified instead: on
2 cores a local session starts in ~1.4 s instead of ~2.4 s and its first Python job runs
~0.2 s sooner. That is paid by every command (ingest, train, predict, evaluate, curate) and
at 58 GB as at 1 GB.

    python -m hierarchy.spark_cds [--force] [section.key=value ...]

dumps the archive of ``spark.cds_archive`` (``make setup`` runs it; a no-op while the archive
matches this JVM and Spark). Sessions this process starts use it when it is there and still
matches; under spark-submit the JVM already runs and nothing changes (``--driver-java-options
-XX:SharedArchiveFile=...`` is the submitter's choice).

The JVM itself refuses an archive of another JVM build or class path (one warning line, then
a normal start), but it crashes on a truncated one: the dump goes to a temporary name and is
renamed only after the dumping JVM exited cleanly, and a sidecar file records what the
archive was made with (its size, the java binary, the Spark version) so that a session
never passes an archive that does not match it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

from hierarchy.contracts.config import load_config
from hierarchy.contracts.errors import UsageError
from hierarchy.contracts.settings import Settings

log = logging.getLogger(__name__)
_warned = set()


def _spark_version() -> str:
    from pyspark.version import __version__  # a constant; importlib.metadata costs ~70 ms

    return __version__


def archive_path(cfg: Settings) -> Optional[str]:
    """Where ``spark.cds_archive`` points: ``auto`` is beside this Python environment (a
    venv's, a packed cluster environment's), per Spark version; ``""`` turns CDS off."""
    value = cfg.spark.cds_archive
    if not value:
        return None
    if value == "auto":
        return os.path.join(sys.prefix, "share", "hierarchy", f"spark-{_spark_version()}.jsa")
    return os.path.abspath(os.path.expanduser(value))


def _java() -> Optional[str]:
    """The java binary Spark's launcher runs (bin/spark-class: $JAVA_HOME/bin/java, else the
    one on PATH)."""
    home = os.environ.get("JAVA_HOME")
    found = os.path.join(home, "bin", "java") if home else shutil.which("java")
    return os.path.realpath(found) if found and os.path.exists(found) else None


def _identity(archive: str) -> Optional[dict]:
    """What an archive is valid for, read from the file system (no JVM started)."""
    java = _java()
    if java is None or not os.path.exists(archive):
        return None
    jst, ast = os.stat(java), os.stat(archive)
    return {"spark": _spark_version(), "java": java, "java_mtime_ns": jst.st_mtime_ns,
            "java_size": jst.st_size, "archive_size": ast.st_size}


def _sidecar(archive: str) -> str:
    return archive + ".json"


def _matches(archive: str) -> Optional[bool]:
    """None: no archive; True: it was made by this JVM and Spark and is whole; False: stale."""
    now = _identity(archive)
    if now is None:
        return None
    try:
        with open(_sidecar(archive)) as fh:
            made = json.load(fh)
    except (OSError, ValueError):
        return False
    return made == now


def java_options(cfg: Settings, conf: dict) -> Optional[str]:
    """The ``-XX:SharedArchiveFile`` option for a session this process is about to start with
    the Spark ``conf``, or None: no archive, a stale one (warned once, with the fix), or a
    class path the archive was not made with (the JVM would refuse it with a warning)."""
    archive = archive_path(cfg)
    if archive is None or conf.get("spark.driver.extraClassPath"):
        return None
    state = _matches(archive)
    if state is None:
        return None
    if not state:
        if archive not in _warned:
            _warned.add(archive)
            log.warning("spark.cds_archive %s was made for another JVM or Spark, or is "
                        "incomplete: not used (rebuild it: python -m hierarchy.spark_cds, "
                        "which `make setup` runs)", archive)
        return None
    return f"-XX:SharedArchiveFile={archive}"


# What the dumping JVM runs: the kinds of work the pipeline's jobs do, so that their classes
# are in the archive (Hive catalog, Parquet read/write, Python RDD and Arrow jobs, a shuffle,
# a table). Run by spark-submit (the JVM exits, and dumps, only after it), in a scratch folder.
_WORKLOAD = '''
import os, sys
from pyspark.sql import SparkSession
scratch = sys.argv[1]
spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
         .config("spark.sql.shuffle.partitions", "2")
         .config("spark.sql.warehouse.dir", os.path.join(scratch, "warehouse"))
         .config("spark.hadoop.javax.jdo.option.ConnectionURL",
                 "jdbc:derby:;databaseName=" + os.path.join(scratch, "metastore") + ";create=true")
         .enableHiveSupport().getOrCreate())
sc = spark.sparkContext
assert sc.parallelize(range(100), 2).map(lambda x: x * 2).sum() == 9900
df = spark.createDataFrame([(i, i % 7, bytes([i % 256]) * 10) for i in range(1000)],
                           "id long, k int, b binary")
path = os.path.join(scratch, "parquet")
df.write.mode("overwrite").partitionBy("k").parquet(path)
back = spark.read.parquet(path)
assert back.groupBy("k").count().orderBy("k").count() == 7
assert back.mapInPandas(lambda it: (p[["id"]] for p in it), "id long").count() == 1000
assert back.mapInArrow(lambda it: (b.select(["id"]) for b in it), "id long").count() == 1000
back.join(df.select("id"), "id").write.mode("overwrite").saveAsTable("cds_workload")
spark.table("cds_workload").select("id", "k").write.mode("overwrite").option("header", True).csv(
    os.path.join(scratch, "csv"))
spark.sql("SHOW DATABASES").collect()
spark.stop()
'''


def build(cfg: Settings, force: bool = False) -> Optional[str]:
    """Dump the archive unless a matching one is there; returns its path (None: CDS off)."""
    archive = archive_path(cfg)
    if archive is None:
        return None
    if not force and _matches(archive):
        return archive
    if _java() is None:
        raise UsageError("no java found (JAVA_HOME, PATH): Spark needs Java 17")
    from pyspark.find_spark_home import _find_spark_home

    submit = os.path.join(_find_spark_home(), "bin", "spark-submit")
    os.makedirs(os.path.dirname(archive), exist_ok=True)
    with open(archive + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `make setup`s: one dumps, the other then checks
        if not force and _matches(archive):
            return archive
        _dump(submit, archive)
    return archive


def _dump(submit: str, archive: str) -> None:
    with tempfile.TemporaryDirectory(prefix="spark-cds-") as scratch:
        script = os.path.join(scratch, "workload.py")
        with open(script, "w") as fh:
            fh.write(_WORKLOAD)
        partial = os.path.join(os.path.dirname(archive), f".{os.path.basename(archive)}.part")
        env = {**os.environ, "PYSPARK_PYTHON": sys.executable,
               "PYSPARK_DRIVER_PYTHON": sys.executable}
        env.pop("PYSPARK_GATEWAY_PORT", None)
        done = subprocess.run(
            [submit, "--master", "local[2]",
             # the JVM's own "Pre JDK 6 class not supported" notes for generated classes
             "--driver-java-options", f"-XX:ArchiveClassesAtExit={partial} -Xlog:cds=error",
             script, scratch],
            cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0 or not os.path.exists(partial):
            if os.path.exists(partial):
                os.remove(partial)
            tail = "\n".join(done.stdout.strip().splitlines()[-15:])
            raise RuntimeError(f"the CDS dump of {archive} failed (exit {done.returncode}):\n"
                               f"{tail}")
    if os.path.exists(_sidecar(archive)):
        os.remove(_sidecar(archive))  # no moment where an old sidecar vouches for a new file
    os.replace(partial, archive)  # a new inode: JVMs that mapped the old archive keep it
    identity = _identity(archive)
    tmp = _sidecar(archive) + ".part"
    with open(tmp, "w") as fh:
        json.dump(identity, fh, indent=2)
    os.replace(tmp, _sidecar(archive))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hierarchy.spark_cds",
        description="Dump the driver JVM's class-data-sharing archive (spark.cds_archive).")
    parser.add_argument("--force", action="store_true", help="dump even if it matches")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--config", help="a YAML file merged over the default")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, overrides=args.overrides)
    try:
        fresh = not args.force and archive_path(cfg) and _matches(archive_path(cfg))
        path = build(cfg, force=args.force)
    except (UsageError, RuntimeError, OSError) as exc:
        print(f"spark_cds: {exc}", file=sys.stderr)
        return 1
    if path is None:
        print("spark.cds_archive is off")
    else:
        print(f"{path}: {'up to date' if fresh else 'dumped'} "
              f"({os.path.getsize(path) / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
