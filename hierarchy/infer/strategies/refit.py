"""``refit``: the flat model's level-3 head refit over its frozen trunk."""

from __future__ import annotations

import numpy as np

from hierarchy.contracts import modelstore
from hierarchy.infer.strategies.base import Strategy


class Head(Strategy):
    """One per-picture model over a frozen trunk (:data:`hierarchy.contracts.modelstore.HEADS`)."""

    key = ""

    def available(self, run) -> bool:
        return run.trained(self.key)

    def models(self, models) -> dict:
        return {"head": models.ref(self.key)}

    def probs(self, scorer, images, product_ids, cache) -> np.ndarray:
        return np.asarray(scorer.output(scorer.plan.models.head, images, cache),
                          dtype=np.float64)


class Refit(Head):
    name = key = modelstore.REFIT


STRATEGY = Refit()
