"""Decisions: file a product at the deepest node of the tree whose probability meets a
precision the team chose, or send it to review — with a promise that holds on unseen products.

Pure numpy (and scipy's binomial), no Spark, no TensorFlow: predict, serve and evaluate all
call the same functions, so the table, the API and the report agree product by product.

**Node probabilities.** Every strategy yields a full leaf distribution; a level-2 or level-1
node's probability is the sum of its leaves' (never a separate model's number). A level-2 node
is its path (level 1, level 2): a few level-2 names sit under two parents, and summing by name
would merge two subtrees.

**The rule** (Goren et al. 2024's "climbing" inference with one threshold): after the fitted
temperature, a product is filed at the deepest allowed level whose most probable node has
probability >= ``threshold``; below it at every allowed level it goes to review (level 0).
Because a node's probability is a sum of the probabilities below it, the best node's
probability never decreases while climbing, so one threshold orders the products and the
levels at once.

**The fit**: val is cut by a hash of the product id into a *fit* part and a *calibration*
part. The fit part chooses the temperature (leaf NLL); the threshold is then certified as
``decide.rule`` says (:mod:`hierarchy.infer.rules`): learn-then-test's fixed sequence
(Angelopoulos et al. 2021) from a start the fit part chose, with an exact binomial test
(precision >= target with probability >= ``confidence`` over the draw of val) or conformal
risk control's +1 (precision >= target on average over the draw of val). The promise covers
products drawn like val: with ``ingest.val_draw: product`` the dump's own mix, long tail and
unseen leaves included (README "Decisions", what the promise covers; the rules side by side:
bench/README "Decision rules on the long tail"). A decision is correct when the node is the
true leaf or one of its ancestors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from hierarchy.contracts import rules as declared_rules
from hierarchy.contracts.runrecord import DecisionRule
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.infer import combine, rules
from hierarchy.infer.rules import Curves

LEVELS = (3, 2, 1)      # deepest first
REVIEW = 0              # decision_level of a product sent to review
# thresholds tried, conservative to permissive: logit-spaced so that the steps are fine where
# precision targets live (0.9-0.999) and still reach down for an under-confident model
THRESHOLDS = 1.0 / (1.0 + np.exp(-np.linspace(9.2, -3.0, 128)))
ECE_BINS = 15


# --------------------------------------------------------------------------- the tree's nodes
_NODES: Dict[str, Nodes] = {}


@dataclass(frozen=True)
class Nodes:
    """The nodes of the tree per level, as the decision sees them: level 3 = leaves (l3 ids),
    level 2 = (l1, l2) paths, level 1 = l1 ids; ``of_leaf[level]`` maps a leaf to its node."""

    of_leaf: Dict[int, np.ndarray]
    path_l1: np.ndarray            # level-2 node -> its level-1 id
    path_l2: np.ndarray            # level-2 node -> its (name-keyed) level-2 id
    taxonomy: Taxonomy = field(repr=False, compare=False)
    # leaf -> node one-hot matrices of levels 2 and 1, built once (20 MB at 5270 x 483)
    onehot: Dict[int, np.ndarray] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def of(cls, taxonomy: Taxonomy) -> Nodes:
        """The nodes of ``taxonomy``, built once per taxonomy object (kept on it: its
        fingerprint hashes the whole table, too slow to key a per-batch cache)."""
        cached = taxonomy.__dict__.get("_decision_nodes")
        if cached is not None:
            return cached
        nodes = cls._build(taxonomy)
        object.__setattr__(taxonomy, "_decision_nodes", nodes)
        return nodes

    @classmethod
    def _build(cls, taxonomy: Taxonomy) -> Nodes:
        if taxonomy.fingerprint not in _NODES:
            pairs = np.stack([taxonomy.l1_of_l3, taxonomy.l2_of_l3], axis=1).astype(np.int64)
            paths, inverse = np.unique(pairs, axis=0, return_inverse=True)
            of_leaf = {3: np.arange(taxonomy.n_l3), 2: inverse.reshape(-1).astype(np.int64),
                       1: taxonomy.l1_of_l3.astype(np.int64)}
            onehot = {}
            for level in (2, 1):
                m = np.zeros((taxonomy.n_l3, int(of_leaf[level].max()) + 1))
                m[np.arange(taxonomy.n_l3), of_leaf[level]] = 1.0
                onehot[level] = m
            _NODES[taxonomy.fingerprint] = cls(of_leaf=of_leaf, path_l1=paths[:, 0],
                                               path_l2=paths[:, 1], taxonomy=taxonomy,
                                               onehot=onehot)
        return _NODES[taxonomy.fingerprint]

    def count(self, level: int) -> int:
        return int(self.of_leaf[level].max()) + 1

    def node_id(self, level: int, node: int) -> int:
        """The id the table shows: a leaf's ``category_id``, a level-2 node's ``l2`` id, a
        level-1 node's ``l1`` id (the same ids as the table's ``l1``/``l2`` columns)."""
        if level == 3:
            return int(self.taxonomy.category_of_l3(node))
        return int(self.path_l2[node]) if level == 2 else int(node)

    def name(self, level: int, node: int) -> str:
        """The node's path, ``level 1 > level 2 > level 3`` down to its own level."""
        tax = self.taxonomy
        if level == 3:
            return " > ".join(tax.names_of_l3(node))
        if level == 2:
            return f"{tax.l1_names[self.path_l1[node]]} > {tax.l2_names[self.path_l2[node]]}"
        return tax.l1_names[node]


