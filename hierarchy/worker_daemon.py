"""The Python worker daemon of our Spark jobs (``spark.python.daemon.module``).

Spark starts one daemon per executor and forks every Python worker from it, so what the daemon
sets up, each worker inherits. On the pinned Python 3.11 with Spark 3.5 two costs are paid
that later versions removed:

- PySpark's worker calls ``importlib.invalidate_caches()`` before every task, and Python
  3.10-3.11's zipimporter answers it by re-reading the whole central directory of each zip on
  ``sys.path`` (pyspark.zip is 2.4 MB): ~70 ms of CPU per task, ~30 % of a 64 MB ingest task.
  Python 3.12 (gh-103200) defers the re-read, Spark 4.1 (SPARK-54744) calls it only when a
  file was added; here the re-read happens only when the archive changed on disk.
- Spark puts ``$SPARK_HOME/python/lib/pyspark.zip`` first on the daemon's path. Imported from
  a zip, pyspark is compiled from source on each start (0.6 s against 0.2 s from an installed
  copy's bytecode). When the environment has pyspark installed at exactly the zip's version,
  the installed copy is imported; any other version keeps the zip, which matches the JVM.

Requires the package importable on the executors (the packed environment of ``make dist``, or
a local run); with ``--py-files`` set ``spark.python.daemon.module=pyspark.daemon``.
"""

from __future__ import annotations

import os
import re
import sys
import zipimport
from typing import List, Optional, Sequence

_STAMPS: dict = {}


def _stamp(path: str) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def install_zip_cache_check() -> None:
    """``zipimporter.invalidate_caches`` re-reads an archive only when it changed on disk."""
    cls = zipimport.zipimporter
    original = getattr(cls.invalidate_caches, "__wrapped__", cls.invalidate_caches)

    def invalidate_caches(self):
        stamp = _stamp(self.archive)
        if stamp is not None and _STAMPS.get(self.archive) == stamp:
            return
        original(self)
        _STAMPS[self.archive] = stamp

    invalidate_caches.__wrapped__ = original
    cls.invalidate_caches = invalidate_caches


_VERSION = re.compile(rb"""__version__\s*(?::\s*str\s*)?=\s*["']([^"']+)["']""")


def _zip_version(archive: str) -> Optional[str]:
    import zipfile

    try:
        with zipfile.ZipFile(archive) as z:
            found = _VERSION.search(z.read("pyspark/version.py"))
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
    return found.group(1).decode() if found else None


def _installed_version() -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version("pyspark")
    except metadata.PackageNotFoundError:
        return None


def prefer_installed_pyspark(path: Sequence[str], installed: Optional[str]) -> List[str]:
    """``path`` with Spark's pyspark.zip moved last when ``installed`` (the version of the
    environment's own pyspark) is exactly the zip's; else ``path`` unchanged."""
    zips = [p for p in path if os.path.basename(p) == "pyspark.zip"]
    if not zips or installed is None or any(_zip_version(z) != installed for z in zips):
        return list(path)
    return [p for p in path if p not in zips] + zips


def main() -> None:
    # both are savings: whatever goes wrong in them, the daemon starts as Spark's own would
    try:
        sys.path[:] = prefer_installed_pyspark(sys.path, _installed_version())
    except Exception:  # noqa: BLE001
        pass
    try:
        install_zip_cache_check()
    except Exception:  # noqa: BLE001
        pass
    from pyspark import daemon

    daemon.manager()


if __name__ == "__main__":
    # run from the importable module, so that its state is what the workers' imports see
    from hierarchy.worker_daemon import main as _main

    _main()
