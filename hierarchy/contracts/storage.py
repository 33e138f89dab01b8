"""Files on any filesystem pyarrow knows (local, HDFS, S3, GCS), addressed by one string.

Every stage reads and writes through these helpers, so the same code runs on a laptop and on a
cluster. A location is a plain local path (``data/ds``) or a URL (``hdfs:///ds``,
``file:///tmp/ds``); the helpers take that string and resolve it themselves, so callers never
carry ``(filesystem, path)`` pairs around. This module is also the only place that

- tells local from remote (:func:`is_remote`), and
- writes a file atomically (write beside the target under a temporary name, then rename), so a
  reader or a resumed job never sees half a file: :func:`write_bytes_atomic` and friends for
  small files, :func:`atomic_output` for pyarrow writers, :func:`atomic_local_file` for
  libraries that only write local paths (Keras, h5py).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import tempfile
import uuid
from typing import Any, Iterator, List, Optional, Tuple

import pyarrow as pa
import pyarrow.fs as pafs

from hierarchy.contracts.errors import Refused, UsageError

_MISSING = object()


# ------------------------------------------------------------------ locations
def is_remote(url: str) -> bool:
    """True for a URL whose filesystem is not this machine's (``hdfs://``, ``s3://``...)."""
    return is_url(url) and not url.startswith("file://")


def is_url(value: str) -> bool:
    """True for a location with a scheme (``file:///d``, ``hdfs://nn/d``), False for a path."""
    return "://" in value


def is_location(value: str) -> bool:
    """A URL, a JDBC URL or an absolute path: a value that names its place on its own (a
    relative one is resolved against the data root)."""
    return is_url(value) or value.startswith("jdbc:") or os.path.isabs(value)


def _plain(u: str) -> str:
    """A local folder's one spelling: Hadoop's ``file:/d``, ``file:///d/`` and ``/d`` -> ``/d``
    (a remote URL keeps its scheme and host)."""
    return u.replace("file://", "").replace("file:", "").rstrip("/")


def same_location(a: str, b: str) -> bool:
    """Whether two spellings name one local folder (:func:`_plain`)."""
    return _plain(a) == _plain(b)


def within(url: str, folder: str) -> bool:
    """Whether ``url`` is ``folder`` or lies under it (Hadoop's spellings of a local path
    compared as :func:`same_location` does; a remote URL against its own scheme and host)."""
    inner, outer = _plain(to_url(url)), _plain(to_url(folder))
    return inner == outer or inner.startswith(outer + "/")


def resolve(url: str) -> Tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it), for pyarrow APIs that take both. Schemes pyarrow does
    not know itself (``memory://``, ``abfs://``, ...) go through fsspec when it has them."""
    if not is_url(url):
        return pafs.LocalFileSystem(), os.path.abspath(url)
    try:
        return pafs.FileSystem.from_uri(url)
    except pa.ArrowInvalid:
        import fsspec

        scheme = url.split("://", 1)[0]
        try:
            fs = fsspec.filesystem(scheme)
        except (ImportError, ValueError) as exc:
            raise UsageError(f"{url}: no filesystem for {scheme}:// ({exc})") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs._strip_protocol(url)


def map_local(url: str, start: int = 0, size: Optional[int] = None):
    """A read-only, sequential-advised mmap of bytes [start, start+size) of a local file, as
    (map, offset of ``start`` inside it) — the map begins at the allocation granularity at or
    before ``start``; None for a file on another filesystem (read it instead). Raises
    ValueError when the file is shorter than asked."""

    fs, path = resolve(url)
    if not isinstance(fs, pafs.LocalFileSystem):
        return None
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as fh:
        length = os.fstat(fh.fileno()).st_size
        end = length if size is None else start + size
        if end > length:
            raise ValueError(f"{url}: {length} bytes, shorter than the {end} asked for")
        if end == aligned:
            return None  # nothing to map (mmap refuses a length of 0)
        mapped = mmap.mmap(fh.fileno(), end - aligned, offset=aligned, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_SEQUENTIAL)
    return mapped, start - aligned


def local_path(url: str) -> str:
    """The local path of a local location (``file://`` stripped); refuses a remote one."""
    if is_remote(url):
        raise ValueError(f"{url} is not on a local or mounted filesystem")
    return os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)


def absolute(url: str) -> str:
    """A URL as it is, a local path made absolute (not relative to whoever reads it)."""
    return url if is_url(url) else os.path.abspath(url)


