"""Fit the decision rule of each strategy on the val split (:mod:`hierarchy.infer.decide`).

One Spark pass for every strategy of the run, scored exactly as predict scores (images
grouped by product and sorted, each strategy's per-picture distributions aggregated per
product, models loaded once per Python worker and run once per picture for all strategies).
Each task reduces its products to sums over the temperature and threshold grids
(:func:`hierarchy.infer.decide.add_stats`), so only ``partitions`` x strategies rows of a few
thousand numbers reach the driver, whatever the size of val. Val is cut into two parts by a
hash of the product id (``decide.calibration_share`` of the products calibrate): the fit part
chooses the temperature (and, for the ``hierarchical`` strategy, its correction), the
calibration part certifies the threshold."""

from __future__ import annotations

import logging
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import pandas as pd

from hierarchy.contracts.dataset import VAL
from hierarchy.contracts.settings import Decide
from hierarchy.infer import decide
from hierarchy.infer.scoring import BatchScorer, ScoringPlan, score_products, whole_products

log = logging.getLogger(__name__)

STATS_DDL = "strategy string, stats array<double>"
HASH_SALT = "hierarchy.decide"   # a hash of its own: independent of calibrate's sampling
HASH_MOD = 1000003


def calibration_part(share: float):
    """Spark column: 1 for a val product of the calibration part, 0 for the fit part."""
    from pyspark.sql import functions as F

    h = F.abs(F.xxhash64(F.lit(HASH_SALT), F.col("product_id"))) % HASH_MOD
    return (h < F.lit(share * HASH_MOD)).cast("int")


def grids_of(dcfg: Decide) -> decide.Grids:
    temps = set(dcfg.temperatures) | {1.0}
    if dcfg.temperature:
        temps.add(dcfg.temperature)
    return decide.Grids(temperatures=tuple(sorted(temps)))


def decision_partitions(plans: Dict[str, ScoringPlan], grids: decide.Grids,
                        levels: Tuple[int, ...]):
    """``mapInPandas`` function: val image batches (sorted by product, with ``part``) -> one
    row of summed decision statistics per partition and strategy of ``plans``, each model
    run once per picture for them all (:meth:`BatchScorer._cached`)."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        scorers = {name: BatchScorer(plan) for name, plan in plans.items()}
        nodes = decide.Nodes.of(next(iter(scorers.values())).taxonomy)
        stats = {name: decide.empty_stats(grids) for name in plans}
        for pdf in whole_products(batches):
            first = pdf.drop_duplicates("product_id").set_index("product_id")
            decoded: Dict[Optional[int], list] = {}
            cache: dict = {}
            for name, scorer in scorers.items():
                if scorer.min_side not in decoded:
                    decoded[scorer.min_side] = scorer.decode_for_models(pdf["jpeg"])
                images = decoded[scorer.min_side]
                ok = np.array([im is not None for im in images], dtype=bool)
                if not ok.any():
                    continue  # no picture decoded: always review, never in the fit
                pids = pdf["product_id"].to_numpy(np.int64)[ok]
                ids, probs, _ = score_products(scorer, [im for im in images if im is not None],
                                               pids, cache)
                decide.add_stats(stats[name], probs, first.loc[ids, "l3"].to_numpy(np.int64),
                                 first.loc[ids, "part"].to_numpy(np.int64), nodes, grids,
                                 levels)
        yield pd.DataFrame({"strategy": list(stats),
                            "stats": [decide.flatten(s) for s in stats.values()]})

    return run


def fit(spark, cfg, data: str, plans: Dict[str, ScoringPlan], grouped=None
        ) -> Dict[str, Tuple[decide.DecisionRule, dict]]:
    """{strategy: (its rule, its val figures)} of every plan, from one pass (see the module
    notes). ``grouped``: val's pictures already grouped by product (:func:`grouped_split`)."""
    from hierarchy.infer.pipeline import by_product, read_images

    dcfg = cfg.decide
    grids = grids_of(dcfg)
    levels = dcfg.levels
    images = grouped if grouped is not None else by_product(
        read_images(spark, data, VAL), cfg.predict.partitions)
    images = images.where("l3 IS NOT NULL") \
        .withColumn("part", calibration_part(dcfg.calibration_share))
    rows = (images.mapInPandas(decision_partitions(plans, grids, levels), STATS_DDL)
            .collect())  # one small row per partition and strategy
    stats = {name: decide.empty_stats(grids) for name in plans}
    for r in rows:
        for k, v in decide.unflatten(r.stats, grids).items():
            stats[r.strategy][k] += v
    forced = dcfg.temperature or None
    out = {}
    for name in plans:
        rule, figures = decide.fit_rule(stats[name], grids, dcfg.target_precision,
                                        levels, dcfg.confidence, temperature=forced)
        if rule.threshold is None:
            log.warning("decisions (%s): nothing will be filed — %s", name, rule.reason)
        out[name] = rule, figures
    return out


def val_part_filter(dcfg: Decide):
    """Spark column: the val products of the fit part (what calibrate may fit on)."""
    return calibration_part(dcfg.calibration_share) == 0
