"""Duplicate product ids: the first usable occurrence in file order is kept.

Inputs of one kind are ordered as given on the command line, documents by offset inside a file.
A later document whose ``_id`` is already a kept product becomes a ``duplicate_id`` quarantine
row naming the kept one's file and offset; an earlier occurrence that was itself unusable
(quarantined for another reason) does not count, so the good copy survives.

Two steps, because a decode task only sees its own byte range:

1. inside a range, the task itself keeps the first occurrence (:class:`RangeDeduplicator`);
   after that a range holds at most one product per id;
2. across ranges and files, a Spark window over the staged ``products`` (no JPEGs: a few
   columns per product) ranks each id's occurrences, and one task per affected range drops
   the later ones from that range's part files (Parquet rows filtered and rewritten per row
   group: picture bytes are copied, never decoded) and writes their quarantine rows.

Duplicates are rare in real dumps, so step 2 usually has nothing to do: when the offset
index already proves that no id occurs in two ranges (:func:`may_repeat_across_ranges`), it
is skipped, and with it a Spark job over every product row.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence

from hierarchy.contracts import storage
from hierarchy.contracts.dataset import KIND_SPLITS, Dataset
from hierarchy.ingest import decode as dec

RANGE_PART = r"part-(\d+)\.parquet$"


def part_name(range_id: int, suffix: str = "") -> str:
    return f"part-{range_id:05d}{suffix}.parquet"


def duplicate_row(source: str, offset: int, length: int, product_id: int,
                  first_source: str, first_offset: int) -> dict:
    where = "" if first_source == source else f" of {first_source}"
    return {"source": source, "offset": offset, "length": length, "product_id": product_id,
            "img_idx": None, "level": dec.DOCUMENT, "reason": dec.DUPLICATE_ID,
            "detail": f"_id {product_id} was already taken by the document at offset "
                      f"{first_offset}{where}; the first occurrence in file order is kept"}


class RangeDeduplicator:
    """Step 1, inside a decode task: the first kept document of an id wins."""

    def __init__(self, source: str):
        self.source = source
        self.first: Dict[int, int] = {}

    def claim(self, product_id: int, offset: int) -> bool:
        """True (and the id is now taken) when no kept document of this range had it."""
        if product_id in self.first:
            return False
        self.first[product_id] = offset
        return True

    def check(self, out: dec.Outcome, offset: int, length: int) -> dec.Outcome:
        if out.product is None:
            return out
        pid = out.product["product_id"]
        if pid not in self.first:
            self.first[pid] = offset
            return out
        return dec.Outcome(None, [], [duplicate_row(self.source, offset, length, pid,
                                                    self.source, self.first[pid])])


def may_repeat_across_ranges(product_ids, n_docs: Sequence[int]) -> bool:
    """False only when the scan's ids (documents in task order, ``n_docs`` per task) prove
    that no id occurs in two ranges. The decode keeps a document only when its ``_id`` is
    the one the scan read from its head, so an id the scan could not read (another shape,
    NO_VALUE) leaves the question open."""
    import numpy as np

    from hierarchy.ingest.scan import NO_VALUE

    pids = np.asarray(product_ids, dtype=np.int64)
    if len(n_docs) < 2 or len(pids) < 2:
        return False
    if (pids == NO_VALUE).any():
        return True
    task = np.repeat(np.arange(len(n_docs)), n_docs)
    order = np.lexsort((task, pids))
    p, t = pids[order], task[order]
    return bool(((p[1:] == p[:-1]) & (t[1:] != t[:-1])).any())


def find_cross_range(spark, products_url: str, sources: Sequence[str]):
    """Step 2a: staged product rows that repeat an id kept earlier in file order, with the
    kept one's place. A Spark window over ids: nothing but the duplicates leaves it."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = F.create_map(*[F.lit(x) for i, s in enumerate(sources) for x in (s, i)])[
        F.col("source")]
    products = (spark.read.parquet(products_url)
                .select("product_id", "split", "l1", "n_images", "source", "offset", "length",
                        F.regexp_extract(F.input_file_name(), RANGE_PART, 1).cast("int")
                        .alias("range_id"))
                .withColumn("file_order", order))
    w = Window.partitionBy("product_id").orderBy("file_order", "offset")
    return (products.withColumn("rank", F.row_number().over(w))
                    .withColumn("first_source", F.first("source").over(w))
                    .withColumn("first_offset", F.first("offset").over(w))
                    .where(F.col("rank") > 1)
                    .drop("rank", "file_order"))


