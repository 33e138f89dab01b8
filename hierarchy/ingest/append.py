"""``hierarchy ingest --append``: a dump added to a kind as a new snapshot of the dataset.

A nightly dump holds new products and re-sent ones. The dump is decoded into a staging folder
exactly as a full ingest decodes it (same tasks, same quarantine, same duplicate rule inside
the dump); then, instead of replacing the kind's partitions:

classify  each staged product against the kind's current snapshot by its content digest
          (:mod:`hierarchy.contracts.digest`: category, picture MD5s, unusable pictures), in one
          Spark job over the small columns (no JPEG is read): *added* (a new id), *unchanged*
          (the same id and digest: dropped from the staging, so appending a dump twice changes
          nothing) or *replaced* (the same id, another digest);
rewrite   the current parts that hold a replaced product, without its rows, as new parts
          (copy on write: row groups filtered, picture bytes copied, never decoded), one Spark
          task per part: the cost follows the parts the change touches, not the catalog;
commit    a plan (:class:`hierarchy.contracts.manifest.CommitPlan`) written into the manifest
          first: the staged parts moved in under the snapshot's names (``part-a<N>-...``),
          the rewritten parts moved in, the parts they replace removed, the kind's entry with
          its new counts, snapshot number and history written last
          (:meth:`hierarchy.contracts.dataset.Dataset.commit_plan`). A kill before the plan
          is written leaves the snapshot before, whole; a kill after it is rolled forward by
          the next append or compaction.

Where the dump gives a product's split: the kind's recorded ``val_fraction``, ``split_seed``
and ``val_draw`` (a re-sent product keeps its split); with ``val_draw: category`` each
category's first product is chosen within the dump alone.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote

from hierarchy.contracts import storage
from hierarchy.contracts.dataset import KIND_SPLITS, KINDS, Dataset, require_digest
from hierarchy.contracts.digest import DIGEST, product_digests
from hierarchy.contracts.manifest import CommitPlan, KindEntry
from hierarchy.contracts.schema import IMAGES_FILE, PRODUCTS_FILE
from hierarchy.contracts.settings import Ingest
from hierarchy.ingest.duplicates import filter_part

log = logging.getLogger(__name__)

ADDED, UNCHANGED, REPLACED = "added", "unchanged", "replaced"


@dataclass(frozen=True)
class Delta:
    """What a staged dump changes: products per status, the part files (relative to the
    dataset or the staging: ``folder/name``) holding products to drop, and the counts those
    drops take away ({"products": {split: n}, "images": {split: n}, "images_l1": {(split,
    l1): n}})."""

    statuses: Dict[str, int]
    drop_staged: Dict[str, List[int]]
    drop_current: Dict[str, List[int]]
    removed: dict


def split_config(entry: Optional[KindEntry], icfg: Ingest) -> Tuple[float, int, str]:
    """(val_fraction, split_seed, val_draw) an append assigns splits with: the kind's recorded
    ones, so a re-sent product lands in the split it is in; the configuration's for a kind
    ingested before they were recorded."""
    config = ((entry.model_extra or {}).get("config") or {}) if entry else {}
    return (float(config.get("val_fraction", icfg.val_fraction)),
            int(config.get("split_seed", icfg.split_seed)),
            str(config.get("val_draw", "category" if config else icfg.val_draw)))


def _read(spark, ds: Dataset, table: str, kind: str):
    """(products of ``kind``, its pictures) of a dataset or a staging folder, small columns
    only, each row with the part it came from (``_file``: ``folder/name``)."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    splits = KIND_SPLITS[kind]
    if table == "products":
        folders = [f"products/kind={kind}"]
        cols, schema = ["product_id", "category_id", "split", "l1", "n_images",
                        "n_bad_images"], PRODUCTS_FILE
    else:
        folders = [f"images/split={s}" for s in splits]
        cols, schema = ["product_id", "img_idx", "md5"], IMAGES_FILE
    files = [loc for f in folders for loc in storage.list_files(ds.path(f), ".parquet")]
    spark_schema = from_arrow_schema(schema)
    if not files:
        return spark.createDataFrame([], spark_schema).select(
            *cols, F.lit(None).cast("string").alias("_file"))
    # the last two segments of the file's URI: its partition folder and its name
    part = F.regexp_extract(F.input_file_name(), r"([^/]+/[^/]+)$", 1)
    return (spark.read.schema(spark_schema).parquet(*[storage.to_url(f) for f in files])
                 .select(*cols, part.alias("_file")))


