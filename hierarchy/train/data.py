"""Petastorm ``images/`` -> ``tf.data`` for training and validation.

One call, :func:`make_dataset`, gives a Horovod worker its stream of
``(images float32 [B, S, S, 3], labels int32 [B])``:

1. **Read** (Petastorm batch reader, threads): the ``jpeg``, ``l1`` and ``l3`` columns of one
   split (``split`` is the Hive partition, so other splits' files are never opened). A branch
   model passes a predicate on ``l1``: Petastorm reads that small column first and loads the
   JPEG column only for row groups where some row matches, then keeps the matching rows.
2. **Shard**: Petastorm gives each worker the row groups whose index is ``rank`` modulo
   ``world_size`` — no worker reads another's bytes. When that would leave some worker with no
   rows (fewer row groups than workers, or a branch present in too few row groups), every
   worker reads the whole split in one fixed order instead and ``Dataset.shard`` keeps every
   ``world_size``-th row: Petastorm itself refuses more shards than row groups, and with
   ``num_epochs=None`` a worker whose shard holds no matching row would wait forever.
3. **Shuffle** the (small) JPEG byte strings, not decoded pixels: the buffer costs ~5 KB a
   row, and nothing decoded is ever written to disk or cached.
4. **Decode** in TensorFlow (``decode_jpeg``, one picture at a time), then one resampling to
   ``image_size``: plain bilinear resize for validation; for training a single affine map
   that does the random crop (85-100 % of the side, anywhere in the picture), the resize, a
   random horizontal flip and a rotation of up to +-10 degrees in one bilinear pass, followed
   by a small colour jitter (brightness, contrast, saturation). Random draws are stateless,
   seeded by ``seed`` and the element's position in the stream, so a given seed and read order
   give the same pictures. Then ``preprocess`` (pixels in [0, 255] -> what the backbone
   wants).
5. **Batch** (``drop_remainder`` when training, so shapes are static for the model) and
   **prefetch**. Training batches the decoded pictures (each cut to the part its crop can
   reach) and runs the geometry and the colour on the whole batch, compiled by XLA: per
   picture, TensorFlow's projective-transform kernel and a few dozen small ops cost more
   than the decode itself.

With ``repeat=True`` (the default) the stream never ends: Keras runs ``steps_per_epoch`` steps,
the same number on every worker (:func:`steps_per_epoch`), whatever the size of each shard.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, List, Optional

import numpy as np
import tensorflow as tf

import hierarchy.petastorm_fix  # noqa: F401 - one-pass readers could end with no rows
from hierarchy.contracts.dataset import Dataset
from hierarchy.contracts.errors import Refused
from hierarchy.contracts.manifest import Manifest
from hierarchy.contracts.model import scale_01
from hierarchy.contracts.settings import Train
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.train.pictures import picture_batches
from hierarchy.train.shards import RowGroup, petastorm_can_shard, shard_jpeg_bytes, split_row_groups
from hierarchy.train.spec import LABELS

log = logging.getLogger(__name__)


# petastorm 0.13 drives pyarrow's legacy ParquetDataset and warns about it on every row group
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")


class EmptySplitError(Refused, ValueError):
    """No row of the split (or of the branch in it) to train on."""


# ------------------------------------------------------------------------------ counts
def class_count(taxonomy: Taxonomy, label: str, branch: Optional[int] = None) -> int:
    """Number of classes of the model trained on ``label``."""
    if label == "l1":
        return taxonomy.n_l1
    if label in ("l3", "levels"):
        return taxonomy.n_l3
    if label == "branch":
        if branch is None:
            raise ValueError("label='branch' needs the branch (level-1 id)")
        return len(taxonomy.branch(branch))
    raise ValueError(f"unknown label {label!r}: expected one of {', '.join(LABELS)}")


def steps_per_epoch(manifest: Manifest, split: str, batch_size: int, world_size: int,
                    branch: Optional[int] = None, left_out: int = 0) -> int:
    """ceil(images / global batch), at least 1; the same for every worker.

    ``images`` is the split's count in the manifest, or the branch's count
    (``images_per_l1``) for a branch model, less the ``left_out`` pictures curation
    excludes."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size {batch_size} and world_size {world_size} must be >= 1")
    images = max(0, manifest.images(split, branch) - left_out)
    return max(1, math.ceil(images / (batch_size * world_size)))


