"""``two-stage``: the level-1 model, then the models of the product's top
``predict.top_branches`` branches (:func:`hierarchy.infer.combine.two_stage`)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from hierarchy.contracts import modelstore
from hierarchy.infer import combine
from hierarchy.infer.strategies.base import Strategy


def branch_models_trained(run) -> bool:
    return run.trained(modelstore.LEVEL1) and any(
        run.has_model(modelstore.branch_key(b)) for b in run.branch_ids())


def two_stage_models(models, strategy: str) -> dict:
    level1 = models.ref(modelstore.LEVEL1)
    branches, untrained = models.branches(strategy)
    return {"level1": level1, "branches": branches, "untrained_branches": untrained}


def two_stage_probs(scorer, images, product_ids, cache) -> np.ndarray:
    ms = scorer.plan.models
    p_l1 = scorer.output(ms.level1, images, cache)

    def branch_probs(b: int, rows: np.ndarray) -> Optional[np.ndarray]:
        ref = ms.branches.get(b)
        if ref is None:
            return None  # no training images for it: uniform over its leaves
        return scorer.output(ref, images, cache, rows)

    # the product's top-k branches, from the level-1 distribution of all its pictures
    expanded = combine.product_branches(p_l1, product_ids, scorer.plan.param("top_branches"))
    return combine.two_stage(p_l1, branch_probs, scorer.taxonomy, expanded=expanded)


class TwoStage(Strategy):
    name = "two-stage"

    def available(self, run) -> bool:
        return branch_models_trained(run)

    def models(self, models) -> dict:
        return two_stage_models(models, self.name)

    def probs(self, scorer, images, product_ids, cache) -> np.ndarray:
        return two_stage_probs(scorer, images, product_ids, cache)


STRATEGY = TwoStage()