def classify(spark, dataset: Dataset, staging: Dataset, kind: str) -> Delta:
    """Each staged product's status against the current snapshot, and what to drop where.
    What reaches the driver is the size of the dump (ids, files), never the catalog's."""
    from pyspark.sql import functions as F

    staged_p, staged_i = _read(spark, staging, "products", kind), \
        _read(spark, staging, "images", kind)
    cur_p, cur_i = _read(spark, dataset, "products", kind), _read(spark, dataset, "images", kind)
    new = product_digests(staged_p, staged_i)
    ids = new.select("product_id")
    cur_p = cur_p.join(ids, "product_id", "left_semi")
    cur_i = cur_i.join(ids, "product_id", "left_semi")
    old = product_digests(cur_p, cur_i).withColumnRenamed(DIGEST, "_old")
    status = (new.join(old, "product_id", "left")
                 .select("product_id",
                         F.when(F.col("_old").isNull(), F.lit(ADDED))
                          .when(F.col("_old") == F.col(DIGEST), F.lit(UNCHANGED))
                          .otherwise(F.lit(REPLACED)).alias("status"))
                 .localCheckpoint())
    statuses = {r.status: int(r["count"]) for r in status.groupBy("status").count().collect()}
    unchanged = status.where(F.col("status") == UNCHANGED).select("product_id")
    replaced = status.where(F.col("status") == REPLACED).select("product_id")
    # one collect: the parts and product rows each drop touches (the dump's size at most)
    rows = _touched(staged_p, staged_i, unchanged, "staged").unionByName(
        _touched(cur_p, cur_i, replaced, "current")).collect()
    drops: Dict[str, Dict[str, set]] = {"staged": {}, "current": {}}
    removed = {"products": Counter(), "images": Counter(), "images_l1": Counter()}
    for r in rows:
        drops[r._where].setdefault(_folder_name(r._file), set()).add(int(r.product_id))
        if r.split is not None:  # a products row: what the drop takes from the counts
            removed["products"][r.split] += 1
            removed["images"][r.split] += int(r.n_images)
            if r.l1 is not None:
                removed["images_l1"][(r.split, int(r.l1))] += int(r.n_images)
    return Delta(statuses=statuses,
                 drop_staged={f: sorted(ids) for f, ids in drops["staged"].items()},
                 drop_current={f: sorted(ids) for f, ids in drops["current"].items()},
                 removed=removed)


def _touched(products, images, ids, where: str):
    """(where, part, product_id, split, l1, n_images) of every row of ``ids`` in the parts:
    a products row with its counts, a picture row with nulls."""
    from pyspark.sql import functions as F

    cols = ["split", "l1", "n_images"]
    p = products.join(ids, "product_id", "left_semi").select(
        F.lit(where).alias("_where"), "_file", "product_id", *cols)
    i = images.join(ids, "product_id", "left_semi").select(
        F.lit(where).alias("_where"), "_file", "product_id",
        *[F.lit(None).cast(t).alias(c) for c, t in zip(cols, ("string", "int", "int"))])
    return p.unionByName(i)


def _folder_name(file: str) -> str:
    """``split=train/part-1.parquet`` -> ``images/split=train/part-1.parquet``."""
    folder, name = unquote(file).split("/")
    table = "images" if folder.startswith("split=") else "products"
    return f"{table}/{folder}/{name}"


def _filter(item) -> Tuple[str, int]:
    src, out, ids, digest = item
    require_digest(src, digest)
    return src, int(filter_part(src, set(ids), out)["bytes"])


def snapshot_name(snapshot: int, name: str) -> str:
    """A staged part's name in the dataset: ``part-00003.parquet`` of snapshot 2 ->
    ``part-a0002-00003.parquet``, never the name of a part of another snapshot."""
    return f"part-a{snapshot:04d}-{name[len('part-'):]}"


def rewrite(spark, dataset: Dataset, staging: Dataset, delta: Delta,
            snapshot: int) -> Tuple[List[Tuple[str, str]], List[str], int]:
    """Drop the unchanged products from the staged parts and the replaced ones from copies
    of the current parts (Spark tasks, one per part); returns (moves: [staged part, its
    place], removes: parts replaced, picture bytes the drops took away from the current
    snapshot)."""
    moves, removes, tasks = [], [], []
    for rel, ids in sorted(delta.drop_staged.items()):
        tasks.append((staging.path(rel), None, ids, None))
    recorded = {url: d for kind in KINDS for url, d in dataset.recorded_digests(kind).items()}
    for i, (rel, ids) in enumerate(sorted(delta.drop_current.items())):
        folder = rel.rsplit("/", 1)[0]
        new = f"part-a{snapshot:04d}-r{i:05d}.parquet"
        tasks.append((dataset.path(rel), staging.path("rewritten", folder, new), ids,
                      recorded.get(dataset.path(rel))))
        moves.append((staging.path("rewritten", folder, new), dataset.path(folder, new)))
        removes.append(dataset.path(rel))
    removed_bytes = 0
    if tasks:
        done = spark.sparkContext.parallelize(tasks, len(tasks)).map(_filter).collect()
        removed_bytes = sum(b for src, b in done if not src.startswith(staging.root))
    moves = [(s, d) for s, d in moves if storage.exists(s)]  # a part left with no row
    return moves, removes, removed_bytes


