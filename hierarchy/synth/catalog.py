"""Write a synthetic catalog in the exact Kaggle Cdiscount format.

``train.bson`` / ``test.bson`` are plain concatenations of BSON documents
``{_id, imgs: [{picture: <JPEG>}, ...], category_id}`` (no ``category_id`` in test), and
``category_names.csv`` is the category table. Products are cut into fixed blocks, each with its
own seed, rendered in a process pool and written in block order: the files are byte-identical
for a seed whatever the number of workers, and they are streamed, never held in memory.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple, Union

import bson
import numpy as np
from tqdm import tqdm

from hierarchy import storage
from hierarchy.synth.images import render_product
from hierarchy.synth.taxonomy import make_taxonomy
from hierarchy.taxonomy import Taxonomy

BLOCK = 256
# Pictures per product: 1..4, mean 1.75 like the real train set (12.37M images / 7.07M products).
VIEWS_P = (0.55, 0.25, 0.10, 0.10)
TRAIN, TEST = "train", "test"
FILES = {TRAIN: "train.bson", TEST: "test.bson"}


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs, sent once per process rather than once per block."""

    seed: int
    looks: np.ndarray  # (n_l3, 3): level-1, level-2 rank in its branch, leaf rank in its level-2
    category_ids: np.ndarray  # int64, by level-3 id
    weights: np.ndarray  # probability of each leaf


def leaf_looks(tax: Taxonomy) -> np.ndarray:
    """Per leaf: level-1 id, rank of its level-2 inside the branch, rank among its siblings."""
    looks = np.zeros((tax.n_l3, 3), dtype=np.int64)
    l2_rank: Dict[Tuple[int, int], int] = {}
    for l1, l2 in sorted({(int(a), int(b)) for a, b in zip(tax.l1_of_l3, tax.l2_of_l3)}):
        l2_rank[(l1, l2)] = sum(1 for key in l2_rank if key[0] == l1)
    siblings: Dict[Tuple[int, int], int] = {}
    for l3 in range(tax.n_l3):
        key = (int(tax.l1_of_l3[l3]), int(tax.l2_of_l3[l3]))
        looks[l3] = (key[0], l2_rank[key], siblings.get(key, 0))
        siblings[key] = siblings.get(key, 0) + 1
    return looks


def category_weights(n_l3: int, seed: int) -> np.ndarray:
    """Zipf-like leaf frequencies in a seeded random order; every leaf keeps a nonzero share.

    With 5270 leaves the most frequent gets ~1.1% of the products, as in the real train set.
    """
    rank = np.random.default_rng([seed, 7002]).permutation(n_l3)
    w = (rank + 20.0) ** -1.1
    return w / w.sum()


