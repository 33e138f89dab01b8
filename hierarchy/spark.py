"""SparkSession from the config, and running a job with a progress bar on the driver."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable, List, Optional

from hierarchy import storage
from hierarchy.config import Config


def get_spark(cfg: Config, app_suffix: str = ""):
    """The session spark-submit already configured, or a local one from ``cfg.spark``.

    Executors must run this interpreter (same numpy/pyarrow/TF), so PYSPARK_PYTHON defaults
    to it for local runs; under spark-submit on a cluster the submitter's setting wins."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    spark_cfg = cfg["spark"]
    builder = SparkSession.builder.appName(
        spark_cfg["app_name"] + (f"-{app_suffix}" if app_suffix else "")
    )
    if not SparkConf().contains("spark.master"):  # not launched by spark-submit
        builder = builder.master(spark_cfg["master"]).config(
            "spark.driver.memory", spark_cfg["driver_memory"]
        )
    # petastorm 0.13.1 on the pinned pyarrow 14 warns about its own legacy-API use from every
    # Python worker; nothing a user can act on, so keep job logs readable
    builder = builder.config("spark.executorEnv.PYTHONWARNINGS",
                             "ignore::FutureWarning,ignore::DeprecationWarning")
    builder = _with_catalog(builder, cfg["catalog"])
    for key, value in spark_cfg["conf"].items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _with_catalog(builder, catalog: dict):
    """Tables go to a Hive metastore: the embedded Derby database named by
    ``catalog.metastore`` (local runs), or the cluster's hive-site.xml when it is empty. Derby
    allows one JVM at a time: a second local job waits for the first to end."""
    if not catalog["hive"]:
        return builder
    if catalog["warehouse"]:
        builder = builder.config("spark.sql.warehouse.dir", storage.absolute(catalog["warehouse"]))
    if catalog["metastore"]:
        path = os.path.abspath(catalog["metastore"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        builder = builder.config("spark.hadoop.javax.jdo.option.ConnectionURL",
                                 f"jdbc:derby:;databaseName={path};create=true")
        # derby.log beside the database, not in whatever folder the job started from
        builder = builder.config("spark.driver.extraJavaOptions",
                                 f"-Dderby.system.home={os.path.dirname(path)}")
    return builder.enableHiveSupport()


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
