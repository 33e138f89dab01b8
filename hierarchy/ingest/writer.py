"""Parquet part files written by the tasks themselves, and the commit of a staged run.

Each task writes its own files with deterministic names (one per split and table per byte
range), under a temporary name renamed on close: a retried or speculative task replaces its
file instead of adding a second copy, and a killed task leaves no file a reader would pick up.
"""

from __future__ import annotations

import uuid
from typing import Dict, List, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class PartWriter:
    """Rows in, one Parquet file out; a row group closes once ``row_group_bytes`` of the
    ``size_field`` column (e.g. JPEG bytes) are buffered, so readers get even row groups."""

    def __init__(self, fs: pafs.FileSystem, path: str, schema: pa.Schema, compression: str,
                 row_group_bytes: int = 0, size_field: Optional[str] = None):
        self.fs, self.path, self.schema = fs, path, schema
        self.compression = None if compression == "none" else compression
        self.row_group_bytes, self.size_field = row_group_bytes, size_field
        self.names = schema.names
        self.columns: Dict[str, list] = {n: [] for n in self.names}
        self.n_rows = 0
        self.buffered = 0
        self.written = 0
        self._writer: Optional[pq.ParquetWriter] = None
        self._tmp: Optional[str] = None

    def add(self, row: dict) -> None:
        # column lists, not row dicts: building the Arrow table is then a cheap copy per column
        for name in self.names:
            self.columns[name].append(row[name])
        self.n_rows += 1
        if self.size_field:
            self.buffered += row[self.size_field]
            if self.buffered >= self.row_group_bytes:
                self._flush()

    def _flush(self) -> None:
        if not self.n_rows:
            return
        if self._writer is None:
            parent, name = self.path.rsplit("/", 1)
            self.fs.create_dir(parent, recursive=True)
            self._tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
            self._writer = pq.ParquetWriter(
                self._tmp, self.schema, filesystem=self.fs, compression=self.compression,
                write_statistics=[f.name for f in self.schema if f.type != pa.binary()],
            )
        table = pa.Table.from_pydict(self.columns, schema=self.schema)
        self._writer.write_table(table, row_group_size=self.n_rows)
        self.written += self.n_rows
        self.columns = {n: [] for n in self.names}
        self.n_rows, self.buffered = 0, 0

    def close(self) -> int:
        """Publish the file (nothing is written for zero rows); returns the row count."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self.fs.move(self._tmp, self.path)
            self._writer = None
        return self.written

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.fs.delete_file(self._tmp)
            self._writer = None


def write_table(fs: pafs.FileSystem, path: str, rows: List[dict], schema: pa.Schema) -> int:
    """A small table in one go (also with zero rows, so the folder always exists)."""
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, filesystem=fs)
    fs.move(tmp, path)
    return len(rows)
