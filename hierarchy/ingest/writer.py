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


class PartWriter:
    """Rows in, one Parquet file out; a row group closes once ``row_group_bytes`` of the
    ``size_field`` column (e.g. JPEG bytes) are buffered, so readers get even row groups."""

    def __init__(self, url: str, schema: pa.Schema, compression: str,
                 row_group_bytes: int = 0, size_field: Optional[str] = None):
        self.url, self.schema = url, schema
        self.compression = None if compression == "none" else compression
        self.row_group_bytes, self.size_field = row_group_bytes, size_field
        self.names = schema.names
        self.columns: Dict[str, list] = {n: [] for n in self.names}
        self.n_rows = 0
        self.buffered = 0
        self.written = 0
        self._writer: Optional[pq.ParquetWriter] = None
        self._out: Optional[storage.AtomicOutput] = None

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
            self._out = storage.atomic_output(self.url)
            self._writer = pq.ParquetWriter(
                self._out.tmp, self.schema, filesystem=self._out.fs, compression=self.compression,
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
