"""The release gate of a run made for a new taxonomy version: ``evaluate --run-id NEW --against
OLD`` (Yan et al., CVPR 2021, "Positive-congruent training": a model update should not break
what the old model got right).

Both runs' val rows are in the predictions table (OLD's from its own evaluate, under its
version). Joined on ``product_id`` (Spark aggregations; only per-strategy counts and the set of
changed leaves reach the driver):

- **negative flip rate**: among val products whose label is the same under both versions
  (same ``true_category_id``: a leaf is its id in every version), the share OLD's
  recommended strategy got right and NEW's strategy gets wrong; positive flips beside it;
- **accuracy on the changed leaves**: NEW's level-3 accuracy on its val products whose leaf is
  new in NEW's version, or whose label differs from the one OLD's version gave them (the
  leaves a split, a merge or a move touched), the figure an overall accuracy hides.
"""

from __future__ import annotations

from typing import List, Optional

from hierarchy.contracts import versions
from hierarchy.contracts.dataset import VAL
from hierarchy.contracts.modelstore import ModelStore, check_run_id
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.infer.modelset import ScoringRefused


def old_strategy(models: str, old_run: str) -> str:
    """The strategy OLD ships (its recommendation); refused when OLD was never evaluated."""
    check_run_id(old_run, "--against")
    run = ModelStore(models).run(old_run)
    if not run.exists():
        raise ScoringRefused(f"--against {old_run}: {run.run_file} not found — no such run "
                             f"in {models}")
    chosen = run.recommended_strategy()
    if not chosen:
        raise ScoringRefused(f"--against {old_run}: run {old_run} was never evaluated; evaluate "
                             f"it on its own dataset first (`hierarchy evaluate --run-id "
                             f"{old_run} --data OLD_DATA`)")
    return chosen


def _rows(table, run_id: str, strategies: List[str]):
    from pyspark.sql import functions as F

    return table.where((F.col("run_id") == run_id) & (F.col("split") == VAL) &
                       F.col("strategy").isin(strategies) &
                       F.col("true_category_id").isNotNull() & ~F.col("fallback"))


def compare(spark, table_name: str, new_run: str, strategies: List[str], old_run: str,
            strategy: str, old_tax: Taxonomy, new_tax: Taxonomy) -> dict:
    """The gate's figures, per NEW strategy, against OLD's ``strategy``."""
    from pyspark.sql import functions as F

    table = spark.table(table_name)
    old = _rows(table, old_run, [strategy]).select(
        "product_id", F.col("category_id").alias("old_pred"),
        F.col("true_category_id").alias("old_truth"))
    if not old.limit(1).count():
        raise ScoringRefused(f"--against {old_run}: {table_name} holds no val rows of run "
                             f"{old_run} ({strategy}); evaluate it on its own dataset first")
    new = _rows(table, new_run, strategies).select(
        "strategy", "product_id", F.col("category_id").alias("pred"),
        F.col("true_category_id").alias("truth"))
    both = new.join(old, "product_id")
    same = F.col("truth") == F.col("old_truth")
    old_right, new_right = F.col("old_pred") == F.col("old_truth"), F.col("pred") == F.col("truth")
    n = lambda cond: F.sum(F.when(cond, 1).otherwise(0))  # noqa: E731
    flips = {r["strategy"]: r.asDict() for r in both.groupBy("strategy").agg(
        n(same).alias("same_label"), n(~same).alias("relabelled"),
        n(same & old_right).alias("old_right"),
        n(same & old_right & ~new_right).alias("negative_flips"),
        n(same & ~old_right & new_right).alias("positive_flips")).collect()}
    relabelled = {int(r[0]) for r in both.where(~same).select("truth").distinct().collect()}
    changed = sorted(relabelled | set(versions.diff_tables(old_tax, new_tax)["added"]))
    on_changed = {r["strategy"]: r.asDict() for r in new.where(F.col("truth").isin(changed))
                  .groupBy("strategy").agg(F.count("*").alias("products"),
                                           n(new_right).alias("right")).collect()}
    return {"run_id": old_run, "strategy": strategy, "taxonomy_version": old_tax.fingerprint,
            "changed_leaves": changed,
            "strategies": {s: _figures(flips.get(s), on_changed.get(s)) for s in strategies}}


def _ratio(num: Optional[int], den: Optional[int]) -> Optional[float]:
    return num / den if num is not None and den else None


def _figures(flips: Optional[dict], changed: Optional[dict]) -> dict:
    f, c = flips or {}, changed or {}
    return {"products_compared": f.get("same_label", 0), "relabelled": f.get("relabelled", 0),
            "negative_flips": f.get("negative_flips", 0),
            "positive_flips": f.get("positive_flips", 0),
            "negative_flip_rate": _ratio(f.get("negative_flips"), f.get("same_label")),
            "positive_flip_rate": _ratio(f.get("positive_flips"), f.get("same_label")),
            "old_accuracy_same_label": _ratio(f.get("old_right"), f.get("same_label")),
            "changed_leaf_products": c.get("products", 0),
            "changed_leaf_accuracy": _ratio(c.get("right"), c.get("products"))}
