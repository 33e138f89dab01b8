"""Paths and files on any filesystem pyarrow knows (local, HDFS, S3, GCS): the stages read
and write through these helpers so the same code runs on a laptop and on a cluster."""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any, Tuple

import pyarrow.fs as pafs

from hierarchy.errors import UsageError


def resolve(url: str) -> Tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URL or a plain local path."""
    if "://" not in url:
        return pafs.LocalFileSystem(), os.path.abspath(url)
    return pafs.FileSystem.from_uri(url)


def to_url(url: str) -> str:
    """A URL with a scheme, as Petastorm and Spark want it (file:// for local paths)."""
    return url if "://" in url else "file://" + os.path.abspath(url)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def remove(fs: pafs.FileSystem, path: str) -> None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write beside the target and rename, so a reader never sees half a file."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def write_json_atomic(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read().decode("utf-8"))


def list_dir(fs: pafs.FileSystem, path: str):
    """FileInfo of the entries directly under path (empty when path does not exist)."""
    return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))


# ------------------------------------------------------------------ command-line paths
class PathError(UsageError):
    """A path given to a command that cannot be used as asked; the message names it."""


def _reason(exc: OSError) -> str:
    """"Permission denied" rather than pyarrow's "Failed to open local file '...'. Detail:
    [errno 13] Permission denied" (the path is already in the message)."""
    text = str(exc)
    found = re.search(r"\[errno \d+\] (.+)", text)
    if found:
        return found.group(1).strip()
    return exc.strerror or (text.splitlines()[0] if text else type(exc).__name__)


def _require(url: str, what: str, want: pafs.FileType) -> pafs.FileInfo:
    fs, path = resolve(url)
    info = fs.get_file_info(path)
    noun = "file" if want == pafs.FileType.File else "folder"
    if info.type == pafs.FileType.NotFound:
        raise PathError(f"{what} {url}: no such {noun}")
    if info.type != want:
        other = "folder" if noun == "file" else "file"
        raise PathError(f"{what} {url}: is a {other}, not a {noun}")
    return info


def require_file(url: str, what: str = "input") -> pafs.FileInfo:
    """The file at ``url``, checked to exist, be a file and be readable."""
    info = _require(url, what, pafs.FileType.File)
    fs, path = resolve(url)
    try:
        with fs.open_input_stream(path) as fh:
            fh.read(1)
    except OSError as exc:
        raise PathError(f"{what} {url}: cannot be read ({_reason(exc)})") from None
    return info


def require_dir(url: str, what: str) -> None:
    """``url`` exists and is a folder (an input folder such as --data or --models)."""
    _require(url, what, pafs.FileType.Directory)


def require_writable_dir(url: str, what: str) -> None:
    """``url`` is a folder this process can write into, or one it can create. Nothing is left
    behind: the check writes and deletes a probe file in the folder, or in its nearest
    existing ancestor when the folder does not exist yet."""
    fs, path = resolve(url)
    probe_dir = path
    while True:
        info = fs.get_file_info(probe_dir)
        if info.type == pafs.FileType.Directory:
            break
        if info.type == pafs.FileType.File:
            if probe_dir == path:
                raise PathError(f"{what} {url}: is a file, not a folder")
            raise PathError(f"{what} {url}: cannot be created, {probe_dir} is a file")
        parent = probe_dir.rsplit("/", 1)[0] if "/" in probe_dir.rstrip("/") else ""
        if not parent or parent == probe_dir:
            break  # a bucket root or a scheme without folders: let the write below tell
        probe_dir = parent
    probe = join(probe_dir, f".hierarchy-write-probe-{uuid.uuid4().hex}")
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"")
        fs.delete_file(probe)
    except OSError as exc:
        where = "" if probe_dir == path else f" (in {probe_dir})"
        verb = "is not writable" if probe_dir == path else "cannot be created"
        raise PathError(f"{what} {url}: {verb}{where}: {_reason(exc)}") from None
