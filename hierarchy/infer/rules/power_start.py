"""``power-start``: learn-then-test with fixed sequence testing, as ``fixed-sequence``, started
where the fit part expects to file the most.

The same exact binomial test and the same promise (precision >= target with probability >=
``confidence`` over the draw of val); only the start differs. The fit part estimates, at each
threshold, the chance that the calibration part passes it (:func:`hierarchy.infer.rules.base.
pass_chance`: its error rate's posterior and the calibration part's size) and starts where
that chance times the coverage is largest. The surest threshold of ``fixed-sequence`` is the
one the fit part happened to be luckiest on, and at a small val the calibration part rarely
repeats the luck; a power estimate discounts it (bench/README, "Decision rules").
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from hierarchy.infer.rules.base import Curves, Sequential, likeliest_coverage
from hierarchy.infer.rules.fixed_sequence import (
    HIGH_PROBABILITY,
    binomial_max_errors,
    needed_products,
    test_start,
)


class PowerStart(Sequential):
    name = "power-start"
    promise = HIGH_PROBABILITY

    def needed(self, target: float, confidence: float) -> int:
        return needed_products(target, confidence)

    def max_errors(self, filed: np.ndarray, target: float, confidence: float) -> np.ndarray:
        return binomial_max_errors(filed, target, confidence)

    def start(self, curves: Curves, target: float, confidence: float) -> Optional[int]:
        # no start likely to pass: the fit part's surest, so the calibration part still tests
        start = likeliest_coverage(self, curves, target, confidence)
        return test_start(curves.errors_fit, curves.filed_fit, target) if start is None \
            else start


RULE = PowerStart()
