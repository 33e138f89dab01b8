"""Taxonomy versions: what a model's outputs mean, and how two versions of the tree relate.

A version is a category table's fingerprint (:attr:`Taxonomy.fingerprint`). A leaf is its
``category_id`` in every version; each version has its own position map (level-3 id = rank by
``category_id``), so a leaf added in the middle of the id range moves the positions of the
leaves after it but never their identity. Every model records the ids its outputs stand for,
in output order (``output_ids`` in its metrics.json): a flat, refit or fusion model the leaves'
category ids, a level-1 model the level-1 names, a branch model the category ids of its
branch's leaves. A model is usable under a version whose ids for it are the same list, whatever
changed elsewhere in the tree, which is what keeps the models of untouched branches valid. A
model whose outputs span the whole tree's structure (multi-level, experts) is usable only under
its own version.

Across versions, a head's per-leaf rows are carried by id (:func:`carry_rows`); two tables are
compared by :func:`diff_tables`; with the products present in both versions, the leaves that
were split or merged are inferred from how their products moved (:func:`split_and_merged`).

Numpy only.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from hierarchy.contracts import modelstore
from hierarchy.contracts.taxonomy import Taxonomy

OUTPUT_IDS = "output_ids"  # metrics.json: the ids of a model's outputs, in order
# models whose outputs are leaves of the whole tree (a leaf's id is its category_id)
LEAF_MODELS = (modelstore.FLAT, modelstore.REFIT, modelstore.FUSION)


def output_ids(taxonomy: Taxonomy, key: str) -> Optional[list]:
    """The ids model ``key``'s outputs stand for under ``taxonomy``, in output order; None for a
    model that needs the whole tree as it was (multi-level, experts)."""
    if key == modelstore.LEVEL1:
        return list(taxonomy.l1_names)
    if key in LEAF_MODELS:
        return [int(c) for c in taxonomy.category_ids]
    b = modelstore.branch_of(key)
    if b is not None:
        if not 0 <= b < taxonomy.n_l1:
            return []
        return [int(taxonomy.category_ids[i]) for i in taxonomy.branch(b)]
    return None


def recorded(taxonomy: Taxonomy, key: str) -> dict:
    """What a model's metrics.json says of its taxonomy version: the table's fingerprint and
    the ids of its outputs (what :func:`unusable` reads back)."""
    return {"taxonomy_fingerprint": taxonomy.fingerprint,
            OUTPUT_IDS: output_ids(taxonomy, key)}


def _sample(ids: Sequence, n: int = 5) -> str:
    shown = ", ".join(str(i) for i in list(ids)[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


def unusable(taxonomy: Taxonomy, key: str, metrics: dict) -> Optional[str]:
    """Why model ``key`` (its ``metrics``) cannot score under ``taxonomy``, or None when it
    can: its own version, or outputs that stand for the very ids this version has for it."""
    fingerprint = metrics.get("taxonomy_fingerprint")
    if fingerprint == taxonomy.fingerprint:
        return None
    want, got = output_ids(taxonomy, key), metrics.get(OUTPUT_IDS)
    version = f"taxonomy version {str(fingerprint)[:19]}"
    if want is None:
        return (f"model {key} was trained on {version} and needs the whole tree as it was "
                f"(the dataset has {taxonomy.fingerprint[:19]})")
    if got is None:
        return (f"model {key} was trained on {version} and does not record its output ids "
                f"(trained before versions were recorded); the dataset has "
                f"{taxonomy.fingerprint[:19]}")
    if [str(i) for i in got] == [str(i) for i in want]:
        return None
    have, need = set(map(str, got)), set(map(str, want))
    missing = [i for i in want if str(i) not in have]
    extra = [i for i in got if str(i) not in need]
    parts = ([f"{len(missing)} id(s) of this version it has no output for ({_sample(missing)})"]
             if missing else []) + \
            ([f"{len(extra)} output(s) this version does not have ({_sample(extra)})"]
             if extra else [])
    return (f"model {key} was trained on {version}: " + "; ".join(parts or ["another order"])
            + f" (the dataset has {taxonomy.fingerprint[:19]})")


def carry_rows(kernel: np.ndarray, bias: np.ndarray, old: Taxonomy, new: Taxonomy
               ) -> Tuple[np.ndarray, np.ndarray, int]:
    """A leaf head's rows (``kernel`` [D, old.n_l3], ``bias`` [old.n_l3]) carried to ``new``'s
    leaves by category id: a leaf of both versions keeps its own row, exactly; a new leaf
    starts from the mean row of its old siblings (same level-2 name, else level-1 name, else
    every leaf) with its bias lowered by log(siblings + 1), so it starts as a share of its
    parent rather than as a rival. Returns (kernel, bias, leaves carried)."""
    kernel, bias = np.asarray(kernel, np.float32), np.asarray(bias, np.float32)
    out_k = np.zeros((kernel.shape[0], new.n_l3), np.float32)
    out_b = np.zeros(new.n_l3, np.float32)
    by_l2, by_l1 = defaultdict(list), defaultdict(list)
    for i in range(old.n_l3):
        l1, l2, _ = old.names_of_l3(i)
        by_l2[(l1, l2)].append(i)
        by_l1[l1].append(i)
    carried = 0
    for j, cid in enumerate(new.category_ids):
        try:
            i = old.l3_of_category(cid)
        except KeyError:
            l1, l2, _ = new.names_of_l3(j)
            kin = by_l2.get((l1, l2)) or by_l1.get(l1) or list(range(old.n_l3))
            out_k[:, j] = kernel[:, kin].mean(axis=1)
            out_b[j] = bias[kin].mean() - np.log(len(kin) + 1.0)
            continue
        out_k[:, j], out_b[j] = kernel[:, i], bias[i]
        carried += 1
    return out_k, out_b, carried


def diff_tables(old: Taxonomy, new: Taxonomy) -> Dict[str, List[int]]:
    """What the two tables say: leaves ``added`` and ``removed``, ``renamed`` (same id, other
    level-3 name) and ``moved`` (same id, another level-1 or level-2 parent)."""
    old_ids, new_ids = set(old.category_ids), set(new.category_ids)
    renamed, moved = [], []
    for cid in sorted(old_ids & new_ids):
        was = old.names_of_l3(old.l3_of_category(cid))
        now = new.names_of_l3(new.l3_of_category(cid))
        if was[:2] != now[:2]:
            moved.append(int(cid))
        if was[2] != now[2]:
            renamed.append(int(cid))
    return {"added": sorted(int(c) for c in new_ids - old_ids),
            "removed": sorted(int(c) for c in old_ids - new_ids),
            "renamed": renamed, "moved": moved}


def split_and_merged(pairs: Iterable[Tuple[int, int, int]], min_share: float,
                     totals: Optional[Tuple[Dict[int, int], Dict[int, int]]] = None
                     ) -> Tuple[Dict[int, List[int]], Dict[int, List[int]]]:
    """From (old category, new category, products) counts of the products present in both
    versions: ``split`` (old id -> the new ids its products now carry) and ``merged`` (new id
    -> the old ids its products came from). A destination (or source) counts when it holds at
    least ``min_share`` of the leaf's products: a catalog's label fixes move a few products
    between leaves every night, and are not a change of the tree. ``totals``: products per
    old and per new leaf, when ``pairs`` holds only the pairs that can count."""
    out_of, into = defaultdict(dict), defaultdict(dict)
    for old, new, n in pairs:
        out_of[int(old)][int(new)] = out_of[int(old)].get(int(new), 0) + int(n)
        into[int(new)][int(old)] = into[int(new)].get(int(old), 0) + int(n)

    def spread(counts: Dict[int, Dict[int, int]], total: Optional[Dict[int, int]]
               ) -> Dict[int, List[int]]:
        found = {}
        for key, dest in counts.items():
            whole = total[key] if total is not None else sum(dest.values())
            kept = sorted(d for d, n in dest.items() if n >= min_share * whole)
            if len(kept) >= 2:
                found[key] = kept
        return dict(sorted(found.items()))

    out_totals, in_totals = totals if totals is not None else (None, None)
    return spread(out_of, out_totals), spread(into, in_totals)
