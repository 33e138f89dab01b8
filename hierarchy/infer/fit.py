"""Fitting a decision rule on val's summed statistics (:func:`hierarchy.infer.decide.
add_stats`), and the report's figures of it: the temperature from the fit part, the threshold
as ``decide.rule`` certifies it (:mod:`hierarchy.infer.rules`), then what it files per level
and per band of train support, what every declared rule would file on the same val, and what
a bigger val would buy. Pure numpy, run on the driver by evaluate."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from hierarchy.contracts import rules as declared_rules
from hierarchy.contracts.runrecord import DecisionRule
from hierarchy.infer import rules
from hierarchy.infer.decide import LEVELS, Grids
from hierarchy.infer.rules import Curves


def ece(count: np.ndarray, conf: np.ndarray, hit: np.ndarray) -> Optional[float]:
    """Expected calibration error of one level from its bins."""
    n = count.sum()
    if not n:
        return None
    return float(np.sum(np.abs(conf - hit)) / n)


def fitted_temperature(stats: Dict[str, np.ndarray], grids: Grids,
                       temperature: Optional[float]) -> int:
    """Index of the temperature: the forced one, else the fit part's lowest leaf NLL."""
    temps = list(grids.temperatures)
    if temperature is not None:
        return int(np.argmin(np.abs(np.asarray(temps) - temperature)))
    if int(stats["products"][0]):
        return int(np.argmin(stats["nll"][0]))
    return temps.index(1.0) if 1.0 in temps else 0


def fit_rule(stats: Dict[str, np.ndarray], grids: Grids, target: float,
             levels: Sequence[int], confidence: float,
             temperature: Optional[float] = None,
             certifier: str = declared_rules.NAMES[0]) -> Tuple[DecisionRule, dict]:
    """The rule and its val figures from summed :func:`hierarchy.infer.decide.add_stats`:
    the temperature from the fit part (or ``temperature``, one of ``grids.temperatures``),
    then the threshold as ``certifier`` (:mod:`hierarchy.infer.rules`) certifies it."""
    t = fitted_temperature(stats, grids, temperature)
    n_fit, n_cal = (int(x) for x in stats["products"])
    filed_fit = stats["filed"][0, t].sum(axis=1)
    filed_cal = stats["filed"][1, t].sum(axis=1)
    curves = Curves(thresholds=grids.thresholds, filed_fit=filed_fit,
                    errors_fit=filed_fit - stats["correct"][0, t].sum(axis=1),
                    filed_cal=filed_cal,
                    errors_cal=filed_cal - stats["correct"][1, t].sum(axis=1),
                    n_fit=n_fit, n_cal=n_cal)
    how = rules.get(certifier)
    chosen, reason = how.select(curves, target, confidence, float(grids.temperatures[t]))
    rule = DecisionRule(target=target, levels=tuple(sorted(levels, reverse=True)),
                        confidence=confidence, temperature=float(grids.temperatures[t]),
                        threshold=None if chosen is None else float(grids.thresholds[chosen]),
                        reason=reason, certifier=certifier)
    return rule, {**figures(stats, grids, t, chosen, rule, n_fit, n_cal,
                            how.needed(target, confidence)),
                  "promise": how.promise, "rule": certifier,
                  "every_rule": every_rule(curves, target, confidence,
                                           float(grids.temperatures[t])),
                  "by_support": by_support(stats, grids, t, chosen),
                  "bigger_val": bigger_val(stats, t, target, confidence, n_cal)}


def every_rule(curves: Curves, target: float, confidence: float, temperature: float
               ) -> Dict[str, dict]:
    """What each declared rule would certify on the same val: its promise, threshold and the
    share of the calibration part it files (the report's side-by-side)."""
    out = {}
    for name in declared_rules.NAMES:
        how = rules.get(name)
        j, reason = how.select(curves, target, confidence, temperature)
        out[name] = {"promise": how.promise, "reason": reason,
                     "threshold": None if j is None else float(curves.thresholds[j]),
                     "coverage": (float(curves.filed_cal[j] / curves.n_cal)
                                  if j is not None and curves.n_cal else 0.0),
                     "precision": (float(1 - curves.errors_cal[j] / curves.filed_cal[j])
                                   if j is not None and curves.filed_cal[j] else None)}
    return out


def by_support(stats: Dict[str, np.ndarray], grids: Grids, t: int, chosen: Optional[int]
               ) -> List[dict]:
    """Per band of the true leaf's train products (:meth:`Grids.support_bands`), on all of val
    at the chosen threshold: how many products, the share filed and how many of those right.
    Empty when evaluate had no train support to band by."""
    n = stats["band_products"].sum(axis=0)
    if not n.sum():
        return []
    f = stats["band_filed"][:, t].sum(axis=0)
    c = stats["band_correct"][:, t].sum(axis=0)
    out = []
    for b, name in enumerate(grids.support_bands()):
        fb = float(f[chosen, b]) if chosen is not None else 0.0
        cb = float(c[chosen, b]) if chosen is not None else 0.0
        out.append({"band": name, "products": int(n[b]), "share": float(n[b] / n.sum()),
                    "coverage": fb / n[b] if n[b] else 0.0,
                    "precision": cb / fb if fb else None})
    return out


# calibration sizes, as multiples of val's, the report says a bigger val would file at
GROWTH = (2, 4, 10, 100)


