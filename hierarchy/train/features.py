"""The trunk features the heads of ``--mode experts``, ``refit`` and ``fusion`` train on: where
they live and how they are read.

:mod:`hierarchy.train.experts`' feature pass writes them beside the model, partitioned by split
and level-1 branch (``<key>/features/split=train/l1=7/part-<rank>-*.parquet``; columns
``product_id``, ``img_idx``, ``l3``, ``features``). A branch's head lists and reads its own
``l1=`` folder only (:func:`group_batches`, row group by row group); a head over every leaf
reads them all (:func:`feature_files`: :mod:`hierarchy.train.fusion` gathers each file's
products). Numpy and pyarrow only.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from hierarchy.contracts import storage
from hierarchy.train.spec import TrainSpec

Select = Callable[[np.ndarray], np.ndarray]  # product ids -> which rows to keep

FEATURES = "features"


def features_dir(spec: TrainSpec) -> str:
    return storage.local_path(storage.join(spec.run.model_dir(spec.key), FEATURES))


def branch_folder(root: str, split: str, branch: int) -> str:
    """Where a branch's feature rows of a split live: the only folder its head reads."""
    return os.path.join(root, f"split={split}", f"l1={int(branch)}")


def _branch_files(root: str, split: str, branch: int) -> List[str]:
    """A branch's feature files of a split: listed from its own folder only."""
    folder = branch_folder(root, split, branch)
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".parquet")]


def feature_files(root: str, split: str) -> List[str]:
    """Every feature file of a split, all branches (what a head over every leaf reads)."""
    folder = os.path.join(root, f"split={split}")
    if not os.path.isdir(folder):
        return []
    return [path for name in sorted(os.listdir(folder)) if name.startswith("l1=")
            for path in _branch_files(root, split, int(name[3:]))]


def branch_row_groups(root: str, split: str, branch: int) -> List[Tuple[str, int]]:
    """(file, row group) of a branch's feature rows: listed from its own folder only."""
    import pyarrow.parquet as pq

    return [(path, i) for path in _branch_files(root, split, branch)
            for i in range(pq.ParquetFile(path).metadata.num_row_groups)]


def branch_rows(root: str, split: str, branch: int) -> int:
    """Feature rows of a branch in a split, from the Parquet footers."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(path).metadata.num_rows
               for path in _branch_files(root, split, branch))


def group_batches(root: str, split: str, branches, local_of_l3: np.ndarray,
                  seed: Optional[int] = None, select: Optional[Select] = None
                  ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(features float32 [n, D], expert-local labels [n]) per row group of the level-1
    ``branches``, in a random order when ``seed`` is given; with ``select`` (product ids ->
    bool), only the rows of the products it keeps. Only their own folders are opened."""
    import pyarrow.parquet as pq

    groups = group_row_groups(root, split, branches)
    if seed is not None:
        np.random.default_rng(seed).shuffle(groups)
    files = {}  # each file's footer is read once per pass, whatever the order of its groups
    for path, i in groups:
        if path not in files:
            files[path] = pq.ParquetFile(path)
        columns = ["l3", "features"] + (["product_id"] if select is not None else [])
        t = files[path].read_row_group(i, columns=columns)
        col = t.column("features").combine_chunks()
        d = col.type.list_size
        feats = col.values.to_numpy(zero_copy_only=False).reshape(-1, d)
        labels = local_of_l3[t.column("l3").to_numpy()]
        if select is not None:
            keep = select(t.column("product_id").to_numpy())
            feats, labels = feats[keep], labels[keep]
        yield feats, labels


def group_row_groups(root: str, split: str, branches) -> List[Tuple[str, int]]:
    return [rg for b in branches for rg in branch_row_groups(root, split, b)]