def filter_part(url: str, drop: set, out: Optional[str] = None) -> Dict[str, int]:
    """Rewrite a part file without the rows of ``drop`` product ids, row group by row group
    (bytes copied, never decoded), in place or, given ``out``, as a new file there (none
    when no row is left); returns {"rows": removed, "bytes": their nbytes, "row_groups":
    left in the file, or None when nothing was written because none match}."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not storage.exists(url):
        return {"rows": 0, "bytes": 0, "row_groups": None}
    ids = pa.array(sorted(drop), pa.int64())
    fs, path = storage.resolve(url)
    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        column = pf.read(columns=["product_id"]).column(0)
        if not pc.any(pc.is_in(column, value_set=ids)).as_py():
            return {"rows": 0, "bytes": 0, "row_groups": None}
        removed = {"rows": 0, "bytes": 0, "row_groups": 0}
        target = out
        out = storage.atomic_output(target or url)  # a retry finds the old or the new file
        writer: Optional[pq.ParquetWriter] = None
        try:
            for i in range(pf.metadata.num_row_groups):
                group = pf.read_row_group(i)
                hit = pc.is_in(group.column("product_id"), value_set=ids)
                removed["rows"] += pc.sum(hit).as_py() or 0
                if "nbytes" in group.column_names:
                    removed["bytes"] += pc.sum(pc.filter(group.column("nbytes"), hit)).as_py() \
                        or 0
                kept = group.filter(pc.invert(hit))
                if writer is None:
                    # the codec the file was written with (ingest.compression for images/)
                    codec = pf.metadata.row_group(0).column(0).compression
                    writer = pq.ParquetWriter(
                        out.tmp, pf.schema_arrow, filesystem=out.fs,
                        compression=None if codec == "UNCOMPRESSED" else codec.lower(),
                        write_statistics=[f.name for f in pf.schema_arrow
                                          if f.type != pa.binary()])
                if kept.num_rows:
                    writer.write_table(kept, row_group_size=kept.num_rows)
                    removed["row_groups"] += 1
        except BaseException:
            if writer is not None:
                writer.close()
            out.discard()
            raise
        writer.close()
    if target is not None and not removed["row_groups"]:
        out.discard()  # every row dropped: the new snapshot has no such part
    else:
        out.commit()
    return removed


def drop_in_range(range_id: int, rows: Iterable[dict], staging: Dataset, kind: str) -> dict:
    """Step 2b, one task per affected range: drop the duplicates from its part files and
    write their quarantine rows. Returns the change to the manifest counts (the shape of a
    decode task's stats, with negative product/image counts)."""
    from hierarchy.contracts.schema import QUARANTINE_FILE, images_key
    from hierarchy.ingest.writer import write_table

    rows = list(rows)
    drop = {int(r["product_id"]) for r in rows}
    # the quarantine rows first: a retry after a crash rewrites the same file
    write_table(storage.join(staging.quarantine(kind), part_name(range_id, "-duplicates")),
                [duplicate_row(r["source"], r["offset"], r["length"], r["product_id"],
                               r["first_source"], r["first_offset"]) for r in rows],
                QUARANTINE_FILE)

    image_bytes, row_groups = 0, {}
    for split in KIND_SPLITS[kind]:
        done = filter_part(storage.join(staging.images(split), part_name(range_id)), drop)
        image_bytes += done["bytes"]
        if done["row_groups"] is not None:
            row_groups[images_key(split, part_name(range_id))] = done["row_groups"]
    filter_part(storage.join(staging.products(kind), part_name(range_id)), drop)
    products: Counter = Counter()
    images: Counter = Counter()
    images_l1: Counter = Counter()
    dropped: Counter = Counter()
    for r in rows:
        products[r["split"]] -= 1
        images[r["split"]] -= r["n_images"]
        if r["l1"] is not None:
            images_l1[(r["split"], r["l1"])] -= r["n_images"]
        dropped[r["source"]] += 1
    return {"documents": 0, "bad_documents": len(rows), "image_bytes": -image_bytes,
            "products": dict(products), "images": dict(images),
            "images_l1": dict(images_l1),
            "products_by_source": {s: -n for s, n in dropped.items()},
            "quarantine": {dec.DUPLICATE_ID: len(rows)},
            "quarantine_by_source": {s: {dec.DUPLICATE_ID: n} for s, n in dropped.items()},
            "row_groups": row_groups}


def resolve(spark, staging: Dataset, kind: str, sources: Sequence[str]) -> List[dict]:
    """Steps 2a and 2b over a staged ingest; returns one stats delta per rewritten range."""
    if not storage.list_dir(staging.products(kind)):
        return []
    dups = find_cross_range(spark, storage.to_url(staging.products(kind)), sources)

    def fix(item):
        range_id, group = item
        return drop_in_range(range_id, [r.asDict() for r in group], staging, kind)

    return (dups.rdd.map(lambda r: (r.range_id, r)).groupByKey()
                .map(fix).collect())
