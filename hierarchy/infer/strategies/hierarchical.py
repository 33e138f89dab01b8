"""``hierarchical``: the multi-level model's level 3 (or its experts model's) corrected by its
level-1 head and per-group conditional, with the (temperature, w, v) evaluate fits on val
(:func:`hierarchy.infer.combine.corrected`); uncorrected, it is ``multi``."""

from __future__ import annotations

import numpy as np

from hierarchy.contracts import modelstore
from hierarchy.infer import combine
from hierarchy.infer.strategies.base import Strategy


def source_key(run) -> str:
    """The model it reads: the experts model when trained, else the multi-level one."""
    return modelstore.EXPERTS if run.trained(modelstore.EXPERTS) else modelstore.MULTI


class Hierarchical(Strategy):
    name = "hierarchical"
    fits_correction = True

    def available(self, run) -> bool:
        return run.trained(modelstore.MULTI) or run.trained(modelstore.EXPERTS)

    def models(self, models) -> dict:
        ref = models.ref(source_key(models.run))
        return {"multilevel": ref, "calibration": models.calibration(ref.key)}

    def probs(self, scorer, images, product_ids, cache) -> np.ndarray:
        from hierarchy.contracts.model import CONDITIONAL, L1_HEAD, L3_OUTPUT

        out = scorer.components(images, cache)
        c = scorer.plan.models.calibration
        return combine.corrected(out[L3_OUTPUT], scorer.taxonomy, c["temperature"], c["w"],
                                 c["v"], out[CONDITIONAL], out[L1_HEAD],
                                 expert_groups=scorer.expert_groups())


STRATEGY = Hierarchical()