# ------------------------------------------------------------------------------ row groups


# ------------------------------------------------------------------------------ dataset
@dataclass(frozen=True)
class InputOptions:
    """What :func:`make_dataset` streams, and how fast.

    label       ``l1`` (level-1 id), ``l3`` (level-3 id), ``branch`` (branch-local level-3
                id, ``taxonomy.local_of_l3()``, of the rows of level-1 ``branch`` only) or
                ``levels`` (a multi-level model's label dict, from the level-3 id).
    branch      read only this level-1 branch's rows (filtered in the reader, before decoding);
                required for ``label="branch"``, allowed with ``l3`` too.
    training    shuffle row groups and rows, augment (when ``augment``), drop the last partial
                batch. Validation keeps all rows and is deterministic per row.
    rank, world_size   Horovod worker; each reads its own shard (see the module notes).
    repeat      endless stream (Keras counts ``steps_per_epoch``); False: one pass, the shards
                of all workers together cover the split exactly once.
    return_keys also yield ``int64 [B, 2]`` (product_id, img_idx) as a third element — for
                tests and evaluation.
    dct_scaling decode at 1/2, 1/4 or 1/8 of the size when the model's input (or a training
                crop of it) still fits (:func:`~hierarchy.contracts.model.decode_scaled`);
                False: full-size decode.
    input_threads, input_ram_budget_mb, input_optimizations   tf.data options (:func:`_options`).
    cache_mb    with ``repeat``: when this worker's JPEGs (estimated from the Parquet footers)
                fit in this many MB, Petastorm reads them once and ``Dataset.cache`` repeats
                them from memory, still reshuffled each pass. A small branch is otherwise
                re-scanned over every row group of the split for each pass: 16 passes for
                one batch of 32 from a branch of 2 pictures. 0: always stream.
    exclusion   a :class:`hierarchy.contracts.curation.Exclusion`: its pictures are filtered
                out in the reader (on the key columns, before the JPEGs are loaded) and its
                relabels replace the stored labels (a branch model gains the pictures
                relabelled into its branch and loses those relabelled out).
    """

    label: str
    image_size: int
    batch_size: int
    training: bool
    preprocess: Optional[Callable[[tf.Tensor], tf.Tensor]] = None
    branch: Optional[int] = None
    taxonomy: Optional[Taxonomy] = None
    rank: int = 0
    world_size: int = 1
    shuffle_buffer: int = 1024
    seed: int = 0
    augment: bool = True
    reader_workers: int = 2
    repeat: bool = True
    return_keys: bool = False
    exclusion: Any = None
    dct_scaling: bool = True
    input_threads: int = 0
    input_ram_budget_mb: int = 0
    input_optimizations: bool = True
    cache_mb: int = 0

    def check(self, split: str) -> None:
        """ValueError naming what is inconsistent, before anything is read."""
        label, branch, taxonomy = self.label, self.branch, self.taxonomy
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r}: expected one of {', '.join(LABELS)}")
        if label == "branch" and (branch is None or taxonomy is None):
            raise ValueError("label='branch' needs branch (a level-1 id) and taxonomy")
        if label == "levels" and taxonomy is None:
            raise ValueError("label='levels' needs the taxonomy")
        if taxonomy is not None and branch is not None and not 0 <= branch < taxonomy.n_l1:
            raise ValueError(f"branch {branch} out of range: the taxonomy has "
                             f"{taxonomy.n_l1} level-1 categories")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} not in [0, {self.world_size})")
        if self.image_size < 1 or self.batch_size < 1:
            raise ValueError(f"image_size {self.image_size} and batch_size {self.batch_size} "
                             f"must be >= 1")
        if split == "test":
            raise ValueError("the test split has no labels: score it with the predict stage")

    @property
    def curated(self) -> bool:
        return self.exclusion is not None and self.exclusion.active


