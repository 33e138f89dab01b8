"""``hierarchy compact``: small parts merged, so reads do not degrade after a year of appends.

Every append adds a few parts per folder (a dump's byte ranges, the parts its re-sent products
rewrote); after hundreds of nights a folder would hold thousands of small files, and every
reader (Spark's listing, Petastorm's row-group index, the integrity check) pays per file. A
compaction merges a folder's parts smaller than ``ingest.compact_small_mb`` into parts of about
``ingest.split_mb``: row groups copied as they are (picture bytes never decoded, every row
kept, in order), one Spark task per new part, committed as the kind's next snapshot through the
same plan as an append (:meth:`hierarchy.contracts.dataset.Dataset.commit_plan`). It runs after
an append once a folder holds more than ``ingest.compact_after`` small parts, or on demand.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

from hierarchy.contracts import storage
from hierarchy.contracts.dataset import Dataset, require_digest
from hierarchy.contracts.manifest import CommitPlan, KindEntry
from hierarchy.contracts.settings import Ingest

log = logging.getLogger(__name__)


def small_parts(entry: KindEntry, small_bytes: int) -> Dict[str, List[Tuple[str, int]]]:
    """{folder: [(part, bytes), ...]} of the kind's parts under ``small_bytes``, by name."""
    out: Dict[str, List[Tuple[str, int]]] = {}
    for folder, parts in (entry.parts or {}).items():
        small = sorted((p[0], p[2]) for p in parts if p[2] < small_bytes)
        if small:
            out[folder] = small
    return out


def bins(parts: List[Tuple[str, int]], target_bytes: int) -> List[List[str]]:
    """Consecutive parts grouped up to ``target_bytes`` each; a group of one is left alone."""
    groups: List[List[str]] = [[]]
    size = 0
    for name, nbytes in parts:
        if groups[-1] and size + nbytes > target_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return [g for g in groups if len(g) > 1]


def needs_compaction(entry: KindEntry, icfg: Ingest) -> bool:
    """Whether some folder of the kind holds more than ``compact_after`` small parts."""
    if not icfg.compact_after:
        return False
    small = small_parts(entry, int(icfg.compact_small_mb * (1 << 20)))
    return any(len(parts) > icfg.compact_after for parts in small.values())


def merge_parts(item) -> int:
    """One new part from several (row groups copied in order); returns its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sources, target, digests = item
    for src, digest in zip(sources, digests):  # a damaged part is refused, not merged
        require_digest(src, digest)
    out = storage.atomic_output(target)
    writer: Optional[pq.ParquetWriter] = None
    rows = 0
    try:
        for src in sources:
            fs, path = storage.resolve(src)
            with fs.open_input_file(path) as fh:
                pf = pq.ParquetFile(fh)
                if writer is None:
                    codec = pf.metadata.row_group(0).column(0).compression \
                        if pf.metadata.num_row_groups else "UNCOMPRESSED"
                    writer = pq.ParquetWriter(
                        out.tmp, pf.schema_arrow, filesystem=out.fs,
                        compression=None if codec == "UNCOMPRESSED" else codec.lower(),
                        write_statistics=[f.name for f in pf.schema_arrow
                                          if f.type != pa.binary()])
                for i in range(pf.metadata.num_row_groups):
                    group = pf.read_row_group(i)
                    writer.write_table(group, row_group_size=max(1, group.num_rows))
                    rows += group.num_rows
    except BaseException:
        if writer is not None:
            writer.close()
        out.discard()
        raise
    if writer is not None:
        writer.close()
    out.commit()
    return rows


def compact(spark, dataset: Dataset, kind: str, icfg: Ingest) -> Optional[dict]:
    """Merge the kind's small parts as its next snapshot; returns the snapshot's record, or
    None when there is nothing to merge. The caller holds the dataset's lock."""
    dataset.roll_forward(kind)
    manifest = dataset.manifest()
    entry = manifest.kinds[kind]
    snapshot = entry.snapshot + 1
    staging = dataset.staging(f"{kind}-compact-{snapshot:04d}")
    storage.remove(staging.root)
    tasks, moves, removes = [], [], []
    small = small_parts(entry, int(icfg.compact_small_mb * (1 << 20)))
    recorded = dataset.recorded_digests(kind)
    for folder, parts in sorted(small.items()):
        for i, group in enumerate(bins(parts, int(icfg.split_mb * (1 << 20)))):
            name = f"part-c{snapshot:04d}-{i:05d}.parquet"
            tasks.append(([dataset.path(folder, p) for p in group], staging.path(folder, name),
                          [recorded.get(dataset.path(folder, p)) for p in group]))
            moves.append((staging.path(folder, name), dataset.path(folder, name)))
            removes += [dataset.path(folder, p) for p in group]
    if not tasks:
        return None
    rows = spark.sparkContext.parallelize(tasks, len(tasks)).map(merge_parts).collect()
    record = {"snapshot": snapshot, "compacted": len(removes), "into": len(moves),
              "rows": int(sum(rows))}
    current = {k: v for k, v in entry.to_json().items()
               if k not in ("parts", "finished", "plan", "started")}
    done = {**current, "snapshot": snapshot,
            "snapshots": [*current.get("snapshots", []), record]}
    dataset.commit_plan(kind, CommitPlan(moves=moves, removes=removes, entry=done),
                        dataset.taxonomy())
    log.info("compacted %d small part(s) of the %s kind into %d", len(removes), kind,
             len(moves))
    return record
