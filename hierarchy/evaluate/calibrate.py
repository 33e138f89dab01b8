"""Fit the ``hierarchical`` strategy on the val split: the temperature of the multi-level
model's level-3 output and the weights (w, v) of its per-branch experts and level-1 head
(:func:`hierarchy.infer.combine.hierarchical_correction`).

One Spark pass, scored like predict (images grouped by product, sorted, models loaded once
per Python worker). Each task reduces its products to a few sums per grid point — level-3
hits and negative log-likelihood — so only ``partitions x grid`` numbers reach the driver,
whatever the size of val. The point with the most hits wins (lowest NLL among equals, the
uncorrected model first among those): fitted this way the strategy cannot score below the
multi-level model's own level 3 on val.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Iterator

import numpy as np
import pandas as pd

from hierarchy.contracts.dataset import VAL
from hierarchy.contracts.manifest import Manifest
from hierarchy.contracts.settings import Calibrate
from hierarchy.infer import combine
from hierarchy.infer.modelset import IDENTITY, ModelSet
from hierarchy.infer.scoring import BatchScorer, ScoringPlan, whole_products

log = logging.getLogger(__name__)

STATS_DDL = "hits array<double>, nll array<double>, products long, pictures long"


def grid_of(ccfg: Calibrate) -> np.ndarray:
    return combine.correction_grid(ccfg.temperatures, ccfg.w, ccfg.v)


def calibration_partitions(plan: ScoringPlan, grid: np.ndarray):
    """``mapInPandas`` function: image batches (sorted by product within the partition) ->
    one row of summed grid statistics per partition."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from hierarchy.contracts.model import CONDITIONAL, L1_HEAD, L3_OUTPUT

        scorer = BatchScorer(plan)
        expert_groups = scorer.expert_groups()
        hits, nlls = np.zeros(len(grid)), np.zeros(len(grid))
        products = pictures = 0
        for pdf in whole_products(batches):
            images = scorer.decode_for_models(pdf["jpeg"])
            ok = np.array([im is not None for im in images], dtype=bool)
            if not ok.any():
                continue
            out = scorer.components([im for im in images if im is not None])
            h, n, count = combine.correction_stats(
                out[L3_OUTPUT], scorer.taxonomy, grid, pdf["product_id"].to_numpy()[ok],
                pdf["l3"].to_numpy(np.int64)[ok], p_branch=out[CONDITIONAL],
                p_l1=out[L1_HEAD], expert_groups=expert_groups)
            hits += h
            nlls += n
            products += count
            pictures += int(ok.sum())
        yield pd.DataFrame({"hits": [hits.tolist()], "nll": [nlls.tolist()],
                            "products": [products], "pictures": [pictures]})

    return run


def fit(spark, cfg, data: str, manifest: Manifest, plan: ScoringPlan, where=None,
        grouped=None) -> dict:
    """The fitted calibration, as run.json records it. ``where``: a Spark column keeping the
    val products it may fit on (evaluate keeps the decisions' calibration part out);
    ``grouped``: val's pictures already grouped by product (:func:`grouped_split`)."""
    from pyspark.sql import functions as F

    from hierarchy.infer.pipeline import by_product, read_images

    ccfg = cfg.calibrate
    grid = grid_of(ccfg)
    images = grouped if grouped is not None else read_images(spark, data, VAL)
    if where is not None:
        images = images.where(where)
    total = manifest.images(VAL)
    val_products = manifest.split(VAL).products or total
    share = min(1.0, ccfg.max_products / max(1, val_products))
    if share < 1.0:
        # a fixed hash sample of products (all of a product's pictures, or none)
        images = images.where((F.abs(F.xxhash64("product_id")) % 1000003) < share * 1000003)
    if grouped is None:
        images = by_product(images, cfg.predict.partitions)
    stats = (images.mapInPandas(calibration_partitions(plan, grid), STATS_DDL)
             .collect())  # one small row per partition
    hits = np.sum([r.hits for r in stats], axis=0) if stats else np.zeros(len(grid))
    nlls = np.sum([r.nll for r in stats], axis=0) if stats else np.zeros(len(grid))
    products = int(sum(r.products for r in stats))
    if products == 0:
        log.warning("calibration: no val product to fit on; the hierarchical strategy stays "
                    "the multi-level model's level 3")
        return {**IDENTITY, "model": plan.models.multi.key, "products": 0}
    best = combine.best_correction(grid, hits, nlls)
    t, w, v = (float(x) for x in grid[best])
    return {"temperature": t, "w": w, "v": v, "model": plan.models.multi.key,
            "products": products,
            "pictures": int(sum(r.pictures for r in stats)),
            "sampled_share": share,
            "val_accuracy_l3": float(hits[best] / products),
            "val_accuracy_l3_uncorrected": float(hits[0] / products),
            "val_nll": float(nlls[best] / products),
            "val_nll_uncorrected": float(nlls[0] / products),
            "grid": {"temperatures": list(ccfg.temperatures), "w": list(ccfg.w),
                     "v": list(ccfg.v)}}


def modelset_for_calibration(modelset: ModelSet) -> ModelSet:
    return replace(modelset, strategy="multi", calibration=dict(IDENTITY))
