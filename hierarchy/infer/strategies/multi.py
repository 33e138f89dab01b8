"""``multi``: the multi-level model's level-3 output."""

from __future__ import annotations

import numpy as np

from hierarchy.contracts import modelstore
from hierarchy.infer.strategies.base import Strategy


class Multi(Strategy):
    name = "multi"

    def available(self, run) -> bool:
        return run.trained(modelstore.MULTI)

    def models(self, models) -> dict:
        return {"multilevel": models.ref(modelstore.MULTI)}

    def probs(self, scorer, images, product_ids, cache) -> np.ndarray:
        from hierarchy.contracts.model import L3_OUTPUT

        return scorer.components(images, cache)[L3_OUTPUT]


STRATEGY = Multi()
