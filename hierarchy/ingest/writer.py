"""Parquet part files written by the tasks themselves.

Each task writes its own files with deterministic names (one per split and table per byte
range), under a temporary name renamed on close (:func:`hierarchy.storage.atomic_output`): a
retried or speculative task replaces its file instead of adding a second copy, and a killed
task leaves no file a reader would pick up.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from hierarchy import storage


class _Buffer:
    def __init__(self, names):
        self.columns: Dict[str, list] = {n: [] for n in names}
        self.rows = 0
        self.bytes = 0


class PartWriter:
    """Rows in, one Parquet file out; a row group closes once ``row_group_bytes`` of the
    ``size_field`` column (e.g. JPEG bytes) are buffered, so readers get even row groups.

    With ``group_field`` (images: ``l1``) every row group holds one value of that column:
    rows are buffered per value and each buffer becomes its own row groups. A level-1
    branch's training reader then loads the JPEG column of its own row groups only (Petastorm
    reads the other columns of a row group only when its predicate matches a row there, and
    the column statistics say min == max), instead of nearly every row group of the split.
    Memory stays bounded by the task's byte range, which the task holds anyway."""

    def __init__(self, url: str, schema: pa.Schema, compression: str,
                 row_group_bytes: int = 0, size_field: Optional[str] = None,
                 group_field: Optional[str] = None):
        self.url, self.schema = url, schema
        self.compression = None if compression == "none" else compression
        self.row_group_bytes, self.size_field = row_group_bytes, size_field
        self.group_field = group_field
        self.names = schema.names
        self._buffers: Dict[object, _Buffer] = {}
        self.written = 0
        self._writer: Optional[pq.ParquetWriter] = None
        self._out: Optional[storage.AtomicOutput] = None

    def add(self, row: dict) -> None:
        key = row[self.group_field] if self.group_field else None
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = _Buffer(self.names)
        # column lists, not row dicts: building the Arrow table is then a cheap copy per column
        for name in self.names:
            buf.columns[name].append(row[name])
        buf.rows += 1
        if self.size_field:
            buf.bytes += row[self.size_field]
            if buf.bytes >= self.row_group_bytes:
                self._flush(key)

    def _flush(self, key) -> None:
        buf = self._buffers.pop(key, None)
        if buf is None or not buf.rows:
            return
        if self._writer is None:
            self._out = storage.atomic_output(self.url)
            self._writer = pq.ParquetWriter(
                self._out.tmp, self.schema, filesystem=self._out.fs, compression=self.compression,
                write_statistics=[f.name for f in self.schema if f.type != pa.binary()],
            )
        table = pa.Table.from_pydict(buf.columns, schema=self.schema)
        self._writer.write_table(table, row_group_size=buf.rows)
        self.written += buf.rows

    def close(self) -> int:
        """Publish the file (nothing is written for zero rows); returns the row count."""
        for key in sorted(self._buffers, key=lambda k: (k is None, k)):
            self._flush(key)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._out.commit()
        return self.written

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._out.discard()


def write_table(url: str, rows: List[dict], schema: pa.Schema) -> int:
    """A small table in one go (also with zero rows, so the folder always exists)."""
    with storage.atomic_output(url) as (fs, tmp):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, filesystem=fs)
    return len(rows)
