"""The two kinds of failure a user acts on, and the exit codes the CLI maps them to.

Schedulers branch on exit codes, so every stage raises one of these two bases (or a subclass)
for anything a user caused or can fix, and the CLI prints its message as one line:

- :class:`UsageError` (exit 2): the command cannot run as given — a bad flag, config key,
  category table, or a path that is missing, not a file, not a folder or not writable. Raised
  before Spark starts wherever the check does not need it.
- :class:`Refused` (exit 3): the job ran its checks and refused to produce or publish output —
  too much bad input, no usable document, another taxonomy, a dataset that is not complete, a
  missing model, a folder another job holds.

The machine refusing — a full disk, a denied permission, a read-only folder — is found in
whatever exception carries it (:func:`environment_fault`) and is also one line, exit 3, the
stack trace logged at -v. Anything else is a bug and ends in a traceback (exit 1).
"""

from __future__ import annotations

import re
from typing import Optional

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REFUSED = 3


class HierarchyError(Exception):
    """Base of the errors whose message is the whole story (no traceback needed)."""

    exit_code = 1


class UsageError(HierarchyError):
    exit_code = EXIT_USAGE


class Refused(HierarchyError):
    exit_code = EXIT_REFUSED


# ------------------------------------------------------------------ the environment
# What the machine refused rather than the data or the command: found in the exception chain,
# as an OSError's errno or as the words Java, Hadoop, TensorFlow and h5py put in their messages
_FAULTS = (
    ((28, 122), ("No space left on device", "Disk quota exceeded"),
     "no space left on the device", "free space there, or point the job at a bigger disk"),
    ((13, 1), ("Permission denied", "Operation not permitted"),
     "permission denied", "give this user write access, or choose another folder"),
    ((30,), ("Read-only file system",),
     "the file system is read-only", "choose a writable folder"),
)
# a path starts a word (TensorFlow's "device_/job:localhost" is not one)
_PATH = re.compile(r"(?:^|(?<=[\s'\"(=\[]))(?:file:)?(/[^\s'\",;:()\]]+)", re.MULTILINE)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def environment_fault(exc: BaseException, writing: Optional[str] = None) -> Optional[str]:
    """One line naming the path and what to do when ``exc`` is the machine refusing (a full
    disk, a denied permission, a read-only file system), else None. The path is the one the
    failing call names, else one on the line that says what failed, else ``writing`` (the
    folder the job writes: a Spark worker's "[Errno 28]" names no file)."""
    for err in _chain(exc):
        text = str(err)
        for errnos, words, what, todo in _FAULTS:
            if getattr(err, "errno", None) in errnos or any(w in text for w in words):
                return f"{_fault_path(err, words, writing)}{what} — {todo} (the stack trace " \
                       f"is logged with -v)"
    return None


def _fault_path(err: BaseException, words: tuple, writing: Optional[str]) -> str:
    path = getattr(err, "filename", None)
    if not path:
        lines = [line for line in str(err).splitlines() if any(w in line for w in words)]
        found = [m.group(1) for line in lines for m in _PATH.finditer(line)
                 if not m.group(1).endswith(".py")]
        path = found[0] if found else None
    if path:
        return f"{path}: "
    return f"writing under {writing}: " if writing else ""


# ------------------------------------------------------------------ a damaged input file
# Spark's words when a task cannot decode a Parquet file it reads (a part damaged at the same
# size passes every check that reads only sizes and footers); the root cause is the chain's last
_SPARK_READ = re.compile(r"Encountered error while reading file (\S+?)\.? Details:")
_CAUSE = re.compile(r"^Caused by: (\S+?)(?::\s*(.*))?$", re.MULTILINE)
# the words a Python task raises for a part it refuses to read (a digest that is not the one
# its commit recorded: hierarchy.contracts.dataset.require_digest)
_ARROW_READ = re.compile(r"cannot read Parquet file (\S+): (.+)")


def damaged_file(exc: BaseException) -> Optional[str]:
    """One line naming a file a job could not decode and the repair, when ``exc`` is a read
    of a damaged file (Spark's Parquet reader, or a part an append or a compaction refused
    to copy); else None."""
    for err in _chain(exc):
        text = str(err)
        found = _SPARK_READ.search(text) or _ARROW_READ.search(text)
        if not found:
            continue
        path = found.group(1)
        if found.re is _ARROW_READ:
            why = found.group(2).strip()
        else:
            causes = [m for m in _CAUSE.finditer(text[found.end():])]
            cause = next((c for c in causes if c.group(2)), causes[-1] if causes else None)
            why = (f"{cause.group(1).rsplit('.', 1)[-1]}: {cause.group(2) or ''}".rstrip(": ")
                   if cause else "unreadable")
        return f"{path}: cannot be decoded ({why}) — the file is damaged: {repair_of(path)}"
    return None


def repair_of(path: str) -> str:
    """What mends a damaged file of a dataset folder, from where it sits."""
    kind = re.search(r"/images/split=(\w+)/|/products/kind=(\w+)/", path)
    if kind:
        which = kind.group(2) or ("test" if kind.group(1) == "test" else "train")
        return (f"restore it from a copy of the dataset, or re-run `hierarchy ingest --kind "
                f"{which}` into its dataset (`hierarchy verify` checks every part's digest)")
    return "restore it from a copy, or make it again with the job that wrote it"
