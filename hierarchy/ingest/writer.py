"""Parquet part files written by the tasks themselves.

Each task writes its own files with deterministic names (one per split and table per byte
range), under a temporary name renamed on close
(:func:`hierarchy.contracts.storage.atomic_output`): a retried or speculative task replaces its
file instead of adding a second copy, and a killed task leaves no file a reader would pick up.
"""

from __future__ import annotations

import hashlib
import time
from typing import List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hierarchy.contracts import storage

_md5 = hashlib.md5


class PartWriter:
    """Rows in, one Parquet file out; a row group closes once ``row_group_bytes`` of the
    ``size_field`` column (e.g. JPEG bytes) are buffered, so readers get even row groups.

    Rows are kept as column lists. A binary column's values may be ``memoryview`` slices of a
    buffer the caller keeps alive until :meth:`close`: they are copied once, straight into the
    Arrow column (``bytes.join`` plus an offsets array), with no per-value object."""

    def __init__(self, url: str, schema: pa.Schema, compression: str,
                 row_group_bytes: int = 0, size_field: Optional[str] = None):
        self.url, self.schema = url, schema
        self.compression = None if compression == "none" else compression
        self.row_group_bytes, self.size_field = row_group_bytes, size_field
        self.names = schema.names
        self.columns: List[list] = [[] for _ in self.names]
        self._size = self.names.index(size_field) if size_field else None
        self.buffered = 0
        self.nbytes = 0      # of ``size_field`` written
        self.written = 0
        self.row_groups = 0  # for the Petastorm metadata: no footer needs reading afterwards
        self.seconds = 0.0   # spent building Arrow tables and writing (the job's write phase)
        self._writer: Optional[pq.ParquetWriter] = None
        self._out: Optional[storage.AtomicOutput] = None

    def append(self, values: tuple) -> None:
        """One row, its values in schema order."""
        for column, value in zip(self.columns, values):
            column.append(value)
        if self._size is not None:
            self.buffered += values[self._size]
            if self.buffered >= self.row_group_bytes:
                self._flush()

    def add_pictures(self, product_id: int, category_id, l1, l2, l3, pictures: list) -> None:
        """The rows of one product's pictures (IMAGES_FILE columns), md5 computed here: the
        fast path's per-document call, without a tuple or dict per picture."""
        pid, idx, cat, c1, c2, c3, size, md5, jpeg = self.columns
        for i, pic in enumerate(pictures):
            n = len(pic)
            pid.append(product_id)
            idx.append(i)
            cat.append(category_id)
            c1.append(l1)
            c2.append(l2)
            c3.append(l3)
            size.append(n)
            md5.append(_md5(pic).hexdigest())
            jpeg.append(pic)
            self.buffered += n
        if self.buffered >= self.row_group_bytes:
            self._flush()

    def add(self, row: dict) -> None:
        """One row as a dict with every schema field (extra keys are ignored)."""
        self.append(tuple(row[n] for n in self.names))

    def extend(self, rows: List[dict]) -> None:
        for row in rows:
            self.add(row)

    def _flush(self) -> None:
        n_rows = len(self.columns[0])
        if not n_rows:
            return
        t0 = time.perf_counter()
        if self._writer is None:
            self._out = storage.atomic_output(self.url)
            self._writer = pq.ParquetWriter(
                self._out.tmp, self.schema, filesystem=self._out.fs, compression=self.compression,
                write_statistics=[f.name for f in self.schema if f.type != pa.binary()],
                # a JPEG or its md5 repeats too rarely to make a dictionary pay: trying one
                # hashes the first MB of each row group's column for nothing
                use_dictionary=[f.name for f in self.schema
                                if f.type not in (pa.binary(), pa.string())],
            )
        table = pa.Table.from_arrays(
            [_array(values, f.type) for values, f in zip(self.columns, self.schema)],
            schema=self.schema)
        self._writer.write_table(table, row_group_size=n_rows)
        self.written += n_rows
        self.row_groups += 1
        self.nbytes += self.buffered
        self.columns = [[] for _ in self.names]
        self.buffered = 0
        self.seconds += time.perf_counter() - t0

    def close(self) -> int:
        """Publish the file (nothing is written for zero rows); returns the row count."""
        self._flush()
        if self._writer is not None:
            t0 = time.perf_counter()
            self._writer.close()
            self._writer = None
            self._out.commit()
            self.seconds += time.perf_counter() - t0
        return self.written

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._out.discard()


_NUMPY = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32,
          pa.int64(): np.int64, pa.float32(): np.float32, pa.float64(): np.float64}


def _array(values: list, type_: pa.DataType) -> pa.Array:
    """An Arrow column of ``values`` (``None`` = null) built from its buffers: binary values
    may be ``memoryview`` slices, copied once. ``pa.array`` of a Python list would make
    pyarrow import pandas in every Python worker (~0.2 s of its first task); it is left to
    the types the ingest tables do not have, and to a column past 32-bit offsets."""
    n = len(values)
    validity, nulls = None, 0
    if None in values:
        valid = np.fromiter((v is not None for v in values), bool, n)
        nulls = n - int(valid.sum())
        validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
    if type_ == pa.binary() or type_ == pa.string():
        empty = "" if type_ == pa.string() else b""
        raw = [empty if v is None else v for v in values] if nulls else values
        data = None
        if type_ == pa.string():
            joined = "".join(raw)
            if joined.isascii():  # a character is a byte: one encode for the column
                data = joined.encode("ascii")
            else:
                raw = [v.encode() for v in raw]
        lengths = np.fromiter(map(len, raw), np.int64, n)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if offsets[-1] >= 1 << 31:  # 32-bit offsets: let Arrow chunk it
            return pa.array([v if v is None or isinstance(v, str) else bytes(v)
                             for v in values], type_)
        return pa.Array.from_buffers(type_, n, [
            validity, pa.py_buffer(offsets.astype(np.int32)),
            pa.py_buffer(b"".join(raw) if data is None else data)], null_count=nulls)
    dtype = _NUMPY.get(type_)
    if dtype is None:
        return pa.array(values, type_)
    data = np.array([0 if v is None else v for v in values] if nulls else values,
                    dtype=np.int64 if np.issubdtype(dtype, np.integer) else dtype)
    if data.dtype != dtype:  # numpy would wrap an out-of-range value silently
        info = np.iinfo(dtype)
        if len(data) and (data.min() < info.min or data.max() > info.max):
            raise OverflowError(f"a value of {data.min()}..{data.max()} does not fit {type_}")
        data = data.astype(dtype)
    return pa.Array.from_buffers(type_, n, [validity, pa.py_buffer(data)], null_count=nulls)


def warm_up(schema: pa.Schema) -> None:
    """One row of ``schema`` built as the writers build it and written to memory: the
    first Parquet write of a Python worker loads what it needs once, in the warm-up beside
    the driver's scan, not in each worker's first task."""
    row = [b"" if f.type == pa.binary() else "" if f.type == pa.string() else 0
           for f in schema]
    table = pa.Table.from_arrays([_array([v], f.type) for v, f in zip(row, schema)],
                                 schema=schema)
    pq.write_table(table, pa.BufferOutputStream())


def write_table(url: str, rows: List[dict], schema: pa.Schema) -> int:
    """A small table in one go (also with zero rows, so the folder always exists)."""
    with storage.atomic_output(url) as (fs, tmp):
        table = pa.Table.from_arrays([_array([r.get(f.name) for r in rows], f.type)
                                      for f in schema], schema=schema)
        pq.write_table(table, tmp, filesystem=fs)
    return len(rows)
