"""One ingest at a time per output folder.

Two ingests into one folder would race: each clears stale staging of its kind (the other's
live staging among it), both rewrite manifest.json from what they read, both regenerate the
Petastorm metadata. ``output_lock`` holds the dataset's ``_ingest.lock`` for the whole job. A lock
left by a job that died is taken over when it is provably stale: same host and its process is
gone, or older than ``ingest.lock_stale_hours`` (a holder on another host cannot be probed).
Local folders get an atomic exclusive create; on HDFS/S3 the create is write-then-read-back,
best effort against two jobs starting in the same second.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import time
import uuid
from typing import Iterator, Optional

from hierarchy.contracts import storage
from hierarchy.contracts.dataset import Dataset
from hierarchy.contracts.errors import Refused

log = logging.getLogger(__name__)


class OutputLocked(Refused, RuntimeError):
    """Another ingest is writing the same output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _stale(holder: dict, stale_hours: float) -> bool:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not _alive(holder["pid"])
    return time.time() - float(holder.get("since", 0)) > stale_hours * 3600


def _read(path: str) -> Optional[dict]:
    try:
        holder = storage.read_json(path)
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}  # unreadable (half written): judged by age only


def _create(path: str, record: dict) -> bool:
    data = (json.dumps(record) + "\n").encode()
    if not storage.is_remote(path):
        local = storage.local_path(path)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        try:
            fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True
    if storage.exists(path):
        return False
    storage.write_bytes_atomic(path, data)
    return (_read(path) or {}).get("token") == record["token"]


def _describe(holder: dict) -> str:
    since = holder.get("since")
    when = dt.datetime.fromtimestamp(since, dt.UTC).isoformat(timespec="seconds") \
        if isinstance(since, (int, float)) else "?"
    return (f"kind {holder.get('kind', '?')}, host {holder.get('host', '?')}, "
            f"pid {holder.get('pid', '?')}, since {when}")


def _held(path: str, holder: dict) -> OutputLocked:
    return OutputLocked(f"{path}: another ingest is writing this folder ({_describe(holder)})"
                        f"; wait for it to finish, or delete the lock file if that job is gone")


def check_unlocked(dataset: Dataset, stale_hours: float) -> None:
    """Refuse at once (before Spark starts) when a live ingest holds the folder; the lock is
    still taken for real by :func:`output_lock`, this only saves a doomed start."""
    path = dataset.lock_path
    holder = _read(path) if storage.exists(path) else None
    if holder is not None and not _stale(holder, stale_hours):
        raise _held(path, holder)


@contextlib.contextmanager
def output_lock(dataset: Dataset, kind: str, stale_hours: float) -> Iterator[None]:
    path = dataset.lock_path
    record = {"host": socket.gethostname(), "pid": os.getpid(), "kind": kind,
              "since": time.time(), "token": uuid.uuid4().hex}
    storage.make_dir(dataset.root)
    for _ in range(2):  # a second try after removing a stale lock
        if _create(path, record):
            break
        holder = _read(path)
        if holder is None:
            continue  # released in between
        if not _stale(holder, stale_hours):
            raise _held(path, holder)
        log.warning("taking over a stale ingest lock (%s)", _describe(holder))
        storage.remove(path)
    else:
        raise OutputLocked(f"{path}: could not take the lock")
    try:
        yield
    finally:
        if (_read(path) or {}).get("token") == record["token"]:
            storage.remove(path)