def top_nodes(p: np.ndarray, nodes: Nodes) -> Tuple[np.ndarray, np.ndarray]:
    """The most probable node of each level per product: ``(node [N, 3], probability [N, 3])``,
    columns in :data:`LEVELS` order (leaf, level 2, level 1). Node probabilities are sums of
    their leaves (a one-hot matmul: BLAS, not a Python loop over 5270 leaves)."""
    p = np.asarray(p, dtype=np.float64)
    idx = np.zeros((p.shape[0], 3), dtype=np.int64)
    prob = np.zeros((p.shape[0], 3))
    for col, level in enumerate(LEVELS):
        q = p if level == 3 else p @ nodes.onehot[level]
        if p.shape[0]:
            idx[:, col] = q.argmax(axis=1)
            prob[:, col] = q[np.arange(p.shape[0]), idx[:, col]]
    return idx, prob


def correct_nodes(idx: np.ndarray, nodes: Nodes, true_l3: np.ndarray) -> np.ndarray:
    """[N, 3] bool: each level's chosen node is the true leaf or one of its ancestors."""
    t = np.asarray(true_l3, dtype=np.int64).reshape(-1)
    return np.stack([idx[:, col] == nodes.of_leaf[level][t]
                     for col, level in enumerate(LEVELS)], axis=1)


def level_mask(levels: Sequence[int]) -> np.ndarray:
    """[3] bool over :data:`LEVELS`: which levels may be filed."""
    return np.array([level in levels for level in LEVELS])


def filed_level(prob: np.ndarray, allowed: np.ndarray, threshold: Optional[float]
                ) -> np.ndarray:
    """The column (into :data:`LEVELS`) each product is filed at, -1 = review."""
    if threshold is None:
        return np.full(prob.shape[0], -1, dtype=np.int64)
    return filed_levels(prob, allowed, np.asarray([threshold]))[:, 0]


def filed_levels(prob: np.ndarray, allowed: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """:func:`filed_level` at every threshold at once: [N, len(thresholds)]."""
    out = np.full((prob.shape[0], thresholds.size), -1, dtype=np.int64)
    for col in range(3)[::-1]:  # shallow to deep: the deepest that clears wins
        if allowed[col]:
            out = np.where(prob[:, col:col + 1] >= thresholds[None, :], col, out)
    return out


# --------------------------------------------------------------------------- the rule
# the rule itself is a run.json record: hierarchy.contracts.runrecord.DecisionRule


def decide(p: np.ndarray, nodes: Nodes, rule: DecisionRule) -> List[dict]:
    """The decision columns of each product distribution ``p`` [N, n_l3] (already at the
    rule's temperature): ``decision_level`` (3, 2, 1 or 0 = review), ``decision_id``,
    ``decision_name`` (the node's path) and ``decision_probability``."""
    idx, prob = top_nodes(p, nodes)
    return decisions(idx, prob, nodes, rule)


def decisions(idx: np.ndarray, prob: np.ndarray, nodes: Nodes, rule: DecisionRule
              ) -> List[dict]:
    """:func:`decide` from the products' best nodes (:func:`top_nodes` of the distributions
    at the rule's temperature)."""
    col = filed_level(prob, level_mask(rule.levels), rule.threshold)
    out = []
    for i, c in enumerate(col.tolist()):
        if c < 0:
            out.append(review())
            continue
        level, node = LEVELS[c], int(idx[i, c])
        out.append({"decision_level": level, "decision_id": nodes.node_id(level, node),
                    "decision_name": nodes.name(level, node),
                    "decision_probability": float(prob[i, c])})
    return out


def review() -> dict:
    return {"decision_level": REVIEW, "decision_id": None, "decision_name": None,
            "decision_probability": None}


def undecided() -> dict:
    """A run with no fitted rule: no decision was made (null, not review)."""
    return {"decision_level": None, "decision_id": None, "decision_name": None,
            "decision_probability": None}


def describe(decision: dict) -> str:
    """What the API and the page say: ``filed under X (level 2), 97%`` or ``needs review``."""
    level = decision.get("decision_level")
    if level is None:
        return "no decision rule fitted"
    if level == REVIEW:
        return "needs review"
    return (f"filed under {decision['decision_name']} (level {level}), "
            f"{100 * decision['decision_probability']:.0f}%")


# --------------------------------------------------------------------------- fitting statistics
@dataclass(frozen=True)
class Grids:
    temperatures: Tuple[float, ...]
    thresholds: Tuple[float, ...] = tuple(THRESHOLDS.tolist())
    bins: int = ECE_BINS
    # train products of a product's true leaf: the bands' lower edges after 0 (1, 2, 5 ->
    # bands 0, 1, 2-4, 5+), where the report shows the realized precision
    support_edges: Tuple[int, ...] = (1, 2, 5)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        t, g, b = len(self.temperatures), len(self.thresholds), self.bins
        s = len(self.support_edges) + 1
        return {"products": (2,), "nll": (2, t), "filed": (2, t, g, 3), "correct": (2, t, g, 3),
                "bin_count": (2, t, 3, b), "bin_conf": (2, t, 3, b), "bin_hit": (2, t, 3, b),
                "lca": (2, 3), "band_products": (2, s), "band_filed": (2, t, g, s),
                "band_correct": (2, t, g, s)}

    def support_bands(self) -> List[str]:
        """The bands' names: ``0``, ``1``, ``2-4``, ``5+``."""
        edges = (0, *self.support_edges)
        return [str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"
                for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1]}+"]

    def band_of(self, support: np.ndarray) -> np.ndarray:
        """The band of each train-product count."""
        return np.searchsorted(np.asarray(self.support_edges), np.asarray(support),
                               side="right")


