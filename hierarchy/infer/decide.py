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

**The fit** (:mod:`hierarchy.infer.fit`, from the statistics summed here): val is cut by a
hash of the product id into a *fit* part and a *calibration* part. The fit part chooses the
temperature (leaf NLL); the threshold is then certified as ``decide.rule`` says
(:mod:`hierarchy.infer.rules`): learn-then-test's fixed sequence (Angelopoulos et al. 2021)
from a start the fit part chose, with an exact binomial test
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

from hierarchy.contracts.runrecord import DecisionRule
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.infer import combine

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
