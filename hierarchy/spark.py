"""SparkSession from the config, and running a job with a progress bar on the driver."""

from __future__ import annotations

import atexit
import fcntl
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from hierarchy import joblog, spark_cds
from hierarchy.contracts import storage
from hierarchy.contracts.errors import Refused, UsageError
from hierarchy.contracts.settings import Catalog, Settings


# ------------------------------------------------------------------ SQL text
# Names and locations reach Spark SQL as text: every statement the pipeline builds quotes
# them here (a dataset folder may hold a quote, a space or any letter)
def sql_literal(value: str) -> str:
    """A Spark SQL string literal (backslash escapes are Spark's default)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def sql_name(*parts: str) -> str:
    """``db.table`` as a quoted identifier (each part in backticks, backticks doubled)."""
    return ".".join("`" + str(p).replace("`", "``") + "`" for p in parts)


def launched_by_spark_submit() -> bool:
    """True in a driver that spark-submit started: its JVM is already running, with the
    master and resources the submitter chose. (``SparkConf()`` cannot tell before a context
    exists: without a JVM it is an empty Python dict, so it used to say "no master" and the
    config's local[*] silently replaced spark-submit's --master.)"""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def get_spark(cfg: Settings, app_suffix: str = "", extra_conf: Optional[dict] = None,
              catalog: bool = True, hold_metastore: bool = False):
    """The session spark-submit already configured, or a local one from ``cfg.spark``;
    ``catalog=False`` for a job that registers no table (no Hive metastore is opened);
    ``hold_metastore`` for one that writes tables: an embedded Derby metastore is opened at
    once and held (see :func:`refuse_busy_derby`).

    Executors must run this interpreter (same numpy/pyarrow/TF), so PYSPARK_PYTHON defaults
    to it for local runs; under spark-submit on a cluster the submitter's setting wins."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    spark_cfg = cfg.spark
    builder = SparkSession.builder.appName(
        spark_cfg.app_name + (f"-{app_suffix}" if app_suffix else "")
    )
    if not launched_by_spark_submit():
        builder = builder.master(spark_cfg.master).config(
            "spark.driver.memory", spark_cfg.driver_memory
        )
    # petastorm 0.13.1 on the pinned pyarrow 14 warns about its own legacy-API use from every
    # Python worker; nothing a user can act on, so keep job logs readable
    conf = {"spark.executorEnv.PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
    derby = catalog and hold_metastore and _derby_path(cfg.catalog)
    if derby and not _session_active():
        claim_derby(derby)
        refuse_busy_derby(derby)
    if catalog:
        builder, catalog_conf = _with_catalog(builder, cfg.catalog)
        conf.update(catalog_conf)
    conf = _merge_java_options(conf, {**spark_cfg.conf, **(extra_conf or {})})
    if not launched_by_spark_submit():
        for option in (spark_cds.java_options(cfg, conf), joblog.java_options()):
            if option:
                conf = _merge_java_options(conf, {"spark.driver.extraJavaOptions": option})
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    _reap_jvm_at_exit()
    if derby:
        # open the metastore now and hold it for the job's life: a second job started later
        # is refused at its start instead of failing minutes in at its first table write
        spark.sql("SHOW DATABASES").collect()
    return spark


class MetastoreBusy(Refused, RuntimeError):
    pass


_REAPED: set = set()


def _reap_jvm_at_exit() -> None:
    """When this process started Spark's JVM (a ``hierarchy`` command, not spark-submit),
    wait at exit until that JVM is gone. PySpark's JVM exits when it reads the end of its
    stdin, i.e. after Python has exited: a job that returned could still hold its resources
    for a moment, and the next command of a script (``make demo``: predict, then curate) found
    the embedded Derby metastore locked and was refused. In-process sessions of one Python
    keep sharing the JVM until then."""

    from pyspark import SparkContext

    gateway = SparkContext._gateway
    proc = getattr(gateway, "proc", None)
    if proc is None or id(proc) in _REAPED:
        return
    _REAPED.add(id(proc))

    def reap():
        try:
            # py4j's connections closed first: the Java objects Python frees after the atexit
            # handlers then skip telling a JVM that is gone (else a traceback per object)
            gateway.close()
            proc.stdin.close()   # PythonGatewayServer exits on EOF of its stdin
            proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - at exit: never turn a finished job into a failure
            pass

    atexit.register(reap)


def _derby_path(catalog: Catalog) -> Optional[str]:
    url = catalog.metastore
    return os.path.abspath(url) if url and not url.startswith("jdbc:") else None


def _session_active() -> bool:
    from pyspark import SparkContext

    return SparkContext._active_spark_context is not None


_CLAIMED: Dict[str, int] = {}  # metastore path -> the open lock file this process holds


def claim_derby(path: str) -> None:
    """Take this process's claim on an embedded Derby metastore before Spark starts, or
    refuse. Derby's own lock (:func:`refuse_busy_derby`) is taken only once the JVM boots the
    database, seconds later: two jobs started in the same second both passed that check and
    one died at its first table write. The claim is an ``flock`` on a file beside the
    database, taken atomically and held until this process exits (the kernel releases it
    even after a kill -9)."""
    if path in _CLAIMED:
        return
    lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.hierarchy-lock")
    try:
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return  # a folder this process cannot write: Derby itself will say so
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise MetastoreBusy(_busy(path)) from None
    _CLAIMED[path] = fd


def _busy(path: str) -> str:
    return (f"catalog.metastore {path}: another job has this embedded Derby metastore open, "
            f"and Derby lets one process in at a time — wait for it, or share a PostgreSQL "
            f"metastore between concurrent jobs (`make metastore`, then catalog.metastore="
            f"jdbc:postgresql://...)")


def refuse_busy_derby(path: str) -> None:
    """Refuse, before Spark starts, an embedded Derby metastore another process has open.
    Derby holds a lock on ``dbex.lck`` (Java's FileChannel lock: a POSIX record lock, which
    ``fcntl.lockf`` sees) for as long as a JVM has the database booted."""

    lock = os.path.join(path, "dbex.lck")
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return  # never booted, or booted by nobody now
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_UN)
    except OSError:
        raise MetastoreBusy(_busy(path)) from None
    finally:
        os.close(fd)


