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
from typing import Iterator, Optional, Tuple

import numpy as np
import pandas as pd

from hierarchy.contracts.dataset import VAL
from hierarchy.contracts.manifest import Manifest
from hierarchy.contracts.settings import Calibrate, Settings
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.infer import combine
from hierarchy.infer.modelset import IDENTITY, ModelSet
from hierarchy.infer.scoring import BatchScorer, ScoringPlan, whole_products

log = logging.getLogger(__name__)

STATS_DDL = "hits array<double>, nll array<double>, products long, pictures long"


def grid_of(ccfg: Calibrate) -> np.ndarray:
    return correction_grid(ccfg.temperatures, ccfg.w, ccfg.v)


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
            h, n, count = correction_stats(
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


def fit(spark, cfg: Settings, data: str, manifest: Manifest, plan: ScoringPlan, where=None,
        grouped=None) -> dict:
    """The fitted calibration, as run.json records it. ``where``: a Spark column keeping the
    val products it may fit on (evaluate keeps the decisions' calibration part out);
    ``grouped``: val's pictures already grouped by product
    (:func:`~hierarchy.infer.pipeline.grouped_split`)."""
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
        return {**IDENTITY, "model": plan.models.multilevel.key, "products": 0}
    best = best_correction(grid, hits, nlls)
    t, w, v = (float(x) for x in grid[best])
    return {"temperature": t, "w": w, "v": v, "model": plan.models.multilevel.key,
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
    """The uncorrected model the correction is fitted on: its outputs as ``multi`` reads them."""
    return replace(modelset, strategy="multi", base="multi", params=(),
                   calibration=dict(IDENTITY))


# ----------------------------------------------------------------------------- the grid
def correction_grid(temperatures, ws, vs) -> np.ndarray:
    """Every (temperature, w, v) to try, [G, 3]; (1, 0, 0) — the uncorrected model — first."""
    grid = [(1.0, 0.0, 0.0)] + [(float(t), float(w), float(v)) for t in temperatures
                                for w in ws for v in vs]
    seen, out = set(), []
    for point in grid:
        if point not in seen:
            seen.add(point)
            out.append(point)
    return np.asarray(out, dtype=np.float64)


def correction_stats(p3: np.ndarray, taxonomy: Taxonomy, grid: np.ndarray,
                     groups: np.ndarray, labels: np.ndarray,
                     p_branch: Optional[np.ndarray] = None, p_l1: Optional[np.ndarray] = None,
                     eps: float = 1e-7, expert_groups: Optional[np.ndarray] = None
                     ) -> Tuple[np.ndarray, np.ndarray, int]:
    """For every grid point, over the *products* of these pictures (``groups``: a product's
    pictures must all be here): (level-3 hits [G], summed negative log-likelihood [G],
    products). Each picture is corrected, then a product's pictures are aggregated as predict
    does (``log_mean``). Sums, so that Spark tasks' stats add up to the whole split's.
    ``labels``: the level-3 id of each picture's product."""
    ids = np.asarray(groups).reshape(-1)
    _, first = np.unique(ids, return_index=True)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)[first]
    hits = np.zeros(len(grid))
    nlls = np.zeros(len(grid))
    for g, (t, w, v) in enumerate(grid):
        per_image = combine.corrected(p3, taxonomy, t, w, v, p_branch, p_l1, eps, expert_groups)
        product = combine.group_mean_log(per_image, ids, eps)[first]  # predict's log_mean
        hits[g] = float(np.sum(product.argmax(axis=1) == y))
        nlls[g] = -float(np.sum(np.log(np.maximum(product[np.arange(y.size), y], eps))))
    return hits, nlls, int(first.size)


def best_correction(grid: np.ndarray, hits: np.ndarray, nlls: np.ndarray) -> int:
    """The grid point with the most validation hits; among equals, the lowest NLL; among
    those, the first (the uncorrected model comes first). Picked on accuracy, so the fitted
    strategy never scores below the uncorrected one on the data it was fitted on."""
    order = sorted(range(len(grid)), key=lambda g: (-hits[g], nlls[g], g))
    return int(order[0])
