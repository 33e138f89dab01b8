"""What a way of certifying a threshold sees and answers, and the sequence the certifiers
share: a start chosen on the fit part, then more and more lenient thresholds checked on the
calibration part while each passes."""

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
    user reads in the report and evaluate's summary). ``promise``: what a certified threshold
    promises, in the words the report uses."""

    name = ""
    promise = ""

    def needed(self, target: float, confidence: float) -> int:
        """The fewest calibration products that could certify ``target`` (the report's
        ``needed_products``)."""
        raise NotImplementedError

    def max_errors(self, filed: np.ndarray, target: float, confidence: float) -> np.ndarray:
        """The most errors among ``filed`` products that still pass at ``target`` (-1: none
        can), elementwise."""
        raise NotImplementedError

    def select(self, curves: Curves, target: float, confidence: float, temperature: float
               ) -> Tuple[Optional[int], str]:
        raise NotImplementedError


class Sequential(Certifier):
    """A fixed sequence: from :meth:`start` (the fit part's choice: a start that looked at the
    calibration part would void the promise) to more and more lenient thresholds, each checked
    on the calibration part by :meth:`Certifier.max_errors`, stopping at the first that fails;
    the last that passed files. Testing in a fixed order needs no split of the error
    (Angelopoulos et al. 2021, learn-then-test)."""

    def start(self, curves: Curves, target: float, confidence: float) -> Optional[int]:
        raise NotImplementedError

    def passes(self, errors: int, filed: int, target: float, confidence: float) -> bool:
        return filed > 0 and errors <= int(self.max_errors(np.asarray([filed]), target,
                                                           confidence)[0])

    def select(self, curves: Curves, target: float, confidence: float, temperature: float
               ) -> Tuple[Optional[int], str]:
        need = self.needed(target, confidence)
        if curves.n_cal < need:
            return None, (f"{curves.n_cal} calibration products in val: a precision of "
                          f"{target:g} at confidence {confidence:g} needs at least {need} "
                          f"filed products — more val products (ingest.val_fraction) or "
                          f"decide.calibration_share")
        start = self.start(curves, target, confidence) if curves.n_fit else None
        if start is None:
            return None, (f"no threshold files a product of val's fit part ({curves.n_fit} "
                          f"products) at temperature {temperature:g}: nothing to order the "
                          f"tests by")
        chosen = None
        for j in range(start, len(curves.filed_cal)):
            if not self.passes(int(curves.errors_cal[j]), int(curves.filed_cal[j]), target,
                               confidence):
                break
            chosen = j
        if chosen is None:
            return None, (f"the calibration part could not certify precision {target:g}: "
                          f"{int(curves.errors_cal[start])} wrong of "
                          f"{int(curves.filed_cal[start])} filed at the threshold the fit part "
                          f"chose to start from ({curves.thresholds[start]:.4g})")
        return chosen, ""


# draws of the calibration part a power estimate averages over (fixed: a refit is repeatable)
DRAWS = 256
_PRIOR = 5.0   # pseudo-products that pull a thin shell's error rate towards its neighbours'
_WINDOW = 10   # thresholds either side that make a shell's neighbourhood


def simulated_sequences(certifier: Certifier, curves: Curves, target: float,
                        confidence: float, draws: int = DRAWS) -> np.ndarray:
    """[draws, thresholds]: the share of the calibration part a sequence started at each
    threshold would file, over calibration parts drawn from what the fit part saw (a
    Bayesian bootstrap: each shell between two thresholds gets a share of the products and an
    error rate from its posterior given the fit part, pulled towards its neighbourhood's so a
    thin shell's luck does not count as evidence). Nothing of the calibration part is read but
    its size."""
    # errors can fall as the threshold loosens (a product climbs down to a right leaf): the
    # running maximum errs towards more errors, never towards a start too lenient
    f = np.maximum.accumulate(np.asarray(curves.filed_fit, dtype=np.float64))
    e = np.minimum(np.maximum.accumulate(np.asarray(curves.errors_fit, dtype=np.float64)), f)
    g = len(f)
    shell = np.diff(np.r_[0.0, f])
    shell_err = np.clip(np.diff(np.r_[0.0, e]), 0.0, shell)
    at_ = np.arange(g)
    lo, hi = np.maximum(at_ - _WINDOW, 0), np.minimum(at_ + _WINDOW + 1, g)
    cum_f, cum_e = np.r_[0.0, np.cumsum(shell)], np.r_[0.0, np.cumsum(shell_err)]
    local = (cum_e[hi] - cum_e[lo] + 0.5) / (cum_f[hi] - cum_f[lo] + 1.0)
    rng = np.random.default_rng(0)
    rest = max(float(curves.n_fit) - f[-1], 0.0)
    # a Bayesian bootstrap over the shells the fit part filed into (an empty shell stays
    # empty: a pseudo-count there would file phantom products at a strict threshold)
    cells = np.r_[shell, rest]
    weights = rng.dirichlet(np.where(cells > 0, cells, 1e-6), size=draws)   # [D, G+1]
    counts = np.stack([rng.multinomial(curves.n_cal, w) for w in weights])[:, :g]
    rate = rng.beta(shell_err + _PRIOR * local + 1e-3,
                    shell - shell_err + _PRIOR * (1 - local) + 1e-3, size=(draws, g))
    wrong = rng.binomial(counts, rate)
    filed, errors = np.cumsum(counts, axis=1), np.cumsum(wrong, axis=1)
    passes = errors <= certifier.max_errors(filed.ravel(), target, confidence).reshape(filed.shape)
    passes &= filed > 0
    # the last threshold of each unbroken run of passes, from every start: a backward scan
    end = np.full((draws, g), -1)
    for j in range(g - 1, -1, -1):
        nxt = end[:, j + 1] if j + 1 < g else np.full(draws, -1)
        end[:, j] = np.where(passes[:, j], np.where(nxt >= 0, nxt, j), -1)
    share = np.take_along_axis(filed, np.maximum(end, 0), axis=1) / max(curves.n_cal, 1)
    return np.where(end >= 0, share, 0.0)


def likeliest_coverage(certifier: Certifier, curves: Curves, target: float,
                       confidence: float) -> Optional[int]:
    """The start whose sequence is expected to file the most (:func:`simulated_sequences`):
    neither the fit part's surest threshold, which it may only have been lucky on, nor a
    lenient one whose test is likely to fail at once. None when the fit part files nothing or
    no start is likely to pass at all."""
    if not np.asarray(curves.filed_fit).any():
        return None
    gain = simulated_sequences(certifier, curves, target, confidence).mean(axis=0)
    return int(np.argmax(gain)) if gain.max() > 0 else None