@dataclass(frozen=True)
class _Plan:
    """How one worker reads its shard: decided from the row groups before any is opened."""

    what: str                # the split (and branch), for messages
    petastorm_shards: bool   # Petastorm gives each worker its row groups
    tf_shards: bool          # every worker reads all, Dataset.shard keeps 1/world_size
    cached: bool             # read once, repeated from memory


def _what(data: str, split: str, branch: Optional[int]) -> str:
    return f"{data}: split {split!r}" + ("" if branch is None else f", level-1 branch {branch}")


def _plan(what: str, groups: List[RowGroup], o: InputOptions) -> _Plan:
    petastorm_shards = petastorm_can_shard(groups, o.world_size)
    tf_shards = o.world_size > 1 and not petastorm_shards
    cached = o.repeat and o.cache_mb > 0 and \
        shard_jpeg_bytes(groups, o.rank, o.world_size, petastorm_shards) <= o.cache_mb << 20
    if tf_shards:
        # every worker must see the same rows in the same order for Dataset.shard to split
        # them without overlap: one reader thread, row groups in file order (the split, or the
        # branch within it, is small here by construction; tf.data still shuffles rows)
        log.info("%s: %d row group(s) for %d workers — every worker reads all and keeps "
                 "1/%d of the rows", what, len(groups), o.world_size, o.world_size)
    return _Plan(what, petastorm_shards, tf_shards, cached)


def _reader(data: str, split: str, o: InputOptions, plan: _Plan, relabel):
    """The Petastorm batch reader of the worker's rows (and only the columns it needs)."""
    from petastorm import make_batch_reader
    from petastorm.predicates import in_lambda

    fields = ["jpeg", "l1", "l3"] + (["product_id", "img_idx"]
                                     if o.return_keys or o.curated else [])
    predicate = None
    if o.curated:
        predicate = _curation_predicate(o.exclusion.keys(split), relabel, o.branch)
    elif o.branch is not None:
        # evaluated by Petastorm's workers on the l1 column alone (a pandas Series)
        predicate = in_lambda(["l1"], lambda l1, b=o.branch: l1 == b)
    with warnings.catch_warnings():
        # images/ stores its Unischema, so make_batch_reader suggests make_reader; every
        # field is a plain Parquet scalar (ScalarCodec), which the batch reader reads as is
        warnings.filterwarnings("ignore", message="Please use make_reader")
        warnings.filterwarnings("ignore", category=FutureWarning)
        return make_batch_reader(
            Dataset(data).url("images"),
            schema_fields=fields,
            filters=[("split", "=", split)],
            predicate=predicate,
            num_epochs=None if o.repeat and not plan.cached else 1,
            shuffle_row_groups=o.training and not plan.tf_shards,
            seed=o.seed,
            cur_shard=o.rank if plan.petastorm_shards else None,
            shard_count=o.world_size if plan.petastorm_shards else None,
            workers_count=1 if plan.tf_shards else max(1, o.reader_workers),
        )


def _cache_column_batches(ds: tf.data.Dataset, o: InputOptions, plan: _Plan) -> tf.data.Dataset:
    ds = ds.cache()
    # one whole pass now, so the cache is complete before anyone iterates: Keras makes a new
    # iterator per fit phase and per validation run, and an iterator stopped part-way through
    # the first pass throws the partial cache away; the one-pass reader behind it then has
    # nothing left (one worker's validation comes back empty and Horovod's metric averaging
    # falls out of step)
    groups_read = int(ds.reduce(np.int64(0), lambda n, *_: n + 1))
    if o.training and not plan.tf_shards and groups_read > 1:
        # each pass in another row-group order, as Petastorm's endless reader gives
        ds = ds.shuffle(groups_read, seed=o.seed, reshuffle_each_iteration=True)
    return ds.repeat()


