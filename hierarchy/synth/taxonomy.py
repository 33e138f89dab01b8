"""Synthetic category trees: a small one for tests and one with the real catalog's shape.

Names are readable and unique per level ("FAMILY 07", "FAMILY 07 / PALETTE 03",
"FAMILY 07 / PALETTE 03 / MARK 012"); zero padding makes the Taxonomy's by-name level-1 and
level-2 ids follow the generation order. Category ids are random 10-digit numbers in the style
of the real ones (1000010653), so leaf order by id is unrelated to the tree, as in the real table.
"""

from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np

from hierarchy.contracts.taxonomy import Taxonomy, TaxonomyError

# (level-1, level-2, leaves, lognormal sigma of level-2 per level-1, of leaves per level-2)
SHAPES = {
    "small": (4, 12, 40, 0.0, 0.6),
    "hard": (6, 18, 108, 0.3, 0.5),   # the hard preset's tree: ~6 confusable leaves per level 2
    "full": (49, 483, 5270, 0.9, 1.0),
}
FIRST_CATEGORY_ID = 1_000_000_000


def _split(total: int, parts: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``total`` split into ``parts`` counts, each >= 1, uneven by a lognormal weight."""
    if total < parts:
        raise ValueError(f"cannot split {total} into {parts} non-empty parts")
    weights = rng.lognormal(0.0, sigma, parts) if sigma > 0 else np.ones(parts)
    share = weights / weights.sum() * (total - parts)
    counts = np.floor(share).astype(np.int64)
    # Largest remainders take the leftover units, so the sum is exact.
    rest = total - parts - int(counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:rest]] += 1
    return counts + 1


def tree_rows(
    n_l1: int, n_l2: int, n_l3: int, sigma_l2: float, sigma_l3: float, seed: int
) -> List[Tuple[int, str, str, str]]:
    """Rows ``(category_id, level1, level2, level3)`` of a random tree of the given shape."""
    rng = np.random.default_rng([seed, 7001])
    l2_per_l1 = _split(n_l2, n_l1, sigma_l2, rng)
    l3_per_l2 = _split(n_l3, n_l2, sigma_l3, rng)
    span = max(30_000, 6 * n_l3)
    ids = FIRST_CATEGORY_ID + rng.choice(span, size=n_l3, replace=False)
    rows = []
    l2 = 0
    for f, n_children in enumerate(l2_per_l1):
        l1_name = f"FAMILY {f:02d}"
        for p in range(n_children):
            l2_name = f"{l1_name} / PALETTE {p:02d}"
            for m in range(l3_per_l2[l2]):
                rows.append((int(ids[len(rows)]), l1_name, l2_name, f"{l2_name} / MARK {m:03d}"))
            l2 += 1
    return rows


def make_taxonomy(kind: str = "small", seed: int = 0) -> Taxonomy:
    """``"small"`` (4/12/40), ``"hard"`` (6/18/108), ``"full"`` (49/483/5270, uneven) or a
    category_names.csv path."""
    if kind in SHAPES:
        return Taxonomy.from_rows(tree_rows(*SHAPES[kind], seed=seed))
    if os.path.isdir(kind):
        raise TaxonomyError(f"--taxonomy {kind}: a folder; expected one of {', '.join(SHAPES)} "
                            f"or the path of a category_names.csv")
    if os.path.exists(kind):
        return Taxonomy.from_csv(kind)
    raise TaxonomyError(
        f"--taxonomy {kind!r}: expected one of {', '.join(SHAPES)} or the path of a "
        "category_names.csv (no such file)"
    )
