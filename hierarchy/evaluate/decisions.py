"""Fit the decision rule of one strategy on the val split (:mod:`hierarchy.infer.decide`).

One Spark pass, scored exactly as predict scores (images grouped by product and sorted, the
strategy's per-picture distributions aggregated per product, models loaded once per Python
worker). Each task reduces its products to sums over the temperature and threshold grids
(:func:`hierarchy.infer.decide.add_stats`), so only ``partitions`` rows of a few thousand
numbers reach the driver, whatever the size of val. Val is cut into two parts by a hash of
the product id (``decide.calibration_share`` of the products calibrate): the fit part chooses
the temperature (and, for the ``hierarchical`` strategy, its correction), the calibration part
certifies the threshold.
"""

from __future__ import annotations

import logging
from typing import Iterator, Tuple

import numpy as np
import pandas as pd

from hierarchy.dataset import VAL
from hierarchy.infer import decide
from hierarchy.infer.scoring import BatchScorer, ScoringPlan, score_products, whole_products

log = logging.getLogger(__name__)

STATS_DDL = "stats array<double>"
HASH_SALT = "hierarchy.decide"   # a hash of its own: independent of calibrate's sampling
HASH_MOD = 1000003


def calibration_part(share: float):
    """Spark column: 1 for a val product of the calibration part, 0 for the fit part."""
    from pyspark.sql import functions as F

    h = F.abs(F.xxhash64(F.lit(HASH_SALT), F.col("product_id"))) % HASH_MOD
    return (h < F.lit(share * HASH_MOD)).cast("int")


def grids_of(dcfg: dict) -> decide.Grids:
    temps = {float(t) for t in dcfg["temperatures"]} | {1.0}
    if dcfg["temperature"]:
        temps.add(float(dcfg["temperature"]))
    return decide.Grids(temperatures=tuple(sorted(temps)))


def decision_partitions(plan: ScoringPlan, grids: decide.Grids, levels: Tuple[int, ...]):
    """``mapInPandas`` function: val image batches (sorted by product, with ``part``) -> one
    row of summed decision statistics per partition."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        scorer = BatchScorer(plan)
        nodes = decide.Nodes.of(scorer.taxonomy)
        stats = decide.empty_stats(grids)
        for pdf in whole_products(batches):
            images = scorer.decode_for_models(pdf["jpeg"])
            ok = np.array([im is not None for im in images], dtype=bool)
            if not ok.any():
                continue  # no picture decoded: always review, never in the fit
            pids = pdf["product_id"].to_numpy(np.int64)[ok]
            ids, probs, _ = score_products(scorer, [im for im in images if im is not None],
                                           pids)
            first = pdf.drop_duplicates("product_id").set_index("product_id")
            decide.add_stats(stats, probs, first.loc[ids, "l3"].to_numpy(np.int64),
                             first.loc[ids, "part"].to_numpy(np.int64), nodes, grids, levels)
        yield pd.DataFrame({"stats": [decide.flatten(stats)]})

    return run


def fit(spark, cfg, data: str, plan: ScoringPlan) -> Tuple[decide.DecisionRule, dict]:
    """The rule of ``plan``'s strategy and its val figures (see the module notes)."""
    from hierarchy.infer.pipeline import by_product, read_images

    dcfg = cfg["decide"]
    grids = grids_of(dcfg)
    levels = tuple(int(x) for x in dcfg["levels"])
    images = read_images(spark, data, VAL).where("l3 IS NOT NULL") \
        .withColumn("part", calibration_part(float(dcfg["calibration_share"])))
    rows = (by_product(images, int(cfg["predict"]["partitions"]))
            .mapInPandas(decision_partitions(plan, grids, levels), STATS_DDL)
            .collect())  # one small row per partition
    stats = decide.empty_stats(grids)
    for r in rows:
        for k, v in decide.unflatten(r.stats, grids).items():
            stats[k] += v
    forced = float(dcfg["temperature"]) or None
    rule, figures = decide.fit_rule(stats, grids, float(dcfg["target_precision"]), levels,
                                    float(dcfg["confidence"]), temperature=forced)
    if rule.threshold is None:
        log.warning("decisions (%s): nothing will be filed — %s", plan.models.strategy,
                    rule.reason)
    return rule, figures


def val_part_filter(dcfg: dict):
    """Spark column: the val products of the fit part (what calibrate may fit on)."""
    return calibration_part(float(dcfg["calibration_share"])) == 0