def to_url(url: str) -> str:
    """A URL with a scheme, as Petastorm and Spark want it (file:// for local paths; Hadoop's
    own ``file:/path`` spelling, as the catalog reports locations, becomes ``file:///path``)."""
    if url.startswith("file:/") and not url.startswith("file://"):
        return "file://" + url[len("file:"):]
    return url if is_url(url) else "file://" + os.path.abspath(url)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[str(p).strip("/") for p in parts]])


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


# ------------------------------------------------------------------ queries
def file_info(url: str) -> pafs.FileInfo:
    fs, path = resolve(url)
    return fs.get_file_info(path)


def exists(url: str) -> bool:
    return file_info(url).type != pafs.FileType.NotFound


def list_dir(url: str) -> List[Tuple[str, str, bool]]:
    """(name, location, is_file) of the entries directly under ``url``, sorted by name; empty
    when it does not exist. Locations keep ``url``'s form, so they can be passed on."""
    fs, path = resolve(url)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted((i.base_name, join(url, i.base_name), i.is_file) for i in infos)


def list_files(url: str, suffix: str = "") -> List[str]:
    """Locations of the files directly under ``url`` ending with ``suffix``, sorted."""
    return [loc for name, loc, is_file in list_dir(url) if is_file and name.endswith(suffix)]


def parquet_rows(url: str) -> int:
    """Rows a Parquet file's footer declares (one small read: a truncated or foreign file
    raises ``pa.ArrowInvalid`` / ``OSError``)."""
    import pyarrow.parquet as pq

    fs, path = resolve(url)
    return pq.read_metadata(path, filesystem=fs).num_rows


# ------------------------------------------------------------------ changes
def make_dir(url: str) -> None:
    fs, path = resolve(url)
    fs.create_dir(path, recursive=True)


