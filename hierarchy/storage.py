"""Paths and files on any filesystem pyarrow knows (local, HDFS, S3, GCS): the stages read
and write through these helpers so the same code runs on a laptop and on a cluster."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Tuple

import pyarrow.fs as pafs


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
