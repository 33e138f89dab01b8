"""The scoring arithmetic predict, evaluate and serve share: the strategies' combinations
(two-stage, blend, the hierarchical correction), TTA, temperature, per-product aggregation.

Pure numpy (no TensorFlow, no Spark) so it can be tested in milliseconds and run inside any
executor. Every function works on a batch of N images at once and returns float64: the
models emit float32 softmaxes, and products of small probabilities summed over 5270 leaves
lose too much in float32 to keep the "rows sum to one" invariant the predictions table relies on.
(:func:`top_n` only ranks, so it compares in the input's own dtype and returns float64 values.)
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from hierarchy.contracts.taxonomy import Taxonomy

BranchProbs = Callable[[int, np.ndarray], Optional[np.ndarray]]
METHODS = ("log_mean", "mean")


def _as_batch(p: np.ndarray, name: str, n_cols: Optional[int] = None) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"{name}: expected a [N, C] array, got shape {p.shape}")
    if n_cols is not None and p.shape[1] != n_cols:
        raise ValueError(f"{name}: expected {n_cols} columns, got {p.shape[1]}")
    return p


def _normalize_rows(p: np.ndarray) -> np.ndarray:
    """Rows scaled to sum 1; an all-zero row becomes uniform rather than NaN."""
    total = p.sum(axis=1, keepdims=True)
    empty = total[:, 0] <= 0
    if empty.any():
        p = p.copy()
        p[empty] = 1.0
        total[empty] = p.shape[1]
    return p / total


# --------------------------------------------------------------------------- ranking
def top_n(p: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """The ``n`` most probable classes per row, best first; equal probabilities by lowest index.

    Returns ``(indices [N, n] int64, probs [N, n] float64)``; ``n`` is clipped to ``[0, C]``.
    A full argsort of [N, 5270] per batch is wasteful, so the n-th largest value is found with
    ``np.partition`` and only the n winners are sorted. ``argpartition`` alone would pick an
    arbitrary subset of the classes tied at the boundary; instead everything strictly above the
    boundary value is kept and the tied ones are taken in index order, so the answer does not
    depend on numpy's selection algorithm. NaN ranks below every number.
    """
    p = np.asarray(p)
    if p.ndim != 2:
        raise ValueError(f"p: expected a [N, C] array, got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    # ranked in the caller's dtype: a float64 copy of [N, 5270] float32 costs as much as the rest
    rows, c = p.shape
    n = max(0, min(int(n), c))
    if n == 0 or rows == 0:
        return np.zeros((rows, n), dtype=np.int64), np.zeros((rows, n), dtype=np.float64)
    if np.isnan(p).any():
        p = np.where(np.isnan(p), -np.inf, p)
    if n == c:
        chosen = np.broadcast_to(np.arange(c), (rows, c))
    else:
        bound = np.partition(p, c - n, axis=1)[:, c - n][:, None]
        keep = p >= bound
        if (keep.sum(axis=1) != n).any():  # some row has ties across the n-th place
            above = p > bound
            tied = p == bound
            need = n - above.sum(axis=1, keepdims=True)  # >= 1: the boundary value is tied
            keep = above | (tied & (np.cumsum(tied, axis=1) <= need))
        # exactly n per row, so the row-major nonzero columns reshape cleanly (ascending index)
        chosen = np.nonzero(keep)[1].reshape(rows, n)
    vals = np.take_along_axis(p, chosen, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # stable: ties stay in index order
    idx = np.take_along_axis(chosen, order, axis=1).astype(np.int64)
    return idx, np.take_along_axis(vals, order, axis=1).astype(np.float64)


# --------------------------------------------------------------------------- combinations
def two_stage(
    p_l1: np.ndarray, branch_probs: BranchProbs, taxonomy: Taxonomy, k: int = 0,
    expanded: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Leaf distribution [N, n_l3] from the level-1 model and the per-branch models.

    For each image only its ``k`` most probable level-1 branches are expanded (``k <= 0`` or
    ``k >= n_l1``: all of them; ties broken by lowest level-1 id, as in :func:`top_n`):
    ``P(l3) = P(b) * P(l3 | b)`` for the leaves of each expanded branch ``b``, zero elsewhere,
    then divided by the mass of the expanded branches, so every row sums to one. With all
    branches expanded and a normalized ``p_l1`` this is exactly ``P(l1) * P(l3 | l1)``.
    If the expanded branches all have probability zero they are weighted equally.
    ``expanded`` [N, n_l1] bool, when given, says which branches each image expands instead
    of its own top ``k`` (:func:`product_branches`: the same branches for every picture of
    a product, chosen from the product's level-1 distribution).

    ``branch_probs(b, rows)`` must return branch ``b``'s probabilities for the images at
    ``rows`` (ascending int64 positions in this batch), shaped ``[len(rows), len(branch(b))]``
    in branch-local order (the order of ``taxonomy.branch(b)``). It is called at most once per
    branch, only with the images that expanded it, so a caller runs each branch model on one
    sub-batch. It is never called for a single-leaf branch (``P(l3 | b) = 1``, no model is
    trained for it). It may return ``None`` for a branch without a model: its leaves then get
    a uniform ``P(l3 | b)``. Returned rows are renormalized (float32 softmaxes drift from 1).
    """
    p_l1 = _as_batch(p_l1, "p_l1", taxonomy.n_l1)
    expanded, weight = _branch_weights(p_l1, k, expanded)
    out = np.zeros((p_l1.shape[0], taxonomy.n_l3), dtype=np.float64)
    for b in range(p_l1.shape[1]):
        rows = np.flatnonzero(expanded[:, b]).astype(np.int64)
        leaves = taxonomy.branch(b)
        if rows.size == 0 or leaves.size == 0:
            continue
        if leaves.size == 1:
            cond = np.ones((rows.size, 1), dtype=np.float64)
        else:
            got = branch_probs(b, rows)
            if got is None:
                cond = np.full((rows.size, leaves.size), 1.0 / leaves.size)
            else:
                got = np.asarray(got, dtype=np.float64)
                if got.shape != (rows.size, leaves.size):
                    raise ValueError(
                        f"branch {b}: model returned shape {got.shape}, "
                        f"expected {(rows.size, leaves.size)}"
                    )
                cond = _normalize_rows(np.clip(got, 0.0, None))
        out[rows[:, None], leaves[None, :]] = weight[rows, b][:, None] * cond
    return out


