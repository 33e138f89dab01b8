"""``flat``: the flat level-3 model's own distribution."""

from __future__ import annotations

import numpy as np

from hierarchy.contracts import modelstore
from hierarchy.infer.strategies.base import Strategy


class Flat(Strategy):
    name = "flat"

    def available(self, run) -> bool:
        return run.trained(modelstore.FLAT)

    def models(self, models) -> dict:
        return {"flat": models.ref(modelstore.FLAT)}

    def probs(self, scorer, images, product_ids, cache) -> np.ndarray:
        return np.asarray(scorer.output(scorer.plan.models.flat, images, cache),
                          dtype=np.float64)


STRATEGY = Flat()
