"""Deterministic train/val assignment by product id.

A product's split is a pure function of (seed, product id), so all its pictures land in the
same split, in any run and on any partitioning.

How val is drawn (``ingest.val_draw``) decides what the decisions' promise covers:

- ``product`` (the default): by the hash alone, independently of the category, so val holds
  rare and unseen leaves at the rate new products do — a category whose few products all fall
  in val is one training never sees, exactly as a new product's leaf may be. The certificate
  evaluate fits on val then covers products drawn like the dump, long tail included.
- ``category``: in every category the product with the smallest hash stays in train, so every
  category with a product keeps one in train. Val then under-represents the tail (a category
  with one product never reaches it): more categories trained, a promise that holds only on
  products of categories with several (README "Decisions", what the promise covers)."""

from __future__ import annotations

import numpy as np

from hierarchy.contracts.manifest import VAL_DRAWS
from hierarchy.ingest.scan import NO_VALUE

# split codes: indexes into hierarchy.contracts.dataset.SPLITS
TRAIN, VAL, TEST = 0, 1, 2

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def unit_hash(product_ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (id, seed) mapped to [0, 1): stable across platforms and numpy versions."""
    with np.errstate(over="ignore"):
        z = product_ids.astype(np.int64).view(np.uint64) + np.uint64(seed) * _GOLDEN + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def assign_splits(product_ids: np.ndarray, category_ids: np.ndarray, kind: str,
                  val_fraction: float, seed: int, draw: str = VAL_DRAWS[0]) -> np.ndarray:
    """Split code (TRAIN/VAL/TEST) per document, aligned with the inputs; ``draw`` one of
    :data:`hierarchy.contracts.manifest.VAL_DRAWS` (module notes)."""
    n = len(product_ids)
    if kind == "test":
        return np.full(n, TEST, dtype=np.uint8)
    u = unit_hash(product_ids, seed)
    codes = np.where(u < val_fraction, VAL, TRAIN).astype(np.uint8)
    if draw == "product":
        return codes
    known = np.flatnonzero(category_ids != NO_VALUE)
    if len(known):
        # lowest hash first within each category; the first of each group stays in train
        order = known[np.lexsort((u[known], category_ids[known]))]
        cats = category_ids[order]
        firsts = order[np.r_[True, cats[1:] != cats[:-1]]]
        codes[np.isin(product_ids, product_ids[firsts])] = TRAIN
    return codes
