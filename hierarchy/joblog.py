"""Where a job's third-party chatter goes: one log file per job.

Spark's log4j output (its start-up notes, Hive's configuration warnings, a failed task's
Python traceback), TensorFlow's and Keras' warnings and Python's ``warnings`` go to the job's
log file; the console keeps what the job itself says (its ``hierarchy`` log lines, training
progress, the summary). ``-v`` puts everything back on the console. The file's path is in
the job's summary line (``"log"``), so a scheduler's logs lead to it.

Only a JVM this process starts gets the log4j configuration: under spark-submit the
submitter's own logging stays as configured.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from typing import Optional

from hierarchy.contracts.settings import Settings

LOG_ENV = "HIERARCHY_LOG_FILE"
LOG4J = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf", "log4j2.properties")
_HANDLER_MARK = "_hierarchy_job_log"
# this process's job log, for the JVM it starts. The environment variable carries only the
# "quiet" to Spark's Python workers: a process merely inheriting it (a subprocess of a test, a
# notebook kernel) is no job of ours and keeps Spark's own logging
_current: dict = {}


def log_dir(cfg: Settings) -> str:
    return cfg.spark.log_dir or os.path.join(tempfile.gettempdir(), "hierarchy-logs")


def start(cfg: Settings, stage: str, verbose: bool) -> Optional[str]:
    """Send the chatter to a new log file for this job (returns its path), or, verbose,
    leave it on the console (None)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
        handler.close()
    if verbose:
        os.environ.pop(LOG_ENV, None)
        _current.pop("path", None)
        return None
    # TensorFlow's C++ notes (oneDNN, CPU features, tf.data rewrites) print before any
    # Python logging can catch them: level 3, here and in Spark's workers, whatever the
    # environment says (-v leaves it alone). Not 2: XLA's stream executor logs "SetPriority
    # unimplemented" as an ERROR for each stream the training input's compiled augmentation
    # opens on a CPU; a TensorFlow failure that matters reaches the job as a Python
    # exception, with its message
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    folder = log_dir(cfg)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    handler = logging.FileHandler(path, delay=True)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    setattr(handler, _HANDLER_MARK, True)
    # a root handler also keeps TensorFlow from adding its own stderr handler on import
    root.addHandler(handler)
    logging.captureWarnings(True)
    os.environ[LOG_ENV] = path
    _current["path"] = path
    quiet("mlflow")  # "creating experiment ..." notes (again after its import: tracking.py)
    return path


def quiet(logger: str) -> None:
    """Warnings only from a library's ``logger`` during a (non-verbose) job: for a library
    that sets its own level when it is imported (MLflow: INFO, "Creating a new
    experiment" on the console), called after that import."""
    if _current.get("path"):
        logging.getLogger(logger).setLevel(logging.WARNING)


@contextlib.contextmanager
def native_stderr_to_log():
    """For the block, the process's file descriptor 2 writes to the job's log file (a no-op
    when verbose or outside a job). C++ libraries write there directly, out of Python's
    reach: absl's and XLA's once-per-process notes at the first compile ("All log messages
    before absl::InitializeLog() ...", "Compiled cluster using XLA!") ignore
    TF_CPP_MIN_LOG_LEVEL."""
    path = _current.get("path")
    if not path:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def java_options() -> Optional[str]:
    """The driver JVM's options that send Spark's log to the job's file, or None (verbose,
    or not a ``hierarchy`` job: Spark's own defaults)."""
    path = _current.get("path")
    if not path:
        return None
    return f"-Dlog4j2.configurationFile=file:{LOG4J} -Dhierarchy.log.file={path}"
