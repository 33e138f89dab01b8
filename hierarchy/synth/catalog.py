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

from hierarchy.contracts import storage
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.synth.images import FAST, HARD, DrawStyle, render_product
from hierarchy.synth.plant import TRUTH, TRUTH_HEADER, Planter, Plants
from hierarchy.synth.taxonomy import make_taxonomy

BLOCK = 256
# Pictures per product: 1..4, mean 1.75 like the real train set (12.37M images / 7.07M products).
VIEWS_P = (0.55, 0.25, 0.10, 0.10)
TRAIN, TEST = "train", "test"
FILES = {TRAIN: "train.bson", TEST: "test.bson"}
# the test dump's true categories, as Kaggle keeps a solution file: benchmarks score test with
# it; the pipeline never reads it (test.bson stays unlabelled, as the real one)
SOLUTION = "test_solution.csv"


@dataclass(frozen=True)
class Preset:
    """How hard a synthetic catalog is.

    fast  every level leaves a clear trace: the demo's and the tests' catalog, learnt in
          seconds (a small CNN reaches ~100% level-3 accuracy);
    hard  a benchmark that can tell strategies apart: confusable siblings (they share their
          level-2 pattern and differ by orientation, density, badges, blurred by pose
          jitter), a long tail (Zipf ~0.9 over leaves), a few % of train labels moved to a
          sibling, extra views that are packaging or a box's back, clutter, scale and pose
          variation;
    tangled  the hard preset's pictures with the coarse level made the hard one: the look of
          each leaf is another leaf's, drawn at random, so leaves that look alike (and share a
          pattern) sit in different level-1 branches. A level-1 or level-2 node is then hardly
          surer than its leaf: the catalog where a taxonomy cannot help a decision."""

    name: str
    taxonomy: str            # the tree when none is given
    zipf: float              # leaf frequency ~ (rank + offset) ** -zipf
    zipf_offset: float
    label_noise: float       # share of train labels moved to a sibling leaf
    look: DrawStyle
    tangled: bool = False    # each leaf drawn with another leaf's look (see above)


PRESETS = {
    "fast": Preset("fast", "small", 1.1, 20.0, 0.0, FAST),
    "hard": Preset("hard", "hard", 0.9, 1.0, 0.04, HARD),
    "tangled": Preset("tangled", "hard", 0.9, 1.0, 0.04, HARD, tangled=True),
}


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs, sent once per process rather than once per block."""

    seed: int
    looks: np.ndarray  # (n_l3, 3): level-1, level-2 rank in its branch, leaf rank in its level-2
    category_ids: np.ndarray  # int64, by level-3 id
    weights: np.ndarray  # probability of each leaf
    preset: Preset = PRESETS["fast"]
    siblings: Tuple[np.ndarray, ...] = ()  # per leaf, the leaves a noisy label may move to
    plants: Plants = Plants()


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


def drawn_looks(tax: Taxonomy, preset: Preset, seed: int) -> np.ndarray:
    """The look each leaf is drawn with: its own, or under the tangled preset another leaf's
    (a seeded permutation), so what a leaf looks like no longer says which branch it is in."""
    looks = leaf_looks(tax)
    if preset.tangled:
        looks = looks[np.random.default_rng([seed, 7004]).permutation(tax.n_l3)]
    return looks


def category_weights(n_l3: int, seed: int, exponent: float = 1.1,
                     offset: float = 20.0) -> np.ndarray:
    """Zipf-like leaf frequencies in a seeded random order; every leaf keeps a nonzero share.

    With 5270 leaves (fast preset) the most frequent gets ~1.1% of the products, as in the
    real train set.
    """
    rank = np.random.default_rng([seed, 7002]).permutation(n_l3)
    w = (rank + offset) ** -exponent
    return w / w.sum()


def sibling_table(tax: Taxonomy) -> Tuple[np.ndarray, ...]:
    """Per leaf, where a noisy label goes: its level-2 siblings, else its level-1 cousins,
    else nowhere (itself)."""
    out = []
    for l3 in range(tax.n_l3):
        same = np.flatnonzero(tax.l2_of_l3 == tax.l2_of_l3[l3])
        if len(same) < 2:
            same = np.flatnonzero(tax.l1_of_l3 == tax.l1_of_l3[l3])
        others = same[same != l3]
        out.append(others if len(others) else np.array([l3]))
    return tuple(out)


def product_ids(n_train: int, n_test: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Distinct ids 0..n-1 shared out between the two files, each ascending.

    The real dump interleaves them the same way (test ids 10, 14, ... sit between train ids).
    """
    is_test = np.zeros(n_train + n_test, dtype=bool)
    is_test[np.random.default_rng([seed, 7003]).permutation(n_train + n_test)[:n_test]] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


