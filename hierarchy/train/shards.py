"""Which row groups of a split a Horovod worker reads, and how big its share is.

Petastorm gives each worker the row groups whose index is ``rank`` modulo ``world_size``;
when that would leave some worker with no rows (fewer row groups than workers, or a branch
present in too few of them), every worker reads all of them and ``Dataset.shard`` splits the
rows instead (:mod:`hierarchy.train.data`). Everything here comes from the Parquet footers
and the small ``l1`` column, never from the JPEGs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import pyarrow.parquet as pq

from hierarchy.contracts import storage
from hierarchy.contracts.dataset import Dataset


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int        # row group inside its file
    rows: int
    matching: int     # rows of the branch asked for (= rows without a branch)
    jpeg_bytes: int = 0  # the jpeg column's bytes in this row group (all rows)


def split_row_groups(data: str, split: str, branch: Optional[int] = None) -> List[RowGroup]:
    """The split's row groups in Petastorm's order (files sorted by path, then row groups).

    Petastorm numbers row groups this way and shard ``k`` of ``n`` gets those whose number is
    ``k`` modulo ``n``. Reads only Parquet footers, plus the ``l1`` column of the row groups
    whose statistics cannot tell whether they hold the branch."""

    files = storage.list_files(Dataset(data).images(split), ".parquet")
    groups: List[RowGroup] = []
    for path in files:
        fs, inner = storage.resolve(path)
        with fs.open_input_file(inner) as fh:
            pf = pq.ParquetFile(fh)
            meta = pf.metadata
            col = meta.schema.names.index("l1") if branch is not None else None
            jpeg = meta.schema.names.index("jpeg")
            for i in range(meta.num_row_groups):
                rows = meta.row_group(i).num_rows
                matching = rows
                if branch is not None:
                    stats = meta.row_group(i).column(col).statistics
                    if stats is not None and stats.has_min_max and stats.null_count == 0 \
                            and stats.min == stats.max:
                        matching = rows if stats.min == branch else 0
                    elif stats is not None and stats.has_min_max and \
                            not stats.min <= branch <= stats.max:
                        matching = 0
                    else:
                        l1 = pf.read_row_group(i, columns=["l1"]).column(0).to_numpy(
                            zero_copy_only=False)
                        matching = int(np.count_nonzero(l1 == branch))
                groups.append(RowGroup(path, i, rows, matching,
                                       meta.row_group(i).column(jpeg).total_uncompressed_size))
    return groups


def petastorm_can_shard(groups: List[RowGroup], world_size: int) -> bool:
    """True when every shard Petastorm would make holds at least one matching row."""
    if world_size <= 1:
        return False
    if len(groups) < world_size:
        return False
    per_shard = [0] * world_size
    for number, group in enumerate(groups):
        per_shard[number % world_size] += group.matching
    return all(per_shard)


def shard_jpeg_bytes(groups: List[RowGroup], rank: int, world_size: int,
                     petastorm_shards: bool) -> int:
    """Estimated bytes of the JPEGs one worker's reader yields in a pass: the matching rows'
    share of each row group's jpeg column, over the row groups of its shard (all of them when
    tf.data shards rows: every worker then reads the whole split)."""
    total = 0.0
    for number, g in enumerate(groups):
        if g.rows and (not petastorm_shards or number % world_size == rank):
            total += g.jpeg_bytes * g.matching / g.rows
    return int(total)
