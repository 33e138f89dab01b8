"""``fixed-sequence``: learn-then-test with fixed sequence testing (Angelopoulos et al. 2021),
started where the fit part is surest.

The fit part chooses where the tests start (:func:`test_start`: the threshold it is surest of,
its smallest p-value); the calibration part then tests, from there to more and more lenient
thresholds, the hypothesis "precision of the filed products < target" with an exact
Clopper-Pearson binomial p-value, and stops at the first threshold it cannot reject (the
family-wise error stays at ``1 - confidence`` without splitting it); the last certified
threshold files. Precision >= target with probability >= ``confidence`` over the draw of val,
on any product drawn like val. The surest threshold is often a lenient one the fit part was
lucky on: at a small val its start fails (bench/README, "Decision rules").
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from hierarchy.infer.rules.base import Curves, Sequential

HIGH_PROBABILITY = ("precision >= target with probability >= confidence over the draw of val")


def needed_products(target: float, confidence: float) -> int:
    """The fewest filed calibration products that can certify ``target`` at ``confidence``
    even with no error among them: the smallest n with target**n <= 1 - confidence
    (59 for 0.95 at 0.95, 299 for 0.99)."""
    return int(math.ceil(math.log(1.0 - confidence) / math.log(target) - 1e-12))


def p_value(errors: int, filed: int, target: float) -> float:
    """Exact (Clopper-Pearson) p-value of "precision < target" after ``errors`` wrong among
    ``filed``: the chance of so few errors if the error rate were 1 - target."""
    from scipy.stats import binom

    if filed <= 0:
        return 1.0
    return float(binom.cdf(errors, filed, 1.0 - target))


def binomial_max_errors(filed: np.ndarray, target: float, confidence: float) -> np.ndarray:
    """The most errors among ``filed`` whose p-value is <= 1 - confidence (-1: none)."""
    from scipy.stats import binom

    n = np.asarray(filed, dtype=np.int64)
    delta = 1.0 - confidence
    k = binom.ppf(delta, np.maximum(n, 1), 1.0 - target)
    k = np.where(binom.cdf(k, np.maximum(n, 1), 1.0 - target) <= delta, k, k - 1)
    return np.where(n > 0, k, -1).astype(np.int64)


def test_start(errors_fit: np.ndarray, filed_fit: np.ndarray, target: float) -> Optional[int]:
    """Where the test sequence starts, from the fit part alone: the threshold of the fit
    part's smallest p-value, the one it has the most evidence for. None when the fit part
    files nothing."""
    if not filed_fit.any():
        return None
    return int(np.argmin([p_value(int(e), int(f), target)
                          for e, f in zip(errors_fit, filed_fit)]))


class FixedSequence(Sequential):
    name = "fixed-sequence"
    promise = HIGH_PROBABILITY

    def needed(self, target: float, confidence: float) -> int:
        return needed_products(target, confidence)

    def max_errors(self, filed: np.ndarray, target: float, confidence: float) -> np.ndarray:
        return binomial_max_errors(filed, target, confidence)

    def start(self, curves: Curves, target: float, confidence: float) -> Optional[int]:
        return test_start(curves.errors_fit, curves.filed_fit, target)


RULE = FixedSequence()