def stop_spark(spark) -> None:
    """``spark.stop()`` without waiting for PySpark's accumulator server: in 3.5 its request
    handler re-checks a shutdown flag once a second (``select`` with a 1 s timeout), and
    ``SparkContext.stop()`` joins it: ~0.9 s at the end of every job. Accumulator updates
    are acknowledged before a job returns, so nothing is pending; the server's thread is
    flagged and shut down in the background (a daemon thread: never delays the exit)."""
    sc = spark.sparkContext
    server = getattr(sc, "_accumulatorServer", None)
    if server is not None:
        server.server_shutdown = True  # the handler leaves its loop at its next tick
        # ... unless the JVM exits first (at the process's exit, _reap_jvm_at_exit): its
        # socket then closes under the handler, an expected end, not a traceback to print
        server.handle_error = lambda request, client_address: None
        sc._accumulatorServer = None
        threading.Thread(target=server.shutdown, name="accumulator-server-stop",
                         daemon=True).start()
    spark.stop()


def metastore_conf(catalog: Catalog) -> dict:
    """The Spark settings that point the Hive client at ``catalog.metastore``: an embedded
    Derby folder (one process at a time), or a ``jdbc:postgresql://`` database that any number
    of jobs, notebooks and the Thrift server share. Empty for the cluster's hive-site.xml."""
    url = catalog.metastore
    if not url:
        return {}
    if not url.startswith("jdbc:"):
        path = os.path.abspath(url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # derby.log beside the database, not in whatever folder the job started from
        return {"spark.hadoop.javax.jdo.option.ConnectionURL":
                f"jdbc:derby:;databaseName={path};create=true",
                "spark.driver.extraJavaOptions": f"-Dderby.system.home={os.path.dirname(path)}"}
    if not url.startswith("jdbc:postgresql:"):
        raise UsageError(f"catalog.metastore {url}: only jdbc:postgresql:// databases (or a "
                         f"Derby folder, or '' for hive-site.xml) are supported")
    jar = catalog.jdbc_driver
    if not os.path.isfile(jar):
        raise UsageError(f"catalog.jdbc_driver {jar}: no such file (Debian: apt-get install "
                         f"libpostgresql-jdbc-java)")
    password = os.environ.get(catalog.metastore_password_env, "")
    return {
        "spark.hadoop.javax.jdo.option.ConnectionURL": url,
        "spark.hadoop.javax.jdo.option.ConnectionDriverName": "org.postgresql.Driver",
        "spark.hadoop.javax.jdo.option.ConnectionUserName": catalog.metastore_user,
        "spark.hadoop.javax.jdo.option.ConnectionPassword": password,
        # Hive's tables are created once by `hierarchy metastore init` (METASTORE_INIT): created
        # lazily inside a live transaction, DataNucleus deadlocks itself on PostgreSQL
        "spark.hadoop.datanucleus.schema.autoCreateAll": "false",
        "spark.hadoop.hive.metastore.schema.verification": "true",
        # DataNucleus loads the driver from the JVM's own class path: only a driver class path
        # works (set before the JVM starts; under spark-submit pass --driver-class-path too)
        "spark.driver.extraClassPath": jar,
    }


# `hierarchy metastore init`: every table of Hive's package.jdo created at start-up, the
# schema version recorded (then every other process verifies it)
METASTORE_INIT = {
    "spark.hadoop.datanucleus.schema.autoCreateAll": "true",
    "spark.hadoop.datanucleus.autoStartMechanism": "MetaData",
    "spark.hadoop.datanucleus.autoStartMetaDataFiles": "package.jdo",
    "spark.hadoop.hive.metastore.schema.verification": "false",
    "spark.hadoop.hive.metastore.schema.verification.record.version": "true",
}


def init_metastore(cfg: Settings) -> List[str]:
    """Create Hive's schema in an empty ``jdbc:`` metastore database (a no-op when it is
    there), from one process, before jobs and the Thrift server use it. The ``default``
    database's location is the warehouse of this call. Returns the databases."""
    if not cfg.catalog.metastore.startswith("jdbc:"):
        raise UsageError("hierarchy metastore init: catalog.metastore is not a jdbc: URL "
                         "(Derby creates its own schema; a cluster's metastore is its admins')")
    spark = get_spark(cfg, "metastore-init", METASTORE_INIT)
    try:
        return [r[0] for r in spark.sql("SHOW DATABASES").collect()]
    finally:
        stop_spark(spark)


def _with_catalog(builder, catalog: Catalog):
    """Tables go to a Hive metastore (:func:`metastore_conf`): the builder with Hive support,
    and the settings to add to it."""
    if not catalog.hive:
        return builder, {}
    conf = {}
    if catalog.warehouse:
        conf["spark.sql.warehouse.dir"] = storage.absolute(catalog.warehouse)
    conf.update(metastore_conf(catalog))
    return builder.enableHiveSupport(), conf


def _merge_java_options(conf: dict, more: dict) -> dict:
    """``more`` over ``conf``, except that JVM options add up (the Derby home of the metastore
    settings, the user's own options, the CDS archive) instead of replacing each other."""
    key = "spark.driver.extraJavaOptions"
    merged = {**conf, **more}
    if conf.get(key) and more.get(key):
        merged[key] = f"{conf[key]} {more[key]}"
    return merged


THRIFT_SERVER = "org.apache.spark.sql.hive.thriftserver.HiveThriftServer2"


def thriftserver_command(cfg: Settings, host: str, port: int, auth: str) -> List[str]:
    """spark-submit of Spark's Thrift server (in the pip pyspark jars) over the configured
    metastore and warehouse: the analysts' SQL endpoint. Refuses embedded Derby, which would
    lock every job out for as long as the server runs."""
    import pyspark

    catalog = cfg.catalog
    if not catalog.hive or not catalog.metastore.startswith("jdbc:"):
        raise UsageError(
            f"catalog.metastore {catalog.metastore or '(hive-site.xml)'}: the Thrift server "
            f"needs a metastore several processes can open: a jdbc:postgresql:// URL (`make "
            f"metastore` starts one), or run it where your cluster's hive-site.xml is")
    conf = {**cfg.spark.conf, **metastore_conf(catalog)}
    if catalog.warehouse:
        conf["spark.sql.warehouse.dir"] = storage.absolute(catalog.warehouse)
    class_path = conf.pop("spark.driver.extraClassPath", None)
    cmd = [os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-submit"),
           "--class", THRIFT_SERVER, "--name", f"{cfg.spark.app_name}-thriftserver",
           "--master", cfg.spark.master, "--driver-memory", cfg.spark.driver_memory]
    if class_path:
        cmd += ["--driver-class-path", class_path]
    for key, value in conf.items():
        cmd += ["--conf", f"{key}={value}"]
    return cmd + ["spark-internal", "--hiveconf", f"hive.server2.thrift.port={port}",
                  "--hiveconf", f"hive.server2.thrift.bind.host={host}",
                  "--hiveconf", "hive.server2.transport.mode=binary",
                  "--hiveconf", f"hive.server2.authentication={auth}"]


def collect_with_progress(rdd, desc: str, total: int, enabled: bool = True) -> List[Any]:
    """``rdd.collect()`` with a tqdm bar fed by Spark's status tracker (tasks done / total).
    Only small per-task results may come back this way: never rows of a dataset."""
    return run_with_progress(rdd.context, desc, rdd.collect, enabled=enabled, total=total)


def run_with_progress(spark_or_sc, desc: str, fn: Callable[[], Any], enabled: bool = True,
                      total: Optional[int] = None) -> Any:
    """Run ``fn`` (which starts Spark jobs: a write, a collect) with a tqdm bar of the tasks
    its jobs completed. Without ``total`` the bar grows as Spark plans new stages."""
    if not enabled:
        return fn()
    from tqdm import tqdm

    sc = getattr(spark_or_sc, "sparkContext", spark_or_sc)
    group = f"hierarchy-{id(fn)}-{time.time_ns()}"
    box: dict = {}

    def run() -> None:
        sc.setJobGroup(group, desc)
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    tracker = sc.statusTracker()
    with tqdm(total=total, desc=desc, unit="task") as bar:
        while worker.is_alive():
            worker.join(0.5)
            done = planned = 0
            for job_id in tracker.getJobIdsForGroup(group):
                job = tracker.getJobInfo(job_id)
                for stage_id in job.stageIds if job else []:
                    stage = tracker.getStageInfo(stage_id)
                    if stage:
                        done += stage.numCompletedTasks
                        planned += stage.numTasks
            if total is None and planned > (bar.total or 0):
                bar.total = planned
                bar.refresh()
            bar.update(max(0, min(done, bar.total or done) - bar.n))
        if bar.total is not None:
            bar.update(bar.total - bar.n)
    if "error" in box:
        raise box["error"]
    return box["result"]