def empty_stats(grids: Grids) -> Dict[str, np.ndarray]:
    return {k: np.zeros(s) for k, s in grids.shapes().items()}


def add_stats(stats: Dict[str, np.ndarray], p: np.ndarray, true_l3: np.ndarray,
              part: np.ndarray, nodes: Nodes, grids: Grids, levels: Sequence[int],
              support: Optional[np.ndarray] = None) -> None:
    """Add products (distributions ``p`` [N, n_l3] at temperature 1, their true leaves, and
    their val part: 0 = fit, 1 = calibration) to ``stats``, sums only — so Spark tasks' stats
    add up to the whole split's and nothing per product reaches the driver. ``support``:
    train products per leaf [n_l3], for the figures by band of the true leaf's support."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(true_l3, dtype=np.int64).reshape(-1)
    part = np.asarray(part, dtype=np.int64).reshape(-1)
    band = None if support is None else grids.band_of(np.asarray(support)[y])
    n_bands = len(grids.support_edges) + 1
    allowed = level_mask(levels)
    theta = np.asarray(grids.thresholds)
    edges = np.linspace(0.0, 1.0, grids.bins + 1)
    for h in (0, 1):
        rows = part == h
        n = int(rows.sum())
        if not n:
            continue
        stats["products"][h] += n
        truth = y[rows]
        if band is not None:
            stats["band_products"][h] += np.bincount(band[rows], minlength=n_bands)
        # how deep the lowest common ancestor of the predicted leaf and the truth is
        pred = p[rows].argmax(axis=1)
        wrong = pred != truth
        same_l1 = nodes.of_leaf[1][pred] == nodes.of_leaf[1][truth]
        same_l2 = nodes.of_leaf[2][pred] == nodes.of_leaf[2][truth]
        stats["lca"][h] += [wrong.sum(), (wrong & same_l1).sum(), (wrong & same_l2).sum()]
        for t, temp in enumerate(grids.temperatures):
            q = combine.apply_temperature(p[rows], temp)
            stats["nll"][h, t] += -np.log(np.maximum(q[np.arange(n), truth], 1e-12)).sum()
            idx, prob = top_nodes(q, nodes)
            ok = correct_nodes(idx, nodes, truth)
            col = filed_levels(prob, allowed, theta)
            if band is not None:
                filed_any = col >= 0
                right = np.take_along_axis(ok, np.maximum(col, 0), axis=1) & filed_any
                onehot = np.eye(n_bands)[band[rows]]                       # [n, bands]
                stats["band_filed"][h, t] += filed_any.T.astype(float) @ onehot
                stats["band_correct"][h, t] += right.T.astype(float) @ onehot
            for c in range(3):
                at = col == c
                stats["filed"][h, t, :, c] += at.sum(axis=0)
                stats["correct"][h, t, :, c] += (at & ok[:, c:c + 1]).sum(axis=0)
                b = np.clip(np.searchsorted(edges, prob[:, c], side="right") - 1, 0,
                            grids.bins - 1)
                stats["bin_count"][h, t, c] += np.bincount(b, minlength=grids.bins)
                stats["bin_conf"][h, t, c] += np.bincount(b, prob[:, c], grids.bins)
                stats["bin_hit"][h, t, c] += np.bincount(b, ok[:, c].astype(float),
                                                         grids.bins)


def flatten(stats: Dict[str, np.ndarray]) -> List[float]:
    return np.concatenate([stats[k].ravel() for k in sorted(stats)]).tolist()


def unflatten(values: Sequence[float], grids: Grids) -> Dict[str, np.ndarray]:
    flat = np.asarray(values, dtype=np.float64)
    out, at = {}, 0
    for k in sorted(grids.shapes()):
        shape = grids.shapes()[k]
        size = int(np.prod(shape))
        out[k] = flat[at:at + size].reshape(shape)
        at += size
    return out


# --------------------------------------------------------------------------- the fit
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
    """The rule and its val figures from summed :func:`add_stats` (see the module notes):
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
