"""Real servers for the cluster tests, started from what the machine has and stopped at the
end: a Spark standalone master and workers (the pip pyspark jars' `spark-class`), PostgreSQL
(ops/postgres.sh, Debian's packages) and the Spark Thrift server (`HiveThriftServer2`, in the
pip pyspark jars). Each runs in its own process group, so stopping it stops its children
(executors, Python workers) too."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, log: Path,
                  timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{what} not listening on {port} after {timeout:.0f} s:\n{tail(log)}")


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class Service:
    """One server process (and its children) with its log file."""

    def __init__(self, name: str, cmd: List[str], log: Path, env: Optional[Dict] = None,
                 cwd: Optional[Path] = None):
        self.name, self.log = name, log
        self._fh = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT,
                                     env=env or os.environ.copy(), cwd=cwd,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._fh.close()


class Standalone:
    """A Spark standalone master and ``workers`` workers of one core each, on loopback."""

    def __init__(self, base: Path, workers: int = 2, memory: str = "2g"):
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.port, self.ui_port = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(base),
               "SPARK_NO_DAEMONIZE": "1",
               # every executor unpacks the ~2 GB environment: a finished application's
               # folder goes within a minute, not after the default 7 days
               "SPARK_WORKER_OPTS": "-Dspark.worker.cleanup.enabled=true "
                                    "-Dspark.worker.cleanup.interval=20 "
                                    "-Dspark.worker.cleanup.appDataTtl=20"}
        env.pop("PYSPARK_PYTHON", None)  # the executors' interpreter is the submitter's choice
        spark_class = str(spark_home() / "bin" / "spark-class")
        self.services = [Service("master", [
            spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
            "--port", str(self.port), "--webui-port", str(self.ui_port)],
            base / "master.log", env)]
        wait_for_port(self.port, self.services[0].proc, "spark master", base / "master.log")
        for i in range(workers):
            work = base / f"worker-{i}"
            work.mkdir(exist_ok=True)
            self.services.append(Service(f"worker-{i}", [
                spark_class, "org.apache.spark.deploy.worker.Worker", self.url,
                "--host", "127.0.0.1", "--cores", "1", "--memory", memory,
                "--work-dir", str(work), "--webui-port", "0"], base / f"worker-{i}.log", env))
        self._wait_for_workers(workers)

    def state(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=5) as r:
            return json.load(r)

    def _wait_for_workers(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                alive = [w for w in self.state()["workers"] if w["state"] == "ALIVE"]
                if len(alive) >= n:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{n} workers did not register:\n" +
                           "\n".join(tail(s.log, 1500) for s in self.services))

    def completed_apps(self) -> List[dict]:
        return self.state().get("completedapps", [])

    def launched(self) -> Dict[str, set]:
        """{worker: application ids it launched executors for}, from the workers' logs."""
        import re

        return {s.name: set(re.findall(r"Asked to launch executor (app-[\d-]+)/",
                                       tail(s.log, 10**7)))
                for s in self.services if s.name.startswith("worker")}

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


class Postgres:
    """ops/postgres.sh: a private PostgreSQL server for the Hive metastore. Its folder is a
    fresh one under /tmp, not pytest's (mode 0700: the `postgres` user could not enter it),
    with a short path (a Unix socket path has at most 107 bytes)."""

    def __init__(self):
        import tempfile

        self.base, self.port = Path(tempfile.mkdtemp(prefix="hierarchy-pg-")), free_port()
        base = self.base
        out = subprocess.run([str(ROOT / "ops" / "postgres.sh"), "start", str(base),
                              str(self.port)], capture_output=True, text=True, timeout=180)
        if out.returncode:
            raise RuntimeError(f"postgres did not start:\n{out.stdout}{out.stderr}"
                               f"{tail(base / 'postgres.log')}")
        self.url = out.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        import shutil

        subprocess.run([str(ROOT / "ops" / "postgres.sh"), "stop", str(self.base)],
                       capture_output=True, timeout=120)
        shutil.rmtree(self.base, ignore_errors=True)


class ThriftServer:
    """`hierarchy thriftserver` (Spark's HiveThriftServer2) in the foreground, until stopped."""

    def __init__(self, python: Path, overrides: List[str], env: Dict, base: Path,
                 cwd: Path):
        self.port = free_port()
        log = base / "thriftserver.log"
        self.service = Service("thriftserver", [
            str(python), "-m", "hierarchy.cli", "thriftserver", "--port", str(self.port),
            *overrides, "spark.master=local[1]", "spark.driver_memory=768m"], log, env, cwd)
        wait_for_port(self.port, self.service.proc, "thrift server", log, timeout=300)

    def connect(self):
        from pyhive import hive

        return hive.connect(host="127.0.0.1", port=self.port, username="analyst",
                            database="default", auth="NOSASL")

    def stop(self) -> None:
        self.service.stop()
