"""``greedy``: top-down, as a person files a product — the level-1 model picks the product's
most probable branch, that branch's model picks the leaf — without two-stage's price at k=1.

Two-stage with one branch renormalises over it, so every product's level-1 probability reads
1.0 and a decision at level 1 certifies nothing. Greedy keeps the level-1 model's P(b) for
every branch: the chosen branch's leaves get ``P(b) * P(l3 | b)`` from its model, every other
branch spreads its ``P(b)`` evenly over its leaves (no model runs for it). So the level-1
marginal is the level-1 model's own, one branch model runs per product, and the leaf, level-2
and level-1 decisions each read a probability that means what it says.
"""

from __future__ import annotations

import numpy as np

from hierarchy.infer import combine
from hierarchy.infer.strategies import two_stage
from hierarchy.infer.strategies.base import Strategy


class Greedy(Strategy):
    name = "greedy"

    def available(self, run) -> bool:
        return two_stage.branch_models_trained(run)

    def models(self, models) -> dict:
        return two_stage.two_stage_models(models, self.name)

    def probs(self, scorer, images, product_ids, cache) -> np.ndarray:
        ms, tax = scorer.plan.models, scorer.taxonomy
        p_l1 = np.clip(np.asarray(scorer.output(ms.level1, images, cache), np.float64), 0, None)
        p_l1 = p_l1 / np.maximum(p_l1.sum(axis=1, keepdims=True), 1e-12)
        chosen = combine.product_branches(p_l1, product_ids, 1)  # the product's best branch

        def branch_probs(b: int, rows: np.ndarray):
            ref = ms.branches.get(b)
            return None if ref is None else scorer.output(ref, images, cache, rows)

        # P(l3 | b) on the chosen branch's leaves (weight 1: the only branch expanded)
        inside = combine.two_stage(p_l1, branch_probs, tax, expanded=chosen)
        leaves_l1 = tax.l1_of_l3
        sizes = np.bincount(leaves_l1, minlength=tax.n_l1).astype(np.float64)
        mass = p_l1[:, leaves_l1]  # P(b) of each leaf's branch
        own = chosen[:, leaves_l1]
        return np.where(own, mass * inside, mass / sizes[leaves_l1])


STRATEGY = Greedy()
