"""Which strategy predict answers with by default: the best level 3 on val products that no
candidate's parameters were fitted on.

Models learn on train only; evaluate fits the rest on val: the hierarchical correction
(T, w, v) and each decision rule's temperature on val's *fit part*, the decision thresholds
on its *calibration part* (:mod:`hierarchy.evaluate.decisions`), which only selects what to
file and never changes a leaf. So every candidate's leaves on the calibration part are out of
sample, and the choice is made there: the best level-3 product accuracy, then the most
products filed at the target precision, then :data:`~hierarchy.contracts.strategies.PREFERENCE`.
The report says by how much the choice beats each other candidate, with a 95% interval of
the paired difference over products (normal approximation: Spark sums ``d`` and ``d²`` per
pair of strategies; one row comes back to the driver, never the products).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

from hierarchy.contracts.settings import Decide
from hierarchy.contracts.strategies import PREFERENCE
from hierarchy.evaluate.decisions import calibration_part

Z95 = 1.959963984540054


def held_out(df, dcfg: Decide, strategies: List[str]) -> dict:
    """Per strategy, level-3 accuracy on the labelled calibration-part products of ``df``
    (one run's val rows); per ordered pair, the sums of the paired hit differences."""
    from pyspark.sql import functions as F

    part = df.where(F.col("true_l3").isNotNull()) \
        .where(calibration_part(dcfg.calibration_share) == 1)
    wide = part.groupBy("product_id").pivot("strategy", strategies).agg(
        F.first((F.col("l3") == F.col("true_l3")).cast("int")))
    aggs = []
    for a in strategies:
        aggs += [F.count(F.col(f"`{a}`")).alias(f"n|{a}"), F.sum(f"`{a}`").alias(f"hits|{a}")]
        for b in strategies:
            if a < b:
                d = F.col(f"`{a}`") - F.col(f"`{b}`")
                aggs += [F.count(d).alias(f"pn|{a}|{b}"), F.sum(d).alias(f"s|{a}|{b}"),
                         F.sum(d * d).alias(f"ss|{a}|{b}")]
    row = wide.agg(*aggs).first().asDict()
    accuracy = {s: {"products": int(row[f"n|{s}"]),
                    "accuracy_l3": row[f"hits|{s}"] / row[f"n|{s}"] if row[f"n|{s}"] else None}
                for s in strategies}
    pairs = {(a, b): (int(row[f"pn|{a}|{b}"]), float(row[f"s|{a}|{b}"] or 0),
                      float(row[f"ss|{a}|{b}"] or 0))
             for a in strategies for b in strategies if a < b}
    return {"accuracy": accuracy, "pairs": pairs}


def paired_interval(n: int, s: float, ss: float) -> Optional[tuple]:
    """Mean of n paired differences (their sum ``s`` and sum of squares ``ss``) and its 95%
    normal interval; None without products."""
    if n == 0:
        return None
    mean = s / n
    var = max(ss / n - mean * mean, 0.0) * n / max(n - 1, 1)
    half = Z95 * math.sqrt(var / n)
    return mean, mean - half, mean + half


def choose(held: dict, filed: Optional[Dict[str, float]] = None,
           fallback_scores: Optional[Dict[str, Optional[float]]] = None) -> dict:
    """The recommended strategy and why (see the module notes). Without held-out products
    (a val split too small to split) the whole val's accuracy decides, and the reason says
    it is in-sample for the fitted strategies."""
    filed = filed or {}
    rank = {s: i for i, s in enumerate(PREFERENCE)}
    acc = {s: a["accuracy_l3"] for s, a in held["accuracy"].items()}
    basis = "held_out"
    if not any(v is not None for v in acc.values()):
        acc, basis = dict(fallback_scores or {}), "all_val"
    known = [s for s, v in acc.items() if v is not None]
    if not known:
        return {"recommended": None, "basis": basis, "reason": "no strategy scored a product",
                "versus": {}}
    best = min(known, key=lambda s: (-acc[s], -(filed.get(s) or 0.0), rank.get(s, len(rank))))
    versus = {}
    for other in known:
        if other == best or basis != "held_out":
            continue
        a, b = sorted((best, other))
        n, s, ss = held["pairs"][(a, b)]
        sign = 1.0 if a == best else -1.0
        got = paired_interval(n, sign * s, ss)
        if got is not None:
            mean, lo, hi = got
            lo, hi = sorted((lo, hi))
            versus[other] = {"products": n, "difference": mean, "ci95": [lo, hi]}
    products = held["accuracy"].get(best, {}).get("products", 0)
    if basis == "held_out":
        reason = (f"the best level-3 accuracy, {100 * acc[best]:.1f}%, on the {products} val "
                  f"products no candidate was fitted on")
    else:
        reason = (f"the best level-3 accuracy on the whole val split, {100 * acc[best]:.1f}% "
                  f"(no val product was left out of every fit: in-sample for fitted strategies)")
    return {"recommended": best, "basis": basis, "reason": reason, "versus": versus,
            "accuracy_l3": {s: acc[s] for s in known},
            "products": {s: held["accuracy"][s]["products"] for s in held["accuracy"]}}


def versus_text(choice: dict, limit: int = 3) -> str:
    """``+3.1 [+1.2, +5.0] points over refit, ...``: the closest rivals first."""
    items = sorted(choice["versus"].items(), key=lambda kv: kv[1]["difference"])[:limit]
    return ", ".join(f"{100 * v['difference']:+.1f} [{100 * v['ci95'][0]:+.1f}, "
                     f"{100 * v['ci95'][1]:+.1f}] points over {s}" for s, v in items)
