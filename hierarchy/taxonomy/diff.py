"""``hierarchy taxonomy diff``: what changed between two versions of the category table.

From the two tables alone: leaves added, removed, renamed and moved
(:func:`hierarchy.contracts.versions.diff_tables`). With a dataset of each version, the leaves
split and merged, inferred from the labelled products present in both: Spark joins the two
``products`` tables on ``product_id`` (three small columns, never the pictures) and counts the
products of each (old category, new category) pair; only pairs holding at least
``taxonomy.min_share`` of their leaf's products reach the driver, a handful per leaf whatever
the catalog's size.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from hierarchy.contracts import storage, versions
from hierarchy.contracts.dataset import TRAIN, Dataset
from hierarchy.contracts.errors import UsageError
from hierarchy.contracts.taxonomy import Taxonomy


def read_version(path: str, flag: str) -> Taxonomy:
    """A version of the tree: a ``category_names.csv``, or a ``taxonomy.json`` that ingest
    wrote beside a dataset (or training beside a run)."""
    if path.endswith(".json"):
        storage.require_file(path, flag)
        try:
            return Taxonomy.from_json(storage.read_text(path), source=path)
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path}: not a taxonomy.json ({exc})") from None
    return Taxonomy.from_csv(path)


def check_data(data: str, flag: str, version: Taxonomy, table_flag: str) -> None:
    """Before Spark starts: a complete dataset, ingested under the version it stands for."""
    storage.require_dir(data, flag)
    have = Dataset(data).require_complete([TRAIN]).fingerprint
    if have != version.fingerprint:
        raise UsageError(f"{flag} {data}: ingested under taxonomy version {have[:19]}, but "
                         f"{table_flag} is {version.fingerprint[:19]}: name the dataset of "
                         f"that version")


def _labelled(spark, data: str, column: str):
    from pyspark.sql import functions as F

    return (spark.read.parquet(Dataset(data).url("products"))
                 .where((F.col("kind") == TRAIN) & F.col("category_id").isNotNull())
                 .select("product_id", F.col("category_id").alias(column)))


def product_moves(spark, old_data: str, new_data: str, min_share: float
                  ) -> Tuple[List[Tuple[int, int, int]], Dict[int, int], Dict[int, int]]:
    """(pairs (old category, new category, products) holding at least ``min_share`` of their
    old or new leaf's products, products per old leaf, products per new leaf), over the
    products labelled in both datasets."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    both = _labelled(spark, old_data, "old").join(_labelled(spark, new_data, "new"),
                                                   "product_id")
    pairs = both.groupBy("old", "new").count().persist()
    try:
        totals = [{int(r[0]): int(r[1]) for r in pairs.groupBy(side).agg(F.sum("count"))
                   .collect()} for side in ("old", "new")]  # a row per leaf
        out_total = F.sum("count").over(Window.partitionBy("old"))
        in_total = F.sum("count").over(Window.partitionBy("new"))
        kept = (pairs.withColumn("out_total", out_total).withColumn("in_total", in_total)
                     .where((F.col("count") >= min_share * F.col("out_total")) |
                            (F.col("count") >= min_share * F.col("in_total")))
                     .collect())
    finally:
        pairs.unpersist()
    return [(int(r["old"]), int(r["new"]), int(r["count"])) for r in kept], totals[0], totals[1]


def diff(old: Taxonomy, new: Taxonomy, spark=None, old_data: Optional[str] = None,
         new_data: Optional[str] = None, min_share: float = 0.05) -> dict:
    """The JSON object ``hierarchy taxonomy diff`` prints (keys and list items are category
    ids): the tables' differences, and with both datasets ``split`` and ``merged``."""
    got: dict = {"old": old.fingerprint, "new": new.fingerprint,
                 **versions.diff_tables(old, new)}
    if old_data is not None:
        pairs, out_totals, in_totals = product_moves(spark, old_data, new_data, min_share)
        split, merged = versions.split_and_merged(pairs, min_share, (out_totals, in_totals))
        got["split"] = {str(k): v for k, v in split.items()}
        got["merged"] = {str(k): v for k, v in merged.items()}
        got["products_compared"] = sum(out_totals.values())
    return got
