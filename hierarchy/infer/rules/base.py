"""What a way of certifying a threshold sees and answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class Curves:
    """Val's decisions at the fitted temperature, per threshold of ``thresholds`` (strict to
    lenient): how many products each would file (``filed_*``) and how many of those wrongly
    (``errors_*``), on the fit part and on the calibration part (disjoint, drawn by a hash of
    the product id); ``n_fit``, ``n_cal``: the products of each part."""

    thresholds: np.ndarray
    filed_fit: np.ndarray
    errors_fit: np.ndarray
    filed_cal: np.ndarray
    errors_cal: np.ndarray
    n_fit: int
    n_cal: int


class Certifier:
    """Chooses the most lenient threshold it can certify for ``target`` precision at
    ``confidence``: (its index in ``curves.thresholds``, "") or (None, the reason, one line a
    user reads in the report and evaluate's summary)."""

    name = ""

    def needed(self, target: float, confidence: float) -> int:
        """The fewest calibration products that could certify ``target`` (the report's
        ``needed_products``)."""
        raise NotImplementedError

    def select(self, curves: Curves, target: float, confidence: float, temperature: float
               ) -> Tuple[Optional[int], str]:
        raise NotImplementedError
