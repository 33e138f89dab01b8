"""Two versions of a synthetic catalog's taxonomy, as a living catalog's tree changes.

:func:`evolve` reads a catalog :func:`hierarchy.synth.generate` wrote (its leaves are the truth:
every leaf is drawn with its own look) and writes ``v1/`` and ``v2/`` beside each other, each a
whole catalog (``category_names.csv``, ``train.bson``, ``test.bson``, ``test_solution.csv``),
and ``changes.json`` (what changed, by category id):

- **split**: a pair of sibling leaves (a, b) is one leaf, a, in v1 (b's products carry a's id,
  b is not in the table); v2 tells them apart: a -> [a, b]. The split is learnable because the
  two looks were always different, as a leaf that grew is split along what its products are.
- **merged**: a pair of sibling leaves (c, d) of v1 is one new leaf m in v2 (their products
  carry m's id): m <- [c, d].
- **added under a new level-2 node**: the leaves of one level-2 node are absent from v1 (no
  row, no product); v2 holds them with ``new_products`` training products each, as a new
  product line arrives with a handful of labelled products (its test products are all kept,
  so their accuracy is measured on more than a handful).

Products keep their ids and pictures (the BSON documents are re-encoded with another
``category_id`` only): the products of v1 are the products of v2, relabelled.
"""

from __future__ import annotations

import csv
import os
from typing import Dict, List, Tuple

import bson
import numpy as np

from hierarchy.contracts import storage
from hierarchy.contracts.taxonomy import Taxonomy

FILES = ("train.bson", "test.bson")


def _pick(tax: Taxonomy, rng: np.random.Generator, splits: int, merges: int
          ) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]], List[int]]:
    """(split pairs, merged pairs, the leaves of the new level-2 node), as category ids; the
    new node is chosen first, the pairs among siblings of the other nodes."""
    nodes: Dict[int, List[int]] = {}
    for l3, l2 in enumerate(tax.l2_of_l3):
        nodes.setdefault(int(l2), []).append(int(tax.category_ids[l3]))
    order = [n for n in rng.permutation(sorted(nodes)) if len(nodes[int(n)]) >= 2]
    if len(order) < 1 + splits + merges:
        raise ValueError(f"a tree of {len(nodes)} level-2 nodes has too few with two leaves "
                         f"for {splits} split(s), {merges} merge(s) and a new node")
    new_node = nodes[int(order[0])]
    pairs = [tuple(int(c) for c in rng.choice(nodes[int(n)], 2, replace=False))
             for n in order[1:1 + splits + merges]]
    return pairs[:splits], pairs[splits:], new_node


def _tables(tax: Taxonomy, split, merged, new_node) -> Tuple[list, list, Dict[int, int]]:
    """(v1 rows, v2 rows, merged leaf -> its new id)."""
    rows = {r[0]: r for r in tax.to_rows()}
    gone_v1 = {b for _, b in split} | set(new_node)
    v1 = [r for c, r in rows.items() if c not in gone_v1]
    next_id = max(rows) + 1
    into, v2 = {}, [r for c, r in rows.items() if c not in {x for p in merged for x in p}]
    for c, d in merged:
        m, next_id = next_id, next_id + 1
        into[c] = into[d] = m
        v2.append((m, rows[c][1], rows[c][2], f"{rows[c][3]} + {rows[d][3].rsplit('/', 1)[-1]}"))
    return v1, v2, into


def _write(folder: str, rows, docs: Dict[str, List[bytes]], solution: List[Tuple[int, int]]):
    os.makedirs(folder, exist_ok=True)
    Taxonomy.from_rows(rows).to_csv(os.path.join(folder, "category_names.csv"))
    for name in FILES:
        with storage.atomic_local_file(os.path.join(folder, name)) as tmp, open(tmp, "wb") as f:
            f.writelines(docs[name])
    with open(os.path.join(folder, "test_solution.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("_id", "category_id"))
        w.writerows(solution)


def evolve(source: str, output: str, seed: int = 0, splits: int = 2, merges: int = 1,
           new_products: int = 8) -> dict:
    """Write ``output/v1``, ``output/v2`` and ``output/changes.json`` from the catalog in
    ``source`` (module notes); returns the changes."""
    tax = Taxonomy.from_csv(os.path.join(source, "category_names.csv"))
    rng = np.random.default_rng([seed, 4301])
    split, merged, new_node = _pick(tax, rng, splits, merges)
    v1_rows, v2_rows, into = _tables(tax, split, merged, new_node)
    as_v1 = {b: a for a, b in split}
    fresh = set(new_node)
    with open(os.path.join(source, "test_solution.csv")) as fh:
        truth = {int(r["_id"]): int(r["category_id"]) for r in csv.DictReader(fh)}
    docs = {v: {name: [] for name in FILES} for v in ("v1", "v2")}
    solution: Dict[str, List[Tuple[int, int]]] = {"v1": [], "v2": []}
    kept_new: Dict[int, int] = {c: 0 for c in fresh}
    for name in FILES:
        with open(os.path.join(source, name), "rb") as fh:
            for doc in bson.decode_file_iter(fh):
                pid = int(doc["_id"])
                cid = int(doc.get("category_id", truth.get(pid, -1)))
                test = name == "test.bson"
                if cid in fresh:
                    if test or kept_new[cid] < new_products:
                        kept_new[cid] += 0 if test else 1
                        docs["v2"][name].append(bson.encode(doc))
                        if test:
                            solution["v2"].append((pid, cid))
                    continue
                for v, label in (("v1", as_v1.get(cid, cid)), ("v2", into.get(cid, cid))):
                    if not test:
                        doc = {**doc, "category_id": label}
                    else:
                        solution[v].append((pid, label))
                    docs[v][name].append(bson.encode(doc))
    for v, rows in (("v1", v1_rows), ("v2", v2_rows)):
        _write(os.path.join(output, v), rows, docs[v], solution[v])
    changes = {"split": {str(a): sorted([a, b]) for a, b in split},
               "merged": {str(m): sorted(c for c, n in into.items() if n == m)
                          for m in sorted(set(into.values()))},
               "added_under_new_node": sorted(fresh),
               "new_products_per_leaf": new_products}
    storage.write_json_atomic(os.path.join(output, "changes.json"), changes)
    return changes
