"""``risk-control``: an expected-precision promise, in the manner of conformal risk control
(Angelopoulos et al. 2022).

Each calibration product filed at a threshold costs ``wrong - (1 - target)`` (filed right:
``-(1 - target)``, filed wrong: ``target``, not filed: 0); a threshold passes when the mean
cost with one more product at the worst cost is <= 0 — ``correct >= target x (filed + 1)``:
the precision it would show with one more wrong product. 19 filed products with no mistake
pass 0.95, where the high-probability test needs 59. The thresholds are checked in the same
fixed sequence as ``power-start`` (a start the fit part expects to file the most from, then
more lenient ones while each passes).

What it promises is weaker: the share of right answers among filed products, **on average
over the draw of val**, is >= target — a given val may certify a threshold whose precision on
new products is under the target (about half the time when it sits right at it). Conformal
risk control proves this for a loss that only falls as the threshold tightens; precision's
cost does not (a stricter threshold can drop a right answer), so the bound is checked by
simulation (tests/test_rules.py) rather than by the theorem.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from hierarchy.infer.rules.base import Curves, Sequential, likeliest_coverage
from hierarchy.infer.rules.fixed_sequence import test_start

EXPECTED = "precision >= target on average over the draw of val"


class RiskControl(Sequential):
    name = "risk-control"
    promise = EXPECTED

    def needed(self, target: float, confidence: float) -> int:
        # correct = filed >= target x (filed + 1)
        return int(math.ceil(target / (1.0 - target) - 1e-9))

    def max_errors(self, filed: np.ndarray, target: float, confidence: float) -> np.ndarray:
        n = np.asarray(filed, dtype=np.float64)
        # errors <= (1 - target) x filed - target, a hair of slack for float round-off
        k = np.floor((1.0 - target) * n - target + 1e-9)
        return np.where(n > 0, k, -1).astype(np.int64)

    def start(self, curves: Curves, target: float, confidence: float) -> Optional[int]:
        # no start likely to pass: the fit part's surest, so the calibration part still tests
        start = likeliest_coverage(self, curves, target, confidence)
        return test_start(curves.errors_fit, curves.filed_fit, target) if start is None \
            else start


RULE = RiskControl()