def bigger_val(stats: Dict[str, np.ndarray], t: int, target: float, confidence: float,
               n_cal: int) -> dict:
    """What a bigger val would buy: the share a threshold fitted on all of val itself files at
    ``target`` (what a threshold fitted on test would file, if val is drawn like test), how many
    calibration products each kind of promise needs to certify it, and what each would
    certify with :data:`GROWTH` times val's calibration products — in expectation, val's
    precision at each threshold taken as the truth."""
    filed = stats["filed"][:, t].sum(axis=(0, 2))
    correct = stats["correct"][:, t].sum(axis=(0, 2))
    n_all = float(stats["products"].sum())
    if not n_all or not filed.any():
        return {}
    cover = filed / n_all
    precision = np.where(filed > 0, correct / np.maximum(filed, 1), 0.0)
    meets = np.flatnonzero((filed > 0) & (precision >= target))
    widest = int(meets[np.argmax(cover[meets])]) if meets.size else None  # fitted on val
    out = {"val_fitted_coverage": 0.0 if widest is None else float(cover[widest]),
           "calibration_products": n_cal, "promises": {}}
    sizes = np.unique(np.round(np.geomspace(10, 1e7, 400)).astype(np.int64))
    for certifier in {rules.get(n).promise: rules.get(n) for n in declared_rules.NAMES}.values():
        # per threshold, the fewest calibration products whose expected errors pass it
        need = np.full(len(filed), np.inf)
        for j in meets:
            m = np.round(sizes * cover[j]).astype(np.int64)
            ok = certifier.max_errors(m, target, confidence) >= np.ceil(
                m * (1.0 - precision[j]) - 1e-9)
            ok &= m > 0
            if ok.any():
                need[j] = float(sizes[np.argmax(ok)])
        best = int(np.argmax(np.where(np.isfinite(need), cover, -1.0))) if np.isfinite(
            need).any() else None
        out["promises"][certifier.promise] = {
            "needed_for_val_fitted": (int(need[widest]) if widest is not None
                                      and np.isfinite(need[widest]) else None),
            "best_coverage": None if best is None else float(cover[best]),
            "best_needs": None if best is None else int(need[best]),
            "coverage_at": {str(k): float(max([cover[j] for j in meets
                                               if need[j] <= k * max(n_cal, 1)], default=0.0))
                            for k in GROWTH}}
    return out


def figures(stats: Dict[str, np.ndarray], grids: Grids, t: int, chosen: Optional[int],
            rule: DecisionRule, n_fit: int, n_cal: int, need: int) -> dict:
    """The report's decision figures of one strategy on val."""
    n_all = n_fit + n_cal
    filed = stats["filed"][:, t]          # [part, G, level]
    correct = stats["correct"][:, t]

    def point(part: slice, j: Optional[int]) -> dict:
        n = int(stats["products"][part].sum())
        f = filed[part].sum(axis=0)[j] if j is not None else np.zeros(3)
        c = correct[part].sum(axis=0)[j] if j is not None else np.zeros(3)
        return {"products": n,
                "coverage": float(f.sum() / n) if n else 0.0,
                "precision": float(c.sum() / f.sum()) if f.sum() else None,
                "per_level": {str(level): {
                    "filed": int(f[col]), "coverage": float(f[col] / n) if n else 0.0,
                    "precision": float(c[col] / f[col]) if f[col] else None}
                    for col, level in enumerate(LEVELS)}}

    f_all = filed.sum(axis=(0, 2))
    c_all = correct.sum(axis=(0, 2))
    coverage = f_all / n_all if n_all else np.zeros_like(f_all)
    risk = np.where(f_all > 0, 1.0 - c_all / np.maximum(f_all, 1), 0.0)
    # area under the risk-coverage curve over the coverages the thresholds reach
    order = np.argsort(coverage, kind="stable")
    aurc = float(np.trapz(risk[order], coverage[order])) if n_all and coverage.max() > 0 else None
    leaf_filed = filed.sum(axis=0)[:, 0]
    lca = stats["lca"].sum(axis=0)
    return {
        "target": rule.target, "confidence": rule.confidence, "levels": list(rule.levels),
        "temperature": rule.temperature, "threshold": rule.threshold, "reason": rule.reason,
        "needed_products": need, "fit_products": n_fit, "calibration_products": n_cal,
        "calibration": point(slice(1, 2), chosen),   # what the bound was checked on
        "fit": point(slice(0, 1), chosen),           # held out from the threshold
        "all": point(slice(0, 2), chosen),
        "curve": {"threshold": list(grids.thresholds), "coverage": coverage.tolist(),
                  "risk": risk.tolist(),
                  "leaf_coverage": (leaf_filed / n_all if n_all else leaf_filed).tolist()},
        "aurc": aurc,
        "ece": {str(level): {"before": ece(*_bins(stats, temps_index(grids, 1.0), col)),
                             "after": ece(*_bins(stats, t, col))}
                for col, level in enumerate(LEVELS)},
        "severity": {"wrong_leaves": int(lca[0]),
                     "same_level1": float(lca[1] / lca[0]) if lca[0] else None,
                     "same_level2": float(lca[2] / lca[0]) if lca[0] else None,
                     # depth of the lowest common ancestor of a wrong leaf and the truth:
                     # 2 = siblings, 1 = same level 1, 0 = only the root
                     "mean_lca_depth": float((lca[1] + lca[2]) / lca[0]) if lca[0] else None},
    }


def temps_index(grids: Grids, temperature: float) -> int:
    return int(np.argmin(np.abs(np.asarray(grids.temperatures) - temperature)))


def _bins(stats: Dict[str, np.ndarray], t: int, col: int):
    # calibration error measured on the calibration part: the temperature never saw it
    return (stats["bin_count"][1, t, col], stats["bin_conf"][1, t, col],
            stats["bin_hit"][1, t, col])
