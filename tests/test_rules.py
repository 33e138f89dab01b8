"""The decision rules' promises, by simulation over many draws of val (pure numpy, no Spark).

A population of products has a model confidence ``s`` and a chance ``g(s)`` of being right
that the model does not know: over-confident (``g = s**4``), or a long tail of products whose
leaf training never saw (a fifth of them, never right, some very sure). Each draw of val is
cut into a fit and a calibration part; the rule certifies a threshold; the population's
precision at that threshold is what new products drawn like val get. A miscalibration may
cost coverage, never the promise."""

from __future__ import annotations

import numpy as np
import pytest

from hierarchy.contracts import rules as declared
from hierarchy.infer import decide, rules
from hierarchy.infer.rules import Curves

THRESHOLDS = np.asarray(decide.THRESHOLDS)
TARGET, CONFIDENCE = 0.9, 0.9


def population(kind: str, n: int, rng) -> tuple:
    """(confidence, right) of ``n`` products."""
    s = rng.beta(4.0, 0.5, size=n)
    if kind == "overconfident":
        right = rng.random(n) < s ** 4
    elif kind == "unseen":
        # a fifth of the products belong to leaves training never saw: never right, and
        # less sure on the whole, yet some as sure as the rest
        unseen = rng.random(n) < 0.2
        s = np.where(unseen, rng.beta(3.0, 1.0, size=n), s)
        right = (rng.random(n) < s) & ~unseen
    else:
        right = rng.random(n) < s
    return s, right


def curves(s: np.ndarray, right: np.ndarray, part: np.ndarray) -> Curves:
    filed = s[:, None] >= THRESHOLDS[None, :]
    wrong = filed & ~right[:, None]
    out = {}
    for h, name in ((0, "fit"), (1, "cal")):
        rows = part == h
        out[f"filed_{name}"] = filed[rows].sum(axis=0)
        out[f"errors_{name}"] = wrong[rows].sum(axis=0)
    return Curves(thresholds=THRESHOLDS, n_fit=int((part == 0).sum()),
                  n_cal=int((part == 1).sum()), **out)


def true_precision(s: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The population's precision at every threshold (nan where nothing is filed)."""
    order = np.argsort(-s)
    hits = np.cumsum(right[order])
    filed = np.searchsorted(-s[order], -THRESHOLDS, side="right")
    return np.where(filed > 0, hits[np.maximum(filed - 1, 0)] / np.maximum(filed, 1), np.nan)


def draws(name: str, kind: str, n_val: int, reps: int, seed: int = 0):
    """(precision of the certified threshold per draw (nan: nothing filed), coverage)."""
    rng = np.random.default_rng(seed)
    pop_s, pop_right = population(kind, 400_000, rng)
    prec = true_precision(pop_s, pop_right)
    cover = (pop_s[:, None] >= THRESHOLDS[None, :]).mean(axis=0)
    rule = rules.get(name)
    got, coverage = [], []
    for _ in range(reps):
        s, right = population(kind, n_val, rng)
        part = (rng.random(n_val) < 0.5).astype(int)
        j, _ = rule.select(curves(s, right, part), TARGET, CONFIDENCE, 1.0)
        got.append(np.nan if j is None else prec[j])
        coverage.append(0.0 if j is None else cover[j])
    return np.asarray(got), np.asarray(coverage)


HIGH_PROBABILITY = [n for n in declared.NAMES if n != "risk-control"]


@pytest.mark.parametrize("kind", ["overconfident", "unseen"])
@pytest.mark.parametrize("name", HIGH_PROBABILITY)
def test_a_miscalibrated_model_costs_coverage_never_the_high_probability_promise(name, kind):
    got, coverage = draws(name, kind, 600, 300)
    below = np.nan_to_num(got, nan=1.0) < TARGET
    # at most 1 - confidence of the draws (10%), with room for 300 draws' noise (sd 1.7%)
    assert below.mean() <= (1 - CONFIDENCE) + 0.035, (name, kind, below.mean())
    assert np.isfinite(got).mean() > 0.25 and coverage.mean() > 0.03  # it files something


@pytest.mark.parametrize("kind", ["overconfident", "unseen"])
def test_a_miscalibrated_model_keeps_the_expected_promise_on_average(kind):
    got, coverage = draws("risk-control", kind, 600, 300)
    filed = np.isfinite(got)
    assert filed.mean() > 0.75
    # of all the products filed over the draws of val, the share right (each draw's
    # threshold at the population's precision, weighted by what it files)
    mean = np.sum(got[filed] * coverage[filed]) / coverage[filed].sum()
    assert mean >= TARGET - 0.003, mean
    # weaker than the high-probability promise: many single draws fall under the target
    assert (got[filed] < TARGET).mean() > 1 - CONFIDENCE


def test_the_uncorrected_rule_breaks_the_promise():
    """The check the tests make can fail: a plug-in rule (the most lenient threshold whose
    calibration precision reaches the target) falls under it in a third of the draws."""
    rng = np.random.default_rng(3)
    pop_s, pop_right = population("overconfident", 400_000, rng)
    prec = true_precision(pop_s, pop_right)
    got = []
    for _ in range(300):
        s, right = population("overconfident", 600, rng)
        c = curves(s, right, np.ones(600, dtype=int))
        ok = (c.filed_cal > 0) & (c.filed_cal - c.errors_cal >= TARGET * c.filed_cal)
        got.append(prec[np.flatnonzero(ok).max()] if ok.any() else np.nan)
    got = np.asarray(got)
    assert (got < TARGET).mean() > 0.3


def test_the_pass_lines():
    fs, rc = rules.get("fixed-sequence"), rules.get("risk-control")
    assert fs.needed(0.95, 0.95) == 59 and rc.needed(0.95, 0.95) == 19
    # 0 errors pass from 59 products, 1 from 93; risk control: 0 from 19, 1 from 39
    k = fs.max_errors(np.array([58, 59, 92, 93]), 0.95, 0.95)
    assert k.tolist() == [-1, 0, 0, 1]
    assert rc.max_errors(np.array([18, 19, 38, 39]), 0.95, 0.95).tolist() == [-1, 0, 0, 1]


def test_a_start_nothing_is_likely_to_pass_from_still_gets_tested():
    """Where the fit part makes every start hopeless, power-start falls back to its surest
    threshold: the calibration part still tests it, and the reason names that test."""
    g = len(THRESHOLDS)
    filed = np.minimum(np.arange(g), 400)
    c = Curves(thresholds=THRESHOLDS, filed_fit=filed, errors_fit=filed // 2,
               filed_cal=filed, errors_cal=filed // 2, n_fit=400, n_cal=400)
    j, reason = rules.get("power-start").select(c, TARGET, CONFIDENCE, 1.0)
    assert j is None and "filed at the threshold the fit part chose to start from" in reason
    assert "no threshold files" not in reason
