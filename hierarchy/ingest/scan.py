"""Offset index of a BSON dump, built from its length prefixes, with resynchronisation.

A dump is a plain concatenation of documents, each starting with its int32 little-endian
length and ending with a 0x00 byte. The scan reads the file sequentially in large blocks and
looks at a few bytes per document (prefix, first element, terminator, next prefix) — it never
decodes pictures, so one pass costs about a raw read of the file.

Where the chain breaks (a truncated tail, garbage between documents, a length prefix that
lies, a terminator missing), the region is recorded as corrupt and the scan resynchronises at
the next offset that holds a complete, decodable document whose first field is ``_id`` (the
mongodump convention; a document without a leading ``_id`` is therefore treated as corrupt
bytes). Knows nothing of Spark.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, List, Optional, Tuple

import bson
import numpy as np

_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
# BSON element types (spec 1.1), including deprecated ones: a byte outside is not a document.
_ELEMENT_TYPES = frozenset([*range(0x01, 0x14), 0x7F, 0xFF])
_ID_KEY = b"_id\x00"
_CATEGORY_TAIL32 = b"\x10category_id\x00"
_CATEGORY_TAIL64 = b"\x12category_id\x00"
NO_VALUE = -1  # product_id / category_id not readable without a decode

# Corrupt-region reasons (also quarantine reason codes).
TRUNCATED = "truncated"
BAD_LENGTH = "bad_length"
GARBAGE = "garbage"


@dataclass
class CorruptRegion:
    offset: int
    length: int
    reason: str
    detail: str


@dataclass
class ScanResult:
    """Documents in file order. ``product_id``/``category_id`` are read from the fixed places
    mongodump puts them (first and last field) and are ``NO_VALUE`` where the document has
    another shape; the decode stage always has the final word on them."""

    path: str
    size: int
    offsets: np.ndarray
    lengths: np.ndarray
    product_ids: np.ndarray
    category_ids: np.ndarray
    corrupt: List[CorruptRegion] = field(default_factory=list)

    @property
    def n_documents(self) -> int:
        return int(len(self.offsets))

    @property
    def corrupt_bytes(self) -> int:
        return sum(r.length for r in self.corrupt)


class _Buffer:
    """Sliding window over a sequential stream: random access near the read head."""

    def __init__(self, fh: BinaryIO, size: int, block: int):
        self.fh, self.size, self.block = fh, size, block
        self.start = 0
        self.data = b""
        self.read_bytes = 0

    def get(self, pos: int, n: int) -> bytes:
        """Bytes [pos, pos+n) clipped to the file (a backwards jump re-reads from disk)."""
        end = min(pos + n, self.size)
        if pos < self.start:
            self._seek(pos)
        if end > self.start + len(self.data):
            keep = self.data[pos - self.start:] if pos < self.start + len(self.data) else b""
            if not keep:
                self._seek(pos)
                keep = b""
            want = max(self.block, end - pos - len(keep))
            more = self.fh.read(want)
            self.read_bytes += len(more)
            self.start, self.data = pos, keep + more
        return self.data[pos - self.start:end - self.start]

    def _seek(self, pos: int) -> None:
        self.fh.seek(pos)
        self.start, self.data = pos, b""


class _Mapped:
    """The whole input in memory or mapped (a local file): random access is a slice."""

    def __init__(self, data, size: int):
        self.data, self.size = data, size

    def get(self, pos: int, n: int) -> bytes:
        """Bytes [pos, pos+n) clipped to the file's size as described (a longer map of a file
        that grew since is read no further)."""
        return self.data[max(pos, 0):min(pos + n, self.size)]


class Scanner:
    def __init__(self, fh: Optional[BinaryIO], size: int, path: str, max_document: int,
                 block: int = 8 << 20, progress: Optional[Callable[[int], None]] = None,
                 data=None):
        """``data``: the file's bytes (or an mmap of it) when they can be addressed directly;
        then the common case — a sound document followed by another — runs in a tight loop
        that reads a few bytes in place (:meth:`_run`), about 5x faster than through the
        sliding window. Whatever that loop does not accept goes through the checks below."""
        self.buf = _Mapped(data, size) if data is not None else _Buffer(fh, size, block)
        self.data = data
        self.size, self.path, self.max_document = size, path, max_document
        self.progress = progress

    def _run(self, pos: int, offsets, lengths, pids, cids) -> int:
        """Append every sound document from ``pos`` on whose successor is sound too (or the
        end of the file): the checks of :meth:`_head_problem` and :meth:`_chain_ok`. Returns
        where it stopped. Only the length chain is followed one document at a time; the other
        checks and the id reads run vectorised over a batch of chained documents."""
        data, size, max_doc = self.data, self.size, self.max_document
        unpack32 = _INT32.unpack_from
        raw = np.frombuffer(data, dtype=np.uint8, count=size)
        try:  # the map cannot be closed while this view of it lives
            while True:
                starts = array("q")
                append, at = starts.append, pos
                stop = min(size - 9, pos + _RUN_BYTES)  # a batch ends past here
                while at <= stop:
                    length = unpack32(data, at)[0]
                    if not 4 < length <= max_doc or at + length > size:
                        break
                    append(at)
                    at += length
                if not starts:
                    return pos
                first = np.frombuffer(starts, dtype=np.int64)
                ends = np.append(first[1:], at)
                sizes = ends - first
                bad = np.flatnonzero(~(_TYPE_OK[raw[first + 4]] & (raw[ends - 1] == 0)
                                       & _matches(raw, first + 5, _ID_KEY, sizes >= 9)))
                # a document is taken when it and its successor are sound (or it ends the file)
                if len(bad):
                    take = max(int(bad[0]) - 1, 0)
                elif at == size:
                    take = len(first)
                else:
                    take = len(first) - 1  # its successor is unsound, or not looked at yet
                if take:
                    first, ends, sizes = first[:take], ends[:take], sizes[:take]
                    offsets.extend(first.tolist())
                    lengths.extend(sizes.tolist())
                    pids.extend(_ids(raw, first, sizes).tolist())
                    cids.extend(_categories(raw, ends, sizes).tolist())
                    pos = int(ends[-1])
                if not take or pos >= size or len(bad) or at <= stop:
                    return pos  # else the batch ended at its byte limit: chain on from pos
        finally:
            del raw

    # ------------------------------------------------------------------ checks
    def _length_at(self, pos: int) -> int:
        return _INT32.unpack(self.buf.get(pos, 4))[0]

    def _has_id_head(self, pos: int) -> bool:
        head = self.buf.get(pos, 9)
        return len(head) == 9 and head[4] in _ELEMENT_TYPES and head[5:9] == _ID_KEY

    def _head_problem(self, pos: int) -> Optional[str]:
        """None when a complete document could start at pos; else why not."""
        head = self.buf.get(pos, 9)
        if len(head) < 9:
            return f"{self.size - pos} trailing byte(s) cannot hold a document"
        length = _INT32.unpack_from(head)[0]
        if length < 5 or length > self.max_document:
            return f"length prefix {length} outside [5, {self.max_document}]"
        if pos + length > self.size:
            return (f"length prefix {length} runs past the end of the file "
                    f"({self.size - pos} byte(s) left)")
        if head[4] not in _ELEMENT_TYPES or head[5:9] != _ID_KEY:
            return "no _id field where a document's first element should be"
        if self.buf.get(pos + length - 1, 1) != b"\x00":
            return f"document of {length} bytes does not end with 0x00"
        return None

    def _decodes(self, pos: int, length: int) -> bool:
        try:
            bson.decode(self.buf.get(pos, length))
            return True
        except Exception:  # noqa: BLE001 - any decode failure means "not a document here"
            return False

    def _chain_ok(self, end: int) -> bool:
        return end == self.size or self._head_problem(end) is None

    # ------------------------------------------------------------------ resync
    def _find_next(self, start: int) -> int:
        """First offset >= start holding a complete, decodable document whose first field is
        ``_id``; the file size when there is none. The next prefix is not required to be sound:
        a good document just before another corrupt one must not be skipped. Candidates
        (offsets whose bytes 5..8 read ``_id\\0``) are found vectorised over 1 MiB windows."""
        window = 1 << 20
        pos = start
        while pos + 9 <= self.size:
            chunk = self.buf.get(pos, window + 8)
            if len(chunk) < 9:
                break
            arr = np.frombuffer(chunk, dtype=np.uint8)
            n = len(arr) - 8
            cand = np.flatnonzero(
                (arr[5:5 + n] == 0x5F) & (arr[6:6 + n] == 0x69)
                & (arr[7:7 + n] == 0x64) & (arr[8:8 + n] == 0x00)
            )
            for c in cand.tolist():
                q = pos + c
                if self._head_problem(q) is not None:
                    continue
                length = self._length_at(q)
                if self._decodes(q, length):
                    return q
            pos += n
        return self.size

    def _classify(self, pos: int, nxt: int) -> str:
        has_id = self._has_id_head(pos)
        if nxt == self.size and (has_id or self.size - pos < 9):
            return TRUNCATED
        return BAD_LENGTH if has_id else GARBAGE

    # ------------------------------------------------------------------ main loop
    def scan(self) -> ScanResult:
        offsets, lengths, pids, cids = array("q"), array("q"), array("q"), array("q")
        corrupt: List[CorruptRegion] = []
        pos = 0
        reported = 0
        while pos < self.size:
            if self.data is not None:
                pos = self._run(pos, offsets, lengths, pids, cids)
                if pos >= self.size:
                    break
            problem = self._head_problem(pos)
            if problem is None:
                length = self._length_at(pos)
                # A broken next prefix means garbage follows or this length lies: a full
                # decode tells which (rare, so the common path never decodes).
                if not self._chain_ok(pos + length) and not self._decodes(pos, length):
                    problem = f"length prefix {length} does not delimit a decodable document"
            if problem is not None:
                nxt = self._find_next(pos + 1)
                corrupt.append(CorruptRegion(
                    pos, nxt - pos, self._classify(pos, nxt),
                    f"{problem}; {nxt - pos} byte(s) skipped up to "
                    + ("the end of the file" if nxt == self.size else f"offset {nxt}"),
                ))
                pos = nxt
                continue
            offsets.append(pos)
            lengths.append(length)
            pids.append(_read_id(self.buf.get(pos, 17)))
            cids.append(_read_category(self.buf.get(pos + length - 22, 22)))
            pos += length
            if self.progress and pos - reported >= (64 << 20):
                self.progress(pos - reported)
                reported = pos
        if self.progress:
            self.progress(self.size - reported)
        return ScanResult(
            path=self.path, size=self.size,
            offsets=np.frombuffer(offsets, dtype=np.int64).copy(),
            lengths=np.frombuffer(lengths, dtype=np.int64).copy(),
            product_ids=np.frombuffer(pids, dtype=np.int64).copy(),
            category_ids=np.frombuffer(cids, dtype=np.int64).copy(),
            corrupt=corrupt,
        )


def _read_id(head: bytes) -> int:
    if len(head) >= 13 and head[4] == 0x10:
        return _INT32.unpack_from(head, 9)[0]
    if len(head) >= 17 and head[4] == 0x12:
        return _INT64.unpack_from(head, 9)[0]
    return NO_VALUE


def _read_category(tail: bytes) -> int:
    """``category_id`` when it is the last field (the dump's layout); NO_VALUE otherwise."""
    if tail[-18:-5] == _CATEGORY_TAIL32:
        return _INT32.unpack_from(tail, len(tail) - 5)[0]
    if tail[-22:-9] == _CATEGORY_TAIL64:
        return _INT64.unpack_from(tail, len(tail) - 9)[0]
    return NO_VALUE


_RUN_BYTES = 256 << 20  # of documents chained before their checks run vectorised
_TYPE_OK = np.zeros(256, dtype=bool)
_TYPE_OK[sorted(_ELEMENT_TYPES)] = True


def _matches(raw: np.ndarray, at: np.ndarray, pattern: bytes, where: np.ndarray) -> np.ndarray:
    """Whether ``raw[at:at+len(pattern)] == pattern``, for each ``at`` where ``where`` holds
    (False elsewhere; those offsets are not read)."""
    ok = where.copy()
    for i, byte in enumerate(pattern):
        ok[ok] = raw[at[ok] + i] == byte
    return ok


def _gather(raw: np.ndarray, at: np.ndarray, dtype: str) -> np.ndarray:
    width = np.dtype(dtype).itemsize
    idx = at[:, None] + np.arange(width)
    return np.ascontiguousarray(raw[idx]).view(dtype).reshape(-1).astype(np.int64)


def _ids(raw: np.ndarray, first: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """:func:`_read_id` of each document."""
    out = np.full(len(first), NO_VALUE, dtype=np.int64)
    kind = raw[first + 4]
    for code, dtype, need in ((0x10, "<i4", 13), (0x12, "<i8", 17)):
        sel = np.flatnonzero((kind == code) & (sizes >= need))
        if len(sel):
            out[sel] = _gather(raw, first[sel] + 9, dtype)
    return out


def _categories(raw: np.ndarray, ends: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """:func:`_read_category` of each document's tail."""
    out = np.full(len(ends), NO_VALUE, dtype=np.int64)
    found = np.zeros(len(ends), dtype=bool)
    for tail, dtype, width in ((_CATEGORY_TAIL32, "<i4", 4), (_CATEGORY_TAIL64, "<i8", 8)):
        back = len(tail) + width + 1  # the tag, the value and the document's 0x00
        sel = np.flatnonzero(~found & _matches(raw, ends - back, tail, sizes >= back))
        if len(sel):
            out[sel] = _gather(raw, ends[sel] - width - 1, dtype)
            found[sel] = True
    return out


def scan_stream(fh: BinaryIO, size: int, path: str, max_document: int = 16 << 20,
                progress: Optional[Callable[[int], None]] = None, data=None) -> ScanResult:
    return Scanner(fh, size, path, max_document, progress=progress, data=data).scan()


def scan_bytes(data: bytes, path: str = "<bytes>", max_document: int = 16 << 20) -> ScanResult:
    return scan_stream(None, len(data), path, max_document, data=data)


def cut_ranges(result: ScanResult, target_bytes: int) -> List[Tuple[int, int]]:
    """Split the document list into runs of about ``target_bytes``: (first doc, end doc) pairs.
    A run never spans a corrupt region, so a task reads one contiguous byte range."""
    if result.n_documents == 0:
        return []
    ranges: List[Tuple[int, int]] = []
    offsets, lengths = result.offsets, result.lengths
    ends = offsets + lengths
    # a document starts a new run when the previous one does not end where it starts
    breaks = set(np.flatnonzero(offsets[1:] != ends[:-1]).tolist())
    first, acc = 0, 0
    for i in range(result.n_documents):
        if i > first and (acc >= target_bytes or (i - 1) in breaks):
            ranges.append((first, i))
            first, acc = i, 0
        acc += int(lengths[i])
    ranges.append((first, result.n_documents))
    return ranges