_PLAN: Optional[Plan] = None
_PLANTER: Optional[Planter] = None


def _init_worker(plan: Plan) -> None:
    global _PLAN, _PLANTER
    _PLAN = plan
    _PLANTER = Planter(plan.plants, plan.seed, plan.looks, plan.category_ids, plan.weights,
                       plan.preset.look) if plan.plants.any else None


def render_block(task: Tuple[str, int, np.ndarray]) -> Tuple[str, bytes, int, np.ndarray, list]:
    """(split, BSON bytes, image count, level-3 ids, planted truth rows) of one block."""
    split, block, ids = task
    plan = _PLAN
    # plants draw from their own stream: the ordinary pictures stay what they were
    prng = np.random.default_rng([plan.seed, 7200, 0 if split == TRAIN else 1, block]) \
        if _PLANTER else None
    truth = []
    rng = np.random.default_rng([plan.seed, 0 if split == TRAIN else 1, block])
    leaves = rng.choice(len(plan.weights), size=len(ids), p=plan.weights)
    views = rng.choice(len(VIEWS_P), size=len(ids), p=VIEWS_P) + 1
    noisy = plan.preset.label_noise
    # drawn only when the preset has label noise: the fast preset's bytes stay what they were
    flips = rng.uniform(size=len(ids)) < noisy if noisy else np.zeros(len(ids), dtype=bool)
    chunks = []
    n_images = 0
    for pid, l3, n, flip in zip(ids.tolist(), leaves.tolist(), views.tolist(), flips.tolist()):
        l1, l2_local, l3_local = plan.looks[l3].tolist()
        pictures = render_product(l1, l2_local, l3_local, n, rng, plan.preset.look)
        label = None
        if split == TRAIN:
            label = int(rng.choice(plan.siblings[l3])) if flip else l3
        if _PLANTER:
            pictures, planted = _PLANTER.apply(prng, split == TRAIN, l3, pictures)
            cid = "" if label is None else int(plan.category_ids[label])
            truth.extend(f"{split},{pid},{i},{cid},{kind},{group}\n"
                         for i, kind, group in planted)
        # Key order matters: _id first and category_id last, as in the real files.
        doc = {"_id": pid, "imgs": [{"picture": p} for p in pictures]}
        if label is not None:
            doc["category_id"] = int(plan.category_ids[label])
        chunks.append(bson.encode(doc))
        n_images += len(pictures)
    return split, b"".join(chunks), n_images, leaves, truth


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
    taxonomy: Union[str, Taxonomy, None] = None,
    test_products: Optional[int] = None,
    workers: Optional[int] = None,
    progress: bool = True,
    preset: str = "fast",
    plants: Optional[Plants] = None,
) -> dict:
    """Write ``train.bson``, ``test.bson`` and ``category_names.csv`` under ``output_dir``.

    Each file is written under a temporary name and renamed when all are complete, so an
    interrupted run never leaves a file that looks finished. ``plants``: curation problems to
    plant, listed in ``curation_truth.csv`` (:mod:`hierarchy.synth.plant`). Returns counts,
    sizes and timing.
    """
    plants = plants or Plants()
    plants.check()
    started = time.perf_counter()
    if test_products is None:
        test_products = max(1, products // 4)
    if products < 0 or test_products < 0:
        raise ValueError(f"products ({products}) and test_products ({test_products}) must be >= 0")
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: one of {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    tax = _resolve(taxonomy or chosen.taxonomy, seed)
    plan = _plan(tax, chosen, seed, plants)
    train_ids, test_ids = product_ids(products, test_products, seed)
    n_blocks = -(-products // BLOCK) + -(-test_products // BLOCK)
    workers = max(1, min(workers or os.cpu_count() or 1, n_blocks))

    os.makedirs(output_dir, exist_ok=True)
    images, used, planted = _write_files(plan, tax, output_dir, train_ids, test_ids, workers,
                                         progress)
    seconds = time.perf_counter() - started
    files = dict(FILES, csv="category_names.csv", solution=SOLUTION)
    if not plants.any:
        os.remove(os.path.join(output_dir, TRUTH))  # nothing planted: no truth to score
    else:
        files["truth"] = TRUTH
    return {
        "output_dir": str(output_dir),
        "seed": seed,
        "preset": preset,
        "taxonomy": tax.summary(),
        "products": {TRAIN: products, TEST: test_products},
        "images": images,
        "bytes": {name: os.path.getsize(os.path.join(output_dir, name)) for name in files.values()},
        "categories": tax.n_l3,
        "planted": planted,
        "categories_used": int(used.sum()),
        "workers": workers,
        "seconds": round(seconds, 3),
        "products_per_second": round((products + test_products) / max(seconds, 1e-9), 1),
    }


def _plan(tax: Taxonomy, chosen, seed: int, plants: Plants) -> Plan:
    """What every worker draws products from: looks, category weights, label noise, plants."""
    return Plan(
        seed=seed,
        looks=drawn_looks(tax, chosen, seed),
        category_ids=np.asarray(tax.category_ids, dtype=np.int64),
        weights=category_weights(tax.n_l3, seed, chosen.zipf, chosen.zipf_offset),
        preset=chosen,
        siblings=sibling_table(tax) if chosen.label_noise else (),
        plants=plants,
    )


def _write_files(plan: Plan, tax: Taxonomy, output_dir: str, train_ids: np.ndarray,
                 test_ids: np.ndarray, workers: int, progress: bool):
    """Every file of the catalog, each under a temporary name and all renamed only when
    everything was written; (pictures per split, leaves used in train, planted problems)."""
    paths = {s: os.path.join(output_dir, name) for s, name in FILES.items()}
    csv_path = os.path.join(output_dir, "category_names.csv")
    images = {TRAIN: 0, TEST: 0}
    used = np.zeros(tax.n_l3, dtype=bool)
    with (
        storage.atomic_local_file(paths[TRAIN]) as train_tmp,
        storage.atomic_local_file(paths[TEST]) as test_tmp,
        storage.atomic_local_file(csv_path) as csv_tmp,
        storage.atomic_local_file(os.path.join(output_dir, SOLUTION)) as solution_tmp,
        storage.atomic_local_file(os.path.join(output_dir, TRUTH)) as truth_tmp,
    ):
        with (
            open(train_tmp, "wb") as f_train,
            open(test_tmp, "wb") as f_test,
            open(solution_tmp, "w") as f_solution,
            open(truth_tmp, "w") as f_truth,
            tqdm(
                total=len(train_ids) + len(test_ids), unit="product", disable=not progress,
                desc="synth"
            ) as bar,
        ):
            out = {TRAIN: f_train, TEST: f_test}
            f_solution.write("_id,category_id\n")
            f_truth.write(TRUTH_HEADER)
            planted = 0
            for split, blob, n_images, leaves, truth in _run(plan, train_ids, test_ids, workers,
                                                             solution=f_solution):
                out[split].write(blob)
                f_truth.writelines(truth)
                planted += len(truth)
                images[split] += n_images
                if split == TRAIN:
                    used[leaves] = True
                bar.update(len(leaves))
        tax.to_csv(csv_tmp)
    return images, used, planted


def _run(plan: Plan, train_ids: np.ndarray, test_ids: np.ndarray, workers: int, solution):
    """Blocks in order; the test blocks' true categories go to ``solution``."""
    tasks = list(_tasks(train_ids, test_ids))
    if workers == 1:
        # In-process: no pool start-up cost; also the reference a pool run must match byte for byte.
        _init_worker(plan)
        results = map(render_block, tasks)
    else:
        # forkserver, not fork: callers (tests, notebooks) may already run JVM or TF threads,
        # and forking a threaded process can deadlock.
        ctx = multiprocessing.get_context("forkserver")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(plan,))
        results = pool.imap(render_block, tasks)
    try:
        for (split, _, ids), result in zip(tasks, results):
            if split == TEST:
                leaves = result[3]
                solution.writelines(f"{pid},{plan.category_ids[l3]}\n"
                                    for pid, l3 in zip(ids.tolist(), leaves.tolist()))
            yield result
    finally:
        if workers != 1:
            pool.terminate()
            pool.join()
