"""Training targets shaped by the taxonomy: hierarchy-aware label smoothing, where a leaf's
smoothing mass goes mostly to its siblings, less to its cousins, least to strangers
(``train.kinship_smoothing``; :class:`hierarchy.contracts.model.KinshipCrossentropy` builds
the same rows per batch)."""

from __future__ import annotations

from typing import Tuple

import numpy as np

from hierarchy.contracts.taxonomy import Taxonomy

KINSHIP = ("sibling", "cousin", "stranger")


def kinship_smoothing(taxonomy: Taxonomy, epsilon: float,
                      shares: Tuple[float, float, float] = (0.6, 0.3, 0.1)) -> np.ndarray:
    """Hierarchy-aware label smoothing, compactly: per leaf [n_l3, 4] the target mass of the
    leaf itself and of *each* sibling (same level 2), cousin (same level 1, other level 2)
    and stranger (other level 1).

    ``epsilon`` is spread over the other leaves by ``shares`` of it per group, evenly inside
    a group; an empty group passes its share on to the next (the last back to the leaf).
    Each member of a closer group gets at least as much as each member of a farther one: where
    group sizes would break that (few strangers, many siblings), the groups are pooled
    (pool-adjacent-violators), so the order always holds and rows always sum to one.
    :func:`smoothing_targets` expands rows of it; the training loss builds the same rows."""
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    l1, l2 = taxonomy.l1_of_l3, taxonomy.l2_of_l3
    n_l2 = np.bincount(l2, minlength=taxonomy.n_l2)[l2]
    n_l1 = np.bincount(l1, minlength=taxonomy.n_l1)[l1]
    sizes = np.stack([n_l2 - 1, n_l1 - n_l2, taxonomy.n_l3 - n_l1], axis=1).astype(float)
    out = np.zeros((taxonomy.n_l3, 4))
    for i, size in enumerate(sizes):
        mass = [epsilon * s for s in shares]
        for g in range(3):  # an empty group's share moves on to the next group
            if size[g] == 0 and g < 2:
                mass[g + 1] += mass[g]
                mass[g] = 0.0
        keep = 1.0 - epsilon + (mass[2] if size[2] == 0 else 0.0)
        if size[2] == 0:
            mass[2] = 0.0
        # blocks of (total mass, members), merged while a closer block gets less per member
        blocks = [[mass[g], size[g], [g]] for g in range(3) if size[g] > 0]
        j = 0
        while j < len(blocks) - 1:
            a, b = blocks[j], blocks[j + 1]
            if a[0] / a[1] < b[0] / b[1] - 1e-15:
                blocks[j:j + 2] = [[a[0] + b[0], a[1] + b[1], a[2] + b[2]]]
                j = max(j - 1, 0)
            else:
                j += 1
        out[i, 0] = keep
        for total, members, gs in blocks:
            for g in gs:
                out[i, 1 + g] = total / members
    return out


def smoothing_targets(kinship: np.ndarray, taxonomy: Taxonomy, leaves: np.ndarray) -> np.ndarray:
    """Full target rows [len(leaves), n_l3] of :func:`kinship_smoothing` for some leaves."""
    leaves = np.asarray(leaves, dtype=np.int64).reshape(-1)
    l1, l2 = taxonomy.l1_of_l3, taxonomy.l2_of_l3
    same_l2 = l2[leaves][:, None] == l2[None, :]
    same_l1 = l1[leaves][:, None] == l1[None, :]
    k = kinship[leaves]
    rows = np.where(same_l2, k[:, 1:2], np.where(same_l1, k[:, 2:3], k[:, 3:4]))
    rows[np.arange(leaves.size), leaves] = k[:, 0]
    return rows