def staged_moves(dataset: Dataset, staging: Dataset, kind: str,
                 snapshot: int) -> List[Tuple[str, str]]:
    """Every staged part with a row, to its place under the snapshot's name."""
    folders = dataset.folders(kind) + [f"quarantine/kind={kind}"]
    moves = []
    for folder in folders:
        for name, loc, is_file in storage.list_dir(staging.path(folder)):
            if is_file and name.endswith(".parquet") and storage.parquet_rows(loc):
                moves.append((loc, dataset.path(folder, snapshot_name(snapshot, name))))
    return moves


def merged_counts(old: dict, dump: dict, removed: dict, removed_bytes: int) -> dict:
    """The kind's counts after the append: the dump's added to the snapshot's, less what the
    drops took away (unchanged products from the dump, replaced ones from the snapshot)."""
    per_split: Dict[str, dict] = {}
    for split in sorted(set(old.get("per_split", {})) | set(dump.get("per_split", {}))):
        a = old.get("per_split", {}).get(split, {})
        b = dump.get("per_split", {}).get(split, {})
        l1s: Counter = Counter(a.get("images_per_l1", {}))
        l1s.update(b.get("images_per_l1", {}))
        for (s, l1), n in removed["images_l1"].items():
            if s == split:
                l1s[str(l1)] -= n
        per_split[split] = {
            "products": a.get("products", 0) + b.get("products", 0)
            - removed["products"].get(split, 0),
            "images": a.get("images", 0) + b.get("images", 0) - removed["images"].get(split, 0),
            "images_per_l1": {k: n for k, n in sorted(l1s.items(), key=lambda x: int(x[0]))
                              if n > 0}}
    quarantine: Counter = Counter(old.get("quarantine", {}))
    quarantine.update(dump.get("quarantine", {}))
    summed = {k: old.get(k, 0) + dump.get(k, 0)
              for k in ("documents", "bad_documents", "corrupt_regions", "corrupt_bytes",
                        "input_bytes")}
    return {**old, **summed,
            "image_bytes": old.get("image_bytes", 0) + dump.get("image_bytes", 0)
            - removed_bytes,
            "products": sum(s["products"] for s in per_split.values()),
            "images": sum(s["images"] for s in per_split.values()),
            "per_split": per_split, "quarantine": dict(sorted(quarantine.items()))}


def commit_append(spark, dataset: Dataset, staging: Dataset, kind: str, entry: KindEntry,
                  dump: dict, record: dict, taxonomy) -> dict:
    """Classify, rewrite and commit a staged dump as the kind's next snapshot; returns the
    kind's entry and the append's record (``append``). Nothing is committed when the dump
    changes nothing."""
    delta = classify(spark, dataset, staging, kind)
    snapshot = entry.snapshot + 1
    record = {"snapshot": snapshot, **record,
              **{s: delta.statuses.get(s, 0) for s in (ADDED, REPLACED, UNCHANGED)}}
    current = {k: v for k, v in entry.to_json().items()
               if k not in ("parts", "finished", "plan", "started")}
    if not record[ADDED] and not record[REPLACED]:
        storage.remove(staging.root)
        dataset.drop_empty_staging()
        log.info("the dump changes nothing: %d product(s) already in the %s kind as sent",
                 record[UNCHANGED], kind)
        return {**current, "append": {**record, "snapshot": entry.snapshot,
                                      "committed": False}}
    moves, removes, removed_bytes = rewrite(spark, dataset, staging, delta, snapshot)
    moves = staged_moves(dataset, staging, kind, snapshot) + moves
    record.update(parts_added=len(moves), parts_removed=len(removes), committed=True)
    done = {**current, "status": "complete",
            "counts": merged_counts(current.get("counts", {}), dump, delta.removed,
                                    removed_bytes),
            "snapshot": snapshot,
            "snapshots": [*current.get("snapshots", []), record]}
    manifest = dataset.commit_plan(kind, CommitPlan(moves=moves, removes=removes, entry=done),
                                   taxonomy)
    return {**manifest.kinds[kind].to_json(), "append": record}