def _stream(reader, o: InputOptions, plan: _Plan, relabel) -> tf.data.Dataset:
    """Petastorm's column batches -> the batches a model trains on."""
    from petastorm.tf_utils import make_petastorm_dataset

    ds = make_petastorm_dataset(reader)  # one element per row group (a column batch)
    if plan.cached:
        ds = _cache_column_batches(ds, o, plan)
    # labels and keys are made for a whole column batch at once, then split into rows: per
    # row, that map was a third of the reading and shuffling's cost
    ds = ds.map(_record_fn(o.label, o.taxonomy, o.return_keys, relabel)).unbatch()
    if plan.tf_shards:
        # cached: sharded after the repeat, as the endless stream is, so a split of fewer rows
        # than workers still gives every worker rows (from the later passes)
        ds = ds.shard(o.world_size, o.rank)
    if o.training and o.shuffle_buffer > 1:
        ds = ds.shuffle(o.shuffle_buffer, seed=o.seed, reshuffle_each_iteration=True)
    ds = picture_batches(ds, o.image_size, o.batch_size, o.training, o.training and o.augment,
                   o.seed, o.dct_scaling, o.preprocess or scale_01)
    if o.label == "levels":
        from hierarchy.train.models import level_targets

        targets = level_targets(o.taxonomy)
        ds = ds.map(lambda x, y, *keys: (x, targets(y), *keys))
    return ds.prefetch(tf.data.AUTOTUNE).with_options(
        _options(o.input_threads, o.input_ram_budget_mb, o.input_optimizations))


@contextlib.contextmanager
def make_dataset(data: str, split: str, options: InputOptions) -> Iterator[tf.data.Dataset]:
    """Yield a ``tf.data.Dataset`` of ``(images float32 [B, S, S, 3], labels int32 [B])``
    (and keys, with ``return_keys``) of ``split`` of the dataset ``data`` (path or URL),
    as ``options`` say (:class:`InputOptions`).

    The Petastorm reader is stopped when the ``with`` block ends. A split (or branch) without
    rows raises :class:`EmptySplitError` when training; for validation it yields an empty
    dataset (and logs a warning), so a caller never waits on a stream that cannot come.
    """
    options.check(split)
    if options.branch is not None:
        options = replace(options, branch=int(options.branch))
    groups = split_row_groups(data, split, options.branch)
    what = _what(data, split, options.branch)
    if sum(g.matching for g in groups) == 0:
        if options.training:
            raise EmptySplitError(f"{what}: no images to train on")
        log.warning("%s: no images; the dataset is empty", what)
        yield _empty(options.image_size, options.return_keys)
        return
    plan = _plan(what, groups, options)
    relabel = _relabels(options.exclusion, options.taxonomy) if options.curated else None
    reader = _reader(data, split, options, plan, relabel)
    try:
        yield _stream(reader, options, plan, relabel)
    finally:
        reader.stop()
        reader.join()


def _relabels(exclusion, taxonomy: Optional[Taxonomy]):
    """(sorted picture keys, their new level-3 ids) of the reviewers' relabels whose category
    the taxonomy knows (others are logged and ignored), or None."""
    if not exclusion.relabels:
        return None
    if taxonomy is None:
        raise ValueError("relabelled pictures need the taxonomy")
    l3_of = {int(c): i for i, c in enumerate(taxonomy.category_ids)}
    known = {k: l3_of[c] for k, c in exclusion.relabels.items() if c in l3_of}
    if len(known) < len(exclusion.relabels):
        log.warning("%d relabel decision(s) name a category the taxonomy does not have; "
                    "ignored", len(exclusion.relabels) - len(known))
    if not known:
        return None
    keys = np.array(sorted(known), np.int64)
    return keys, np.array([known[k] for k in keys], np.int32), \
        np.asarray(taxonomy.l1_of_l3, np.int32)[[known[k] for k in keys]]