def _branch_weights(p_l1: np.ndarray, k: int, expanded: Optional[np.ndarray]):
    """(which branches each image expands, each expanded branch's share of its mass)."""
    n_l1 = p_l1.shape[1]
    if expanded is not None:
        expanded = np.asarray(expanded, dtype=bool)
        if expanded.shape != p_l1.shape or not expanded.any(axis=1).all():
            raise ValueError("expanded: one row per image, at least one branch in each")
    else:
        k = n_l1 if k <= 0 or k >= n_l1 else int(k)
        expanded = np.zeros_like(p_l1, dtype=bool)
        best, _ = top_n(p_l1, k)
        np.put_along_axis(expanded, best, True, axis=1)
    masked = np.where(expanded, np.clip(p_l1, 0.0, None), 0.0)
    mass = masked.sum(axis=1, keepdims=True)
    # all expanded branches at zero: weigh them equally (the fallback stays on the top-k)
    weight = np.where(mass > 0, masked / np.where(mass > 0, mass, 1.0),
                      expanded / expanded.sum(axis=1, keepdims=True))
    return expanded, weight


def blend(p_two_stage: np.ndarray, p_flat: np.ndarray, weight: float) -> np.ndarray:
    """``weight * two_stage + (1 - weight) * flat``; a convex mix keeps rows summing to one."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"blend weight must be in [0, 1], got {weight}")
    two = _as_batch(p_two_stage, "p_two_stage")
    flat = _as_batch(p_flat, "p_flat")
    if two.shape != flat.shape:
        raise ValueError(f"blend: shapes differ, {two.shape} vs {flat.shape}")
    return weight * two + (1.0 - weight) * flat


def flip_average(p: np.ndarray, p_flipped: np.ndarray) -> np.ndarray:
    """Test-time augmentation: mean of the predictions on the image and its mirror."""
    a = _as_batch(p, "p")
    b = _as_batch(p_flipped, "p_flipped")
    if a.shape != b.shape:
        raise ValueError(f"flip_average: shapes differ, {a.shape} vs {b.shape}")
    return 0.5 * (a + b)


def marginal_l1(p_l3: np.ndarray, taxonomy: Taxonomy) -> np.ndarray:
    """Level-1 marginal [N, n_l1]: each leaf's probability summed into its branch.

    A one-hot [n_l3, n_l1] matmul (2 MB at 5270 x 49) goes through BLAS; ``np.add.at`` over
    columns would loop in Python-speed ufunc machinery.
    """
    p = _as_batch(p_l3, "p_l3", taxonomy.n_l3)
    onehot = np.zeros((taxonomy.n_l3, taxonomy.n_l1), dtype=np.float64)
    onehot[np.arange(taxonomy.n_l3), taxonomy.l1_of_l3] = 1.0
    return p @ onehot


# --------------------------------------------------------------------------- per product
class ProductAccumulator:
    """Per-product aggregation of image predictions that may arrive over several batches.

    ``log_mean`` keeps the sum of ``log(max(p, eps))`` and returns the softmax of the mean
    log-probability (the geometric mean, renormalized): one confident "not this class" image
    vetoes a class. ``mean`` keeps the sum of ``p`` and returns the arithmetic mean. Either way
    the result depends only on the set of images, not on how they were batched (up to float
    rounding). Pictures may carry weights (a fusion model's ``exp(view score)``): the means
    are then weighted, which is the fusion head's own pooling
    (:class:`hierarchy.contracts.model.ViewPooling`); without, every picture weighs 1. Only
    products not yet popped are held, so memory is bounded by the number of open products: a
    caller that reads product ids sorted within a partition calls :meth:`pop_all_except`
    with the batch's last id after each batch and :meth:`finish` at the end, holding at most
    one product across batches.
    """

    def __init__(self, n_classes: int, method: str = "log_mean", eps: float = 1e-7):
        if method not in METHODS:
            raise ValueError(f"aggregation method must be one of {METHODS}, got {method!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.n_classes = int(n_classes)
        self.method = method
        self.eps = float(eps)
        self._sums: Dict[int, np.ndarray] = {}
        self._counts: Dict[int, int] = {}
        self._weights: Dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._sums)

    def __contains__(self, product_id: int) -> bool:
        return int(product_id) in self._sums

    def pending(self) -> List[int]:
        """Ids of the products held (added, not yet popped), ascending."""
        return sorted(self._sums)

    def add(self, product_ids: np.ndarray, probs: np.ndarray,
            weights: Optional[np.ndarray] = None) -> None:
        """Add one row of ``probs`` [N, n_classes] per entry of ``product_ids`` [N], each
        weighing ``weights`` [N] (positive; None: 1 each)."""
        ids = np.asarray(product_ids, dtype=np.int64).reshape(-1)
        p = _as_batch(probs, "probs", self.n_classes)
        if p.shape[0] != ids.size:
            raise ValueError(f"add: {ids.size} product ids for {p.shape[0]} rows")
        if ids.size == 0:
            return
        w = np.ones(ids.size) if weights is None else \
            np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.size != ids.size or not (w > 0).all() or not np.isfinite(w).all():
            raise ValueError(f"add: weights must be {ids.size} positive finite numbers")
        vals = np.log(np.maximum(p, self.eps)) if self.method == "log_mean" else p
        if weights is not None:
            vals = vals * w[:, None]
        # one reduceat per batch instead of a Python loop per image
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
        sums = np.add.reduceat(vals[order], starts, axis=0)
        totals = np.add.reduceat(w[order], starts)
        counts = np.diff(np.r_[starts, ids.size])
        for pid, s, t, c in zip(sorted_ids[starts].tolist(), sums, totals.tolist(),
                                counts.tolist()):
            if pid in self._sums:
                self._sums[pid] += s
                self._weights[pid] += t
                self._counts[pid] += c
            else:
                self._sums[pid] = s.copy()  # a view would pin the whole batch's sums
                self._weights[pid] = t
                self._counts[pid] = c

    def _finalize(self, total: np.ndarray, weight: float) -> np.ndarray:
        mean = total / weight
        if self.method == "log_mean":
            e = np.exp(mean - mean.max())
            return e / e.sum()
        s = mean.sum()
        return mean / s if s > 0 else np.full(self.n_classes, 1.0 / self.n_classes)

    def pop(self, product_id: int) -> Tuple[np.ndarray, int]:
        """``(probs [n_classes] summing to 1, image count)`` of a product, forgotten afterwards.

        ``KeyError`` when the product was never added (or already popped).
        """
        pid = int(product_id)
        total = self._sums.pop(pid)
        weight = self._weights.pop(pid)
        return self._finalize(total, weight), self._counts.pop(pid)

    def pop_all_except(
        self, keep_id: Optional[int] = None
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pop every held product but ``keep_id`` (the one that may continue in the next batch).

        Returns ``(product_ids [M] int64 ascending, probs [M, n_classes], counts [M] int64)``,
        arrays so that :func:`top_n` and :func:`marginal_l1` run on all finished products at once.
        """
        keep = None if keep_id is None else int(keep_id)
        done = [pid for pid in sorted(self._sums) if pid != keep]
        probs = np.zeros((len(done), self.n_classes), dtype=np.float64)
        counts = np.zeros(len(done), dtype=np.int64)
        for i, pid in enumerate(done):
            probs[i], counts[i] = self.pop(pid)
        return np.asarray(done, dtype=np.int64), probs, counts

    def finish(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pop everything still held (end of a partition); same arrays as :meth:`pop_all_except`."""
        return self.pop_all_except(None)


# --------------------------------------------------------------------------- hierarchy-aware
def _log(p: np.ndarray, eps: float) -> np.ndarray:
    return np.log(np.maximum(p, eps))


def softmax_rows(logp: np.ndarray) -> np.ndarray:
    """Rows of log-weights -> rows of probabilities (max-shifted, so no overflow)."""
    e = np.exp(logp - logp.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def group_mean_log(p: np.ndarray, groups: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Per row, the renormalised geometric mean of the rows of its group (a product's
    pictures): what :class:`ProductAccumulator` gives with ``log_mean``, broadcast back to
    every row of the group. ``groups`` [N] are product ids (any order)."""
    p = _as_batch(p, "p")
    ids = np.asarray(groups).reshape(-1)
    if ids.size != p.shape[0]:
        raise ValueError(f"{ids.size} group ids for {p.shape[0]} rows")
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    sums = np.zeros((counts.size, p.shape[1]))
    np.add.at(sums, inverse, _log(p, eps))
    return softmax_rows(sums[inverse] / counts[inverse][:, None])


def product_branches(p_l1: np.ndarray, groups: np.ndarray, k: int,
                     eps: float = 1e-7) -> np.ndarray:
    """Which level-1 branches each row expands [N, n_l1] bool: the top ``k`` of its
    *product's* level-1 distribution (the geometric mean over the product's pictures), so
    every picture of a product expands the same branches and no picture can veto a branch
    the product needs by not expanding it. ``k <= 0`` or ``k >= n_l1``: every branch."""
    p_l1 = _as_batch(p_l1, "p_l1")
    n = p_l1.shape[1]
    if k <= 0 or k >= n:
        return np.ones(p_l1.shape, dtype=bool)
    best, _ = top_n(group_mean_log(p_l1, groups, eps), k)
    mask = np.zeros(p_l1.shape, dtype=bool)
    np.put_along_axis(mask, best, True, axis=1)
    return mask


def leaf_conditional(p_l3: np.ndarray, taxonomy: Taxonomy,
                     expert_groups: Optional[np.ndarray] = None) -> np.ndarray:
    """P(l3 | its group) from a leaf distribution: each leaf divided by its group's total (a
    group with no mass gives its leaves a uniform conditional). ``expert_groups`` [n_l3]: the
    group of every leaf, by default its level-1 branch."""
    p = _as_batch(p_l3, "p_l3", taxonomy.n_l3)
    g = taxonomy.l1_of_l3 if expert_groups is None else np.asarray(expert_groups, np.int64)
    n = int(g.max()) + 1
    onehot = np.zeros((taxonomy.n_l3, n), dtype=np.float64)
    onehot[np.arange(taxonomy.n_l3), g] = 1.0
    mass = (p @ onehot)[:, g]
    sizes = np.bincount(g, minlength=n)[g]
    return np.where(mass > 0, p / np.where(mass > 0, mass, 1.0), 1.0 / sizes)


def hierarchical_correction(p_flat: np.ndarray, taxonomy: Taxonomy, w: float = 0.0,
                            v: float = 0.0, p_branch: Optional[np.ndarray] = None,
                            p_l1: Optional[np.ndarray] = None,
                            eps: float = 1e-7, expert_groups: Optional[np.ndarray] = None
                            ) -> np.ndarray:
    """The flat distribution corrected by the hierarchy's own experts:

        log P(l3) = log P_flat(l3) + w [log P_branch(l3 | b) - log P_flat(l3 | b)]
                                   + v [log P_l1(b) - log P_flat(b)],   b = branch of l3

    renormalised over the leaves. ``p_branch`` [N, n_l3] holds each leaf's branch-model
    conditional, NaN where that branch was not scored (its leaves keep the flat
    conditional); with ``expert_groups`` (the experts' group of every leaf) it is a
    conditional within those groups instead of the level-1 branches — one group of every leaf
    makes ``w = 1`` the experts' distribution itself. ``p_l1`` [N, n_l1] is the level-1
    model's distribution. At ``w = v = 0``
    (or without the experts) this is the flat distribution itself, so fitted on validation
    data it cannot do worse there than flat."""
    flat = _as_batch(p_flat, "p_flat", taxonomy.n_l3)
    logp = _log(flat, eps)
    if w and p_branch is not None:
        branch = _as_batch(p_branch, "p_branch", taxonomy.n_l3)
        delta = _log(np.nan_to_num(branch, nan=1.0), eps) - \
            _log(leaf_conditional(flat, taxonomy, expert_groups), eps)
        logp = logp + w * np.where(np.isnan(branch), 0.0, delta)
    if v and p_l1 is not None:
        l1 = _as_batch(p_l1, "p_l1", taxonomy.n_l1)
        delta = _log(l1, eps) - _log(marginal_l1(flat, taxonomy), eps)
        logp = logp + v * delta[:, taxonomy.l1_of_l3]
    return softmax_rows(logp)


# --------------------------------------------------------------------------- calibration
def apply_temperature(p: np.ndarray, temperature: float, eps: float = 1e-7) -> np.ndarray:
    """softmax(log p / T): T > 1 softens an over-confident model, T = 1 changes nothing."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    p = _as_batch(p, "p")
    if temperature == 1.0:
        return _normalize_rows(np.clip(p, 0.0, None))
    return softmax_rows(_log(p, eps) / temperature)


def nll(p: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    """Mean negative log-likelihood of the true classes."""
    p = _as_batch(p, "p")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    return float(-np.mean(np.log(np.maximum(p[np.arange(y.size), y], eps))))


# ------------------------------------------------------------------ the hierarchical strategy
def corrected(p3: np.ndarray, taxonomy: Taxonomy, temperature: float, w: float, v: float,
              p_branch: Optional[np.ndarray] = None, p_l1: Optional[np.ndarray] = None,
              eps: float = 1e-7, expert_groups: Optional[np.ndarray] = None) -> np.ndarray:
    """The ``hierarchical`` strategy of one picture: the level-3 distribution softened by
    ``temperature``, then :func:`hierarchical_correction` by its experts and level-1 head."""
    return hierarchical_correction(apply_temperature(p3, temperature, eps), taxonomy, w, v,
                                   p_branch, p_l1, eps, expert_groups)