def remove(url: str) -> None:
    """Delete a file or a folder with everything in it; nothing when it does not exist."""
    fs, path = resolve(url)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def move(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` (same filesystem), creating ``dst``'s parent."""
    fs, s = resolve(src)
    _, d = resolve(dst)
    fs.create_dir(d.rsplit("/", 1)[0], recursive=True)
    fs.move(s, d)


def replace(src: str, dst: str) -> None:
    """``dst`` becomes ``src``: whatever was at ``dst`` is removed first (a folder swap)."""
    remove(dst)
    if exists(src):
        move(src, dst)


@contextlib.contextmanager
def staged_folder(destination: str, staging: str) -> Iterator[str]:
    """Write a whole folder at ``staging`` (yielded): when the block ends without an error
    it replaces ``destination`` in one step; on an error it is removed and ``destination``
    is left as it was."""
    try:
        yield staging
    except BaseException:
        remove(staging)
        raise
    replace(staging, destination)


@contextlib.contextmanager
def single_part_file(destination: str, staging: str) -> Iterator[str]:
    """For a Spark writer of one partition: it writes the folder ``staging`` (yielded); when
    the block ends, that folder's one ``part-*`` file becomes ``destination`` by a rename (a
    reader never sees half a file; HDFS cannot rename onto a file, so the old one goes
    first) and the folder is removed, on an error too."""
    try:
        yield staging
        parts = [loc for name, loc, _ in list_dir(staging) if name.startswith("part-")]
        if len(parts) != 1:
            raise Refused(f"{staging}: expected one part file, found {len(parts)}")
        replace(parts[0], destination)
    finally:
        remove(staging)


# ------------------------------------------------------------------ reading
def read_bytes(url: str) -> bytes:
    fs, path = resolve(url)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def file_digest(url: str, chunk: int = 1 << 20) -> str:
    """``sha256:<hex>`` of a file's bytes, read in chunks (any filesystem): what tells a file
    changed at the same size."""
    import hashlib

    fs, path = resolve(url)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return "sha256:" + h.hexdigest()


def read_head(url: str, n: int) -> bytes:
    """The first ``n`` bytes of a file (one small read, on any filesystem)."""
    fs, path = resolve(url)
    with fs.open_input_file(path) as fh:
        return fh.read(n)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str, default: Any = _MISSING) -> Any:
    """The JSON document at ``url``; ``default`` when given and the file does not exist."""
    if default is not _MISSING and not exists(url):
        return default
    return json.loads(read_text(url))


def read_parquet(url: str, **options):
    """A Parquet file, or a folder of them, as a pyarrow Table (``options``: columns, schema,
    ... of ``pyarrow.parquet.read_table``)."""
    import pyarrow.parquet as pq

    fs, path = resolve(url)
    return pq.read_table(path, filesystem=fs, **options)


def copy_to_local(url: str) -> str:
    """A local path holding the file at ``url`` (itself when already local): for libraries
    that only read local files, e.g. Keras loading a model kept on HDFS."""
    if not is_remote(url):
        return local_path(url)
    target = os.path.join(tempfile.mkdtemp(prefix="hierarchy-"), basename(url))
    with open(target, "wb") as out:
        out.write(read_bytes(url))
    return target


def copy_file(src: str, dst: str, chunk: int = 1 << 22) -> None:
    """``src``'s bytes at ``dst`` (any filesystems), streamed in chunks and published whole
    or not at all (:class:`AtomicOutput`)."""
    sfs, spath = resolve(src)
    with atomic_output(dst) as (fs, tmp), sfs.open_input_stream(spath) as inp, \
            fs.open_output_stream(tmp) as out:
        while True:
            block = inp.read(chunk)
            if not block:
                break
            out.write(block)


# ------------------------------------------------------------------ atomic writing
def _temp_beside(path: str) -> str:
    head, name = path.rsplit("/", 1) if "/" in path else ("", path)
    return f"{head}/.{name}.{uuid.uuid4().hex[:12]}.tmp" if head else \
        f".{name}.{uuid.uuid4().hex[:12]}.tmp"


class AtomicOutput:
    """A file written under a temporary name beside ``url`` and renamed onto it by
    :meth:`commit` (or deleted by :meth:`discard`). As a context manager it yields
    ``(filesystem, temporary path)`` for a pyarrow writer and commits when the block ends
    without error."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.path = resolve(url)
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        self.tmp = _temp_beside(self.path)

    def commit(self) -> None:
        self.fs.move(self.tmp, self.path)

    def discard(self) -> None:
        if self.fs.get_file_info(self.tmp).type == pafs.FileType.File:
            self.fs.delete_file(self.tmp)

    def __enter__(self) -> Tuple[pafs.FileSystem, str]:
        return self.fs, self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


@contextlib.contextmanager
def scratch_folder(parent: str, job: str) -> Iterator[str]:
    """A private folder ``parent/_staging-<job>-<token>`` for a job's intermediate files,
    removed when the block ends, whatever happens (Spark skips ``_`` names when it lists
    ``parent``)."""
    folder = join(parent, f"_staging-{job}-{uuid.uuid4().hex[:12]}")
    try:
        yield folder
    finally:
        remove(folder)


def atomic_output(url: str) -> AtomicOutput:
    return AtomicOutput(url)


def write_bytes_atomic(url: str, data: bytes) -> None:
    with atomic_output(url) as (fs, tmp):
        with fs.open_output_stream(tmp) as out:
            out.write(data)


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))


def write_json_atomic(url: str, obj: Any) -> None:
    write_text_atomic(url, json.dumps(obj, indent=2, default=str) + "\n")


@contextlib.contextmanager
def atomic_local_file(url: str) -> Iterator[str]:
    """A temporary local path (same extension) for a library that writes only local files;
    it replaces ``url`` when the block ends without error. Models live on a local or mounted
    filesystem (every training worker sees it), so a remote ``url`` is refused."""
    path = local_path(url)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.{uuid.uuid4().hex[:12]}.tmp{ext}"
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


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
    info = file_info(url)
    noun = "file" if want == pafs.FileType.File else "folder"
    if info.type == pafs.FileType.NotFound:
        raise PathError(f"{what} {url}: no such {noun}")
    if info.type != want:
        other = "folder" if noun == "file" else "file"
        raise PathError(f"{what} {url}: is a {other}, not a {noun}")
    return info


def require_hadoop_path(url: str, what: str) -> None:
    """Refuse a location Spark's Hadoop paths cannot name: a backslash is read as a
    separator, and the table would point at a folder that does not exist."""
    if "\\" in url:
        raise UsageError(f"{what} {url}: Spark (Hadoop) paths cannot hold a backslash; use "
                         f"a folder without one")


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
        up = probe_dir.rsplit("/", 1)[0] if "/" in probe_dir.rstrip("/") else ""
        if not up or up == probe_dir:
            break  # a bucket root or a scheme without folders: let the write below tell
        probe_dir = up
    probe = f"{probe_dir.rstrip('/')}/.hierarchy-write-probe-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"")
        fs.delete_file(probe)
    except OSError as exc:
        where = "" if probe_dir == path else f" (in {probe_dir})"
        verb = "is not writable" if probe_dir == path else "cannot be created"
        raise PathError(f"{what} {url}: {verb}{where}: {_reason(exc)}") from None
