"""The Python worker daemon of our Spark jobs (``spark.python.daemon.module``).

Spark starts one daemon per executor and forks every Python worker from it, so what the daemon
sets up, each worker inherits. On the pinned Python 3.11 with Spark 3.5 two costs are paid
that later versions removed:

- PySpark's worker calls ``importlib.invalidate_caches()`` before every task, and Python
  3.10-3.11's zipimporter answers it by re-reading the whole central directory of each zip on
  ``sys.path`` (pyspark.zip is 2.4 MB): ~70 ms of CPU per task, ~30 % of a 64 MB ingest task.
  Python 3.12 (gh-103200) defers the re-read, Spark 4.1 (SPARK-54744) calls it only when a
  file was added; here the re-read happens only when the archive changed on disk.
- Spark puts ``$SPARK_HOME/python/lib/pyspark.zip`` and py4j's zip first on the daemon's path.
  Imported from a zip, they are compiled from source on each start (pyspark: 0.6 s against
  0.2 s from an installed copy's bytecode). When the environment has the package installed at
  exactly the zip's version, the installed copy is imported; any other version keeps the zip,
  which matches the JVM.
- The first invalidation in each forked worker would still read every zip once, to stamp it
  (~70 ms of the first task): the daemon stamps the archives it has opened before forking.

Requires the package importable on the executors (the packed environment of ``make dist``, or
a local run); with ``--py-files`` set ``spark.python.daemon.module=pyspark.daemon``.
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
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
# package -> (the file naming its version, how Spark names its zip on the daemon's path)
_BUNDLED = {"pyspark": ("pyspark/version.py", re.compile(r"pyspark\.zip$")),
            "py4j": ("py4j/version.py", re.compile(r"py4j-[^/]*-src\.zip$"))}


def _zip_version(archive: str, member: str) -> Optional[str]:
    try:
        with zipfile.ZipFile(archive) as z:
            found = _VERSION.search(z.read(member))
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
    return found.group(1).decode() if found else None


def _installed_version(package: str = "pyspark", path: Sequence[str] = ()) -> Optional[str]:
    """The version of the copy of ``package`` that the folders of ``path`` (sys.path) hold
    first, read from its version.py: what an import would load (importlib.metadata costs
    ~70 ms of the daemon's start to answer the same)."""
    member = _BUNDLED[package][0]
    for entry in path or sys.path:
        if entry and os.path.isdir(entry):
            try:
                with open(os.path.join(entry, member), "rb") as fh:
                    found = _VERSION.search(fh.read())
            except OSError:
                continue
            return found.group(1).decode() if found else None
    return None


def prefer_installed_pyspark(path: Sequence[str], installed: Optional[str],
                             package: str = "pyspark") -> List[str]:
    """``path`` with Spark's zip of ``package`` (pyspark.zip, py4j-*-src.zip) moved last when
    ``installed`` (the version of the environment's own copy) is exactly the zip's; else
    ``path`` unchanged."""
    member, pattern = _BUNDLED[package]
    zips = [p for p in path if pattern.search(os.path.basename(p))]
    if not zips or installed is None or any(_zip_version(z, member) != installed
                                            for z in zips):
        return list(path)
    return [p for p in path if p not in zips] + zips


def stamp_open_archives() -> None:
    """Record the zips this process has already opened as read: their importers were built
    moments ago, so forked workers need not re-read them at their first task's invalidation."""
    for importer in list(sys.path_importer_cache.values()):
        if isinstance(importer, zipimport.zipimporter):
            _STAMPS.setdefault(importer.archive, _stamp(importer.archive))


def main() -> None:
    # each is a saving: whatever goes wrong in one, the daemon starts as Spark's own would
    try:
        for package in _BUNDLED:
            sys.path[:] = prefer_installed_pyspark(
                sys.path, _installed_version(package), package)
    except Exception:  # noqa: BLE001
        pass
    try:
        install_zip_cache_check()
    except Exception:  # noqa: BLE001
        pass
    from pyspark import daemon

    try:
        stamp_open_archives()
    except Exception:  # noqa: BLE001
        pass
    daemon.manager()


if __name__ == "__main__":
    # run from the importable module, so that its state is what the workers' imports see
    from hierarchy.worker_daemon import main as _main

    _main()
