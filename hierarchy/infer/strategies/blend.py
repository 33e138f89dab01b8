"""``blend``: ``predict.blend_weight`` x two-stage + the rest x flat."""

from __future__ import annotations

import numpy as np

from hierarchy.infer import combine
from hierarchy.infer.strategies import flat, two_stage
from hierarchy.infer.strategies.base import Strategy


class Blend(Strategy):
    name = "blend"

    def available(self, run) -> bool:
        return flat.STRATEGY.available(run) and two_stage.branch_models_trained(run)

    def models(self, models) -> dict:
        return {**flat.STRATEGY.models(models), **two_stage.two_stage_models(models, self.name)}

    def probs(self, scorer, images, product_ids, cache) -> np.ndarray:
        p_flat = flat.STRATEGY.probs(scorer, images, product_ids, cache)
        p_two = two_stage.two_stage_probs(scorer, images, product_ids, cache)
        return combine.blend(p_two, p_flat, scorer.plan.param("blend_weight"))


STRATEGY = Blend()
