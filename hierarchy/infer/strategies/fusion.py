"""``fusion``: a per-picture head over a frozen trunk that also weighs each picture in its
product (``exp(view score)``), pooled by the geometric mean it was trained with
(:class:`hierarchy.contracts.model.ViewPooling`), whatever ``predict.aggregate`` says."""

from __future__ import annotations

import numpy as np

from hierarchy.contracts import modelstore
from hierarchy.infer.strategies.refit import Head


class Fusion(Head):
    name = key = modelstore.FUSION

    def weighted(self, scorer, images, product_ids, cache):
        from hierarchy.contracts.model import L3_OUTPUT, VIEW_SCORE

        out = scorer.outputs(scorer.plan.models.head, images, cache)
        return (np.asarray(out[L3_OUTPUT], dtype=np.float64),
                np.exp(np.asarray(out[VIEW_SCORE], dtype=np.float64).reshape(-1)))

    def pooling(self, aggregate: str) -> str:
        return "log_mean"


STRATEGY = Fusion()
