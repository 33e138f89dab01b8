"""``fixed-sequence``: learn-then-test with fixed sequence testing (Angelopoulos et al. 2021).

The fit part chooses where the tests start (:func:`test_start`: the threshold it is surest of,
its smallest p-value); the calibration part then tests, from there to more and more lenient
thresholds, the hypothesis "precision of the filed products < target" with an exact
Clopper-Pearson binomial p-value, and stops at the first threshold it cannot reject (the
family-wise error stays at ``1 - confidence`` without splitting it); the last certified
threshold files. Precision >= target with probability >= ``confidence`` over the draw of val,
on any product drawn like val.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from hierarchy.infer.rules.base import Certifier, Curves


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


def test_start(errors_fit: np.ndarray, filed_fit: np.ndarray, target: float) -> Optional[int]:
    """Where the test sequence starts, from the fit part alone (a start that looked at the
    calibration part would void the bound): the threshold of the fit part's smallest p-value,
    the one it has the most evidence for. None when the fit part files nothing."""
    if not filed_fit.any():
        return None
    return int(np.argmin([p_value(int(e), int(f), target)
                          for e, f in zip(errors_fit, filed_fit)]))


def fixed_sequence(errors_cal: np.ndarray, filed_cal: np.ndarray, start: int, target: float,
                   level: float) -> Optional[int]:
    """The most lenient threshold certified from ``start`` on, or None: "precision < target"
    tested at ``level`` on the calibration part, from ``start`` to more and more lenient
    thresholds, stopping at the first not rejected."""
    chosen = None
    for j in range(start, len(filed_cal)):
        if p_value(int(errors_cal[j]), int(filed_cal[j]), target) > level:
            break
        chosen = j
    return chosen


class FixedSequence(Certifier):
    name = "fixed-sequence"

    def needed(self, target: float, confidence: float) -> int:
        return needed_products(target, confidence)

    def select(self, curves: Curves, target: float, confidence: float, temperature: float
               ) -> Tuple[Optional[int], str]:
        need = needed_products(target, confidence)
        start = test_start(curves.errors_fit, curves.filed_fit, target) if curves.n_fit \
            else None
        if curves.n_cal < need:
            return None, (f"{curves.n_cal} calibration products in val: a precision of "
                          f"{target:g} at confidence {confidence:g} needs at least {need} "
                          f"filed products — more val products (ingest.val_fraction) or "
                          f"decide.calibration_share")
        if start is None:
            return None, (f"no threshold files a product of val's fit part ({curves.n_fit} "
                          f"products) at temperature {temperature:g}: nothing to order the "
                          f"tests by")
        chosen = fixed_sequence(curves.errors_cal, curves.filed_cal, start, target,
                                1.0 - confidence)
        if chosen is None:
            return None, (f"the calibration part could not certify precision {target:g}: "
                          f"{int(curves.errors_cal[start])} wrong of "
                          f"{int(curves.filed_cal[start])} filed at the threshold the fit part "
                          f"was surest of ({curves.thresholds[start]:.4g})")
        return chosen, ""


RULE = FixedSequence()