def product_ids(n_train: int, n_test: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Distinct ids 0..n-1 shared out between the two files, each ascending.

    The real dump interleaves them the same way (test ids 10, 14, ... sit between train ids).
    """
    is_test = np.zeros(n_train + n_test, dtype=bool)
    is_test[np.random.default_rng([seed, 7003]).permutation(n_train + n_test)[:n_test]] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


_PLAN: Optional[Plan] = None


def _init_worker(plan: Plan) -> None:
    global _PLAN
    _PLAN = plan


def render_block(task: Tuple[str, int, np.ndarray]) -> Tuple[str, bytes, int, np.ndarray]:
    """(split, BSON bytes, image count, level-3 ids) of one block of products."""
    split, block, ids = task
    plan = _PLAN
    rng = np.random.default_rng([plan.seed, 0 if split == TRAIN else 1, block])
    leaves = rng.choice(len(plan.weights), size=len(ids), p=plan.weights)
    views = rng.choice(len(VIEWS_P), size=len(ids), p=VIEWS_P) + 1
    chunks = []
    for pid, l3, n in zip(ids.tolist(), leaves.tolist(), views.tolist()):
        l1, l2_local, l3_local = plan.looks[l3].tolist()
        pictures = render_product(l1, l2_local, l3_local, n, rng)
        # Key order matters: _id first and category_id last, as in the real files.
        doc = {"_id": pid, "imgs": [{"picture": p} for p in pictures]}
        if split == TRAIN:
            doc["category_id"] = int(plan.category_ids[l3])
        chunks.append(bson.encode(doc))
    return split, b"".join(chunks), int(views.sum()), leaves


def _tasks(train_ids: np.ndarray, test_ids: np.ndarray) -> Iterator[Tuple[str, int, np.ndarray]]:
    for split, ids in ((TRAIN, train_ids), (TEST, test_ids)):
        for block, start in enumerate(range(0, len(ids), BLOCK)):
            yield split, block, ids[start : start + BLOCK]


def _resolve(taxonomy: Union[str, Taxonomy], seed: int) -> Taxonomy:
    return taxonomy if isinstance(taxonomy, Taxonomy) else make_taxonomy(str(taxonomy), seed)


def generate(
    output_dir: str,
    products: int,
    seed: int = 0,
    taxonomy: Union[str, Taxonomy] = "small",
    test_products: Optional[int] = None,
    workers: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """Write ``train.bson``, ``test.bson`` and ``category_names.csv`` under ``output_dir``.

    Each file is written under a temporary name and renamed when all are complete, so an
    interrupted run never leaves a file that looks finished. Returns counts, sizes and timing.
    """
    started = time.perf_counter()
    if test_products is None:
        test_products = max(1, products // 4)
    if products < 0 or test_products < 0:
        raise ValueError(f"products ({products}) and test_products ({test_products}) must be >= 0")
    tax = _resolve(taxonomy, seed)
    plan = Plan(
        seed=seed,
        looks=leaf_looks(tax),
        category_ids=np.asarray(tax.category_ids, dtype=np.int64),
        weights=category_weights(tax.n_l3, seed),
    )
    train_ids, test_ids = product_ids(products, test_products, seed)
    n_blocks = -(-products // BLOCK) + -(-test_products // BLOCK)
    workers = max(1, min(workers or os.cpu_count() or 1, n_blocks))

    os.makedirs(output_dir, exist_ok=True)
    paths = {s: os.path.join(output_dir, name) for s, name in FILES.items()}
    csv_path = os.path.join(output_dir, "category_names.csv")
    images = {TRAIN: 0, TEST: 0}
    used = np.zeros(tax.n_l3, dtype=bool)
    # each file under a temporary name, all renamed only when everything was written
    with (
        storage.atomic_local_file(paths[TRAIN]) as train_tmp,
        storage.atomic_local_file(paths[TEST]) as test_tmp,
        storage.atomic_local_file(csv_path) as csv_tmp,
    ):
        with (
            open(train_tmp, "wb") as f_train,
            open(test_tmp, "wb") as f_test,
            tqdm(
                total=products + test_products, unit="product", disable=not progress, desc="synth"
            ) as bar,
        ):
            out = {TRAIN: f_train, TEST: f_test}
            for split, blob, n_images, leaves in _run(plan, train_ids, test_ids, workers):
                out[split].write(blob)
                images[split] += n_images
                if split == TRAIN:
                    used[leaves] = True
                bar.update(len(leaves))
        tax.to_csv(csv_tmp)

    seconds = time.perf_counter() - started
    files = dict(FILES, csv="category_names.csv")
    return {
        "output_dir": str(output_dir),
        "seed": seed,
        "taxonomy": tax.summary(),
        "products": {TRAIN: products, TEST: test_products},
        "images": images,
        "bytes": {name: os.path.getsize(os.path.join(output_dir, name)) for name in files.values()},
        "categories": tax.n_l3,
        "categories_used": int(used.sum()),
        "workers": workers,
        "seconds": round(seconds, 3),
        "products_per_second": round((products + test_products) / max(seconds, 1e-9), 1),
    }


def _run(plan: Plan, train_ids: np.ndarray, test_ids: np.ndarray, workers: int):
    tasks = _tasks(train_ids, test_ids)
    if workers == 1:
        # In-process: no pool start-up cost; also the reference a pool run must match byte for byte.
        _init_worker(plan)
        yield from map(render_block, tasks)
        return
    # forkserver, not fork: callers (tests, notebooks) may already run JVM or TF threads,
    # and forking a threaded process can deadlock.
    ctx = multiprocessing.get_context("forkserver")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(plan,)) as pool:
        yield from pool.imap(render_block, tasks)
