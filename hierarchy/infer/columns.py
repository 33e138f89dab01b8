"""A product's predicted columns, made in two steps so that evaluate can run the models once.

:func:`columns_of` reduces product distributions (already at the decision rule's temperature)
to the few numbers a table row is made of: the top-n leaves, the best of the level-1 marginal
and each level's best node. :func:`records` turns those into the row's columns under a decision
rule. predict runs both on each batch (:func:`hierarchy.infer.scoring.predicted`). Evaluate
runs the first while it scores val, at every temperature of the decision grid
(:func:`at_temperatures`), because the rule is fitted only after the pass; once it is, it runs
the second with the rule's temperature. Both jobs run the same code on the same products, so
their rows agree to the last digit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from hierarchy.contracts import predictions
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.infer import combine, decide


@dataclass(frozen=True)
class Columns:
    """What the rows of ``N`` products are made of."""

    top_idx: np.ndarray            # [N, n] leaves, best first
    top_p: np.ndarray              # [N, n] their probabilities
    l1: np.ndarray                 # [N] best level-1 id of the leaf distribution's marginal
    l1_p: np.ndarray               # [N] its probability
    node: Optional[np.ndarray]     # [N, 3] best node per level (decide.LEVELS), None: no rule
    node_p: Optional[np.ndarray]   # [N, 3] its probability

    def __len__(self) -> int:
        return int(self.top_idx.shape[0])


def columns_of(tax: Taxonomy, probs: np.ndarray, top_n: int, nodes: bool) -> Columns:
    """``probs`` [N, n_l3]: product distributions; ``nodes``: also each level's best node
    (what a decision reads)."""
    top_idx, top_p = combine.top_n(probs, top_n)
    marg = combine.marginal_l1(probs, tax) if len(probs) else np.zeros((0, tax.n_l1))
    l1 = np.argmax(marg, axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    node = node_p = None
    if nodes:
        node, node_p = decide.top_nodes(probs, decide.Nodes.of(tax))
    return Columns(top_idx, top_p, l1, marg[np.arange(len(l1)), l1], node, node_p)


def at_temperatures(tax: Taxonomy, probs: np.ndarray, top_n: int,
                    temperatures: Sequence[float]) -> List[Columns]:
    """:func:`columns_of` at each temperature (the distribution as a rule fitted at that
    temperature sees it, :func:`hierarchy.infer.combine.apply_temperature`)."""
    return [columns_of(tax, combine.apply_temperature(probs, t) if len(probs) else probs,
                       top_n, True) for t in temperatures]


def records(tax: Taxonomy, cols: Columns, rule: Optional[decide.DecisionRule]) -> List[dict]:
    """The predicted columns (:func:`hierarchy.contracts.predictions.leaf_prediction`) and the
    decision of each product; ``rule`` None: no decision made (null columns)."""
    if rule is None:
        decisions = [decide.undecided()] * len(cols)
    else:
        decisions = decide.decisions(cols.node, cols.node_p, decide.Nodes.of(tax), rule)
    cat_ids = np.asarray(tax.category_ids, dtype=np.int64)
    return [{**predictions.leaf_prediction(tax, int(cols.top_idx[i, 0]), cols.top_p[i, 0],
                                           cat_ids[cols.top_idx[i]], cols.top_p[i],
                                           int(cols.l1[i]), cols.l1_p[i]),
             **decisions[i]}
            for i in range(len(cols))]


# ----------------------------------------------------------------------------- as arrays
# a Columns per temperature, flattened into one row per product for a Spark column each
PACKED_DDL = ("top_idx array<long>, top_p array<double>, l1 array<long>, l1_p array<double>, "
              "node array<long>, node_p array<double>")
PACKED = ("top_idx", "top_p", "l1", "l1_p", "node", "node_p")


def pack(per_temperature: List[Columns]) -> Dict[str, list]:
    """{column: one flat array per product} of :func:`at_temperatures`' output: each product's
    numbers at every temperature, temperature-major."""
    out: Dict[str, list] = {}
    for name in PACKED:
        stacked = np.stack([getattr(c, name) for c in per_temperature], axis=1)  # [N, T, ...]
        out[name] = list(stacked.reshape(stacked.shape[0], int(np.prod(stacked.shape[1:]))))
    return out


def unpack(packed: Dict[str, Sequence], temperatures: int, t: int) -> Columns:
    """The :class:`Columns` at temperature index ``t`` of products packed by :func:`pack`."""
    def at(name: str, width: int, dtype) -> np.ndarray:
        flat = np.asarray([np.asarray(v, dtype=dtype) for v in packed[name]], dtype=dtype)
        return flat.reshape(len(packed[name]), temperatures, width)[:, t, :]

    n = len(packed["top_idx"][0]) // temperatures if len(packed["top_idx"]) else 0
    return Columns(top_idx=at("top_idx", n, np.int64), top_p=at("top_p", n, np.float64),
                   l1=at("l1", 1, np.int64)[:, 0], l1_p=at("l1_p", 1, np.float64)[:, 0],
                   node=at("node", 3, np.int64), node_p=at("node_p", 3, np.float64))