def _curation_predicate(excluded: np.ndarray, relabel, branch: Optional[int]):
    """A Petastorm predicate (pandas Series in, boolean mask out) that leaves out the excluded
    keys and, for a branch, keeps the rows whose level 1 after relabelling is the branch."""
    import pandas as pd
    from petastorm.predicates import in_lambda

    from hierarchy.contracts.curation import picture_key

    def keep(l1, product_id, img_idx):
        key = picture_key(product_id.to_numpy(), img_idx.to_numpy())
        mask = ~np.isin(key, excluded, assume_unique=False)
        if branch is not None:
            l1 = l1.to_numpy().copy()
            if relabel is not None:
                hit = np.isin(key, relabel[0])
                l1[hit] = relabel[2][np.searchsorted(relabel[0], key[hit])]
            mask &= l1 == branch
        return pd.Series(mask, index=product_id.index)  # Petastorm maps over a Series

    return in_lambda(["l1", "product_id", "img_idx"], keep)


def _record_fn(label: str, taxonomy: Optional[Taxonomy], return_keys: bool, relabel=None):
    table = None
    if label == "branch":
        table = tf.constant(taxonomy.local_of_l3(), dtype=tf.int32)
    lookup = None
    if relabel is not None:
        from hierarchy.contracts.curation import KEY_BITS

        lookup = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(relabel[0]), tf.constant(relabel[1])), default_value=-1)
        l1_of_l3 = tf.constant(np.asarray(taxonomy.l1_of_l3, np.int32))

    def record(row):
        if lookup is not None:
            key = tf.bitwise.bitwise_or(tf.bitwise.left_shift(tf.cast(row.product_id, tf.int64),
                                                              tf.constant(KEY_BITS, tf.int64)),
                                        tf.cast(row.img_idx, tf.int64))  # picture_key
            new = lookup.lookup(key)
            l3 = tf.where(new >= 0, new, tf.cast(row.l3, tf.int32))
            l1 = tf.where(new >= 0, tf.gather(l1_of_l3, l3), tf.cast(row.l1, tf.int32))
            row = row._replace(l3=l3, l1=l1)
        if label == "branch":
            y = tf.gather(table, tf.cast(row.l3, tf.int32))
        else:
            y = tf.cast(getattr(row, "l3" if label == "levels" else label), tf.int32)
        if return_keys:
            key = tf.stack([tf.cast(row.product_id, tf.int64), tf.cast(row.img_idx, tf.int64)],
                           axis=-1)
            return row.jpeg, y, key
        return row.jpeg, y

    return record


def input_options(tcfg: Train) -> dict:
    """make_dataset's input-speed arguments from the ``train:`` config section."""
    return {"dct_scaling": tcfg.dct_scaling,
            "input_threads": tcfg.input_threads,
            "input_ram_budget_mb": tcfg.input_ram_budget_mb,
            "input_optimizations": tcfg.input_optimizations,
            "cache_mb": tcfg.input_cache_mb}


def _options(threads: int, ram_budget_mb: int, optimizations: bool) -> tf.data.Options:
    """tf.data options; each one is measured on/off by bench/input_pipeline.py --options."""
    options = tf.data.Options()
    if threads:
        # a pool of its own: Keras' training step and the input do not queue on one pool
        options.threading.private_threadpool_size = threads
    if ram_budget_mb:
        options.autotune.ram_budget = ram_budget_mb << 20
    if optimizations:
        options.experimental_optimization.map_parallelization = True
        options.experimental_optimization.parallel_batch = True
        options.experimental_optimization.inject_prefetch = True
    return options


def _empty(image_size: int, return_keys: bool) -> tf.data.Dataset:
    parts = [np.zeros([0, image_size, image_size, 3], np.float32), np.zeros([0], np.int32)]
    if return_keys:
        parts.append(np.zeros([0, 2], np.int64))
    return tf.data.Dataset.from_tensor_slices(tuple(parts)).batch(1)
