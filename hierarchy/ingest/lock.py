"""One ingest at a time per output folder.

Two ingests into one folder would race: each clears stale staging of its kind (the other's
live staging among it), both rewrite manifest.json from what they read, both regenerate the
Petastorm metadata. ``output_lock`` holds ``<output>/_ingest.lock`` for the whole job. A lock
left by a job that died is taken over when it is provably stale: same host and its process is
gone, or older than ``ingest.lock_stale_hours`` (a holder on another host cannot be probed).
Local folders get an atomic exclusive create; on HDFS/S3 the create is write-then-read-back,
best effort against two jobs starting in the same second.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import time
import uuid
from typing import Iterator, Optional

from hierarchy import storage
from hierarchy.errors import Refused

LOCK_FILE = "_ingest.lock"


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


def _read(fs, path: str) -> Optional[dict]:
    try:
        holder = storage.read_json(fs, path)
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}  # unreadable (half written): judged by age only


def _create(fs, path: str, record: dict) -> bool:
    data = (json.dumps(record) + "\n").encode()
    if "://" not in path and os.path.isabs(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True
    if storage.exists(fs, path):
        return False
    storage.write_bytes_atomic(fs, path, data)
    return (_read(fs, path) or {}).get("token") == record["token"]


def _describe(holder: dict) -> str:
    since = holder.get("since")
    when = dt.datetime.fromtimestamp(since, dt.UTC).isoformat(timespec="seconds") \
        if isinstance(since, (int, float)) else "?"
    return (f"kind {holder.get('kind', '?')}, host {holder.get('host', '?')}, "
            f"pid {holder.get('pid', '?')}, since {when}")


def check_unlocked(output: str, stale_hours: float) -> None:
    """Refuse at once (before Spark starts) when a live ingest holds the folder; the lock is
    still taken for real by :func:`output_lock`, this only saves a doomed start."""
    fs, out = storage.resolve(output)
    path = storage.join(out, LOCK_FILE)
    holder = _read(fs, path) if storage.exists(fs, path) else None
    if holder is not None and not _stale(holder, stale_hours):
        raise OutputLocked(
            f"{storage.join(output, LOCK_FILE)}: another ingest is writing this folder "
            f"({_describe(holder)}); wait for it to finish, or delete the lock file if "
            f"that job is gone")


@contextlib.contextmanager
def output_lock(output: str, kind: str, stale_hours: float, echo=print) -> Iterator[None]:
    fs, out = storage.resolve(output)
    path = storage.join(out, LOCK_FILE)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "kind": kind,
              "since": time.time(), "token": uuid.uuid4().hex}
    fs.create_dir(out, recursive=True)
    for _ in range(2):  # a second try after removing a stale lock
        if _create(fs, path, record):
            break
        holder = _read(fs, path)
        if holder is None:
            continue  # released in between
        if not _stale(holder, stale_hours):
            raise OutputLocked(
                f"{storage.join(output, LOCK_FILE)}: another ingest is writing this folder "
                f"({_describe(holder)}); wait for it to finish, or delete the lock file if "
                f"that job is gone")
        echo(f"taking over a stale ingest lock ({_describe(holder)})")
        storage.remove(fs, path)
    else:
        raise OutputLocked(f"{storage.join(output, LOCK_FILE)}: could not take the lock")
    try:
        yield
    finally:
        if (_read(fs, path) or {}).get("token") == record["token"]:
            storage.remove(fs, path)
