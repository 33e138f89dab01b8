"""``--mode fusion``: a product's pictures fused by a head learnt on whole products.

A product has one to four pictures (more in the wild), and the geometric mean of their
distributions lets a packaging shot or a box's back count as much as the front. Over the
cached trunk features (:mod:`hierarchy.train.features`: one forward pass of the source model,
counted as one image-epoch), a :func:`~hierarchy.train.heads.fusion_view_head` gives each
picture a leaf distribution (the source's level-3 rows plus a residual MLP) and a score; a
product's answer is the softmax of its pictures' log-probabilities averaged with weights
``softmax(score)`` (attention pooling whose weights depend on each picture alone, Ilse et al.
2018). It is trained on product labels: the rows of a product in a feature file are
gathered, at most ``train.fusion_max_views`` of them (a random subset of more), padded and
masked.

Scoring stays per picture: the published model outputs ``probs`` and ``view_score`` for each
picture and predict's product accumulator weighs them
(:class:`~hierarchy.infer.combine.ProductAccumulator`), so any number of pictures is answered
(nine as well as one) and a product's answer does not depend on how its pictures were batched.
Before training (zero residual, zero scores) the head *is* the source with predict's geometric
mean.

A product's pictures are gathered within a feature file (one worker's batch of up to
``ROWS_PER_FILE`` rows, per branch), so nothing is loaded whole: the few products a file
boundary cuts are seen as two smaller ones in training. With ``--np`` > 1 the workers shard
the split by row group (a product's pictures are contiguous in it) and only products on a
row-group boundary are cut; a split with fewer row groups than workers is shared row by row
(:func:`hierarchy.train.data.make_dataset`), which cuts most products — train fusion's
feature pass with ``--np 1`` there (such a split is small).
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import numpy as np

from hierarchy.contracts.settings import Train
from hierarchy.train.features import Select, feature_files


def product_arrays(path: str, max_views: Optional[int], rng: Optional[np.random.Generator],
                   select: Optional[Select] = None
                   ) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(features [P, V, D], mask [P, V], level-3 ids [P]) of the products of one feature
    file (those ``select`` keeps; None when none). With ``max_views`` a product keeps that
    many pictures at most (a random subset when ``rng`` is given, else its first ones);
    without, all of them."""
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["product_id", "l3", "features"])
    col = t.column("features").combine_chunks()
    d = col.type.list_size
    feats = col.values.to_numpy(zero_copy_only=False).reshape(-1, d)
    pid = t.column("product_id").to_numpy()
    y = t.column("l3").to_numpy()
    if select is not None:
        keep = select(pid)
        feats, pid, y = feats[keep], pid[keep], y[keep]
    if pid.size == 0:
        return None
    # a product's rows together; with rng in a random order, so the kept subset is random
    keys = (pid,) if rng is None else (rng.random(pid.size), pid)
    order = np.lexsort(keys) if rng is not None else np.argsort(pid, kind="stable")
    pid, y, feats = pid[order], y[order], feats[order]
    starts = np.flatnonzero(np.r_[True, pid[1:] != pid[:-1]])
    counts = np.diff(np.r_[starts, pid.size])
    views = int(counts.max()) if max_views is None else int(min(counts.max(), max_views))
    product = np.repeat(np.arange(starts.size), counts)
    slot = np.arange(pid.size) - np.repeat(starts, counts)
    keep = slot < views
    out = np.zeros((starts.size, views, d), np.float32)
    mask = np.zeros((starts.size, views), bool)
    out[product[keep], slot[keep]] = feats[keep]
    mask[product[keep], slot[keep]] = True
    return out, mask, y[starts].astype(np.int32)


def product_batches(root: str, split: str, max_views: Optional[int],
                    seed: Optional[int] = None, select: Optional[Select] = None
                    ) -> Iterator[Tuple[np.ndarray, ...]]:
    """:func:`product_arrays` of every feature file of ``split``; files in a random order and
    random subsets of pictures when ``seed`` is given. One file in memory at a time."""
    files: List[str] = feature_files(root, split)
    rng = None if seed is None else np.random.default_rng(seed)
    if rng is not None:
        rng.shuffle(files)
    for path in files:
        got = product_arrays(path, max_views, rng, select)
        if got is not None:
            yield got


def _dataset(root, split, dim, n_classes, batch, max_views, seed_of_epoch, shuffle_buffer,
             select=None):
    import tensorflow as tf

    def gen():
        yield from product_batches(root, split, max_views,
                                   None if seed_of_epoch is None else seed_of_epoch(), select)

    ds = tf.data.Dataset.from_generator(gen, output_signature=(
        tf.TensorSpec([None, None, dim], tf.float32), tf.TensorSpec([None, None], tf.bool),
        tf.TensorSpec([None], tf.int32))).unbatch()
    if seed_of_epoch is not None:
        ds = ds.shuffle(shuffle_buffer)
    ds = ds.padded_batch(batch)  # views padded to the batch's most, mask False there
    return ds.map(lambda f, m, y: ((f, m), tf.one_hot(y, n_classes))).prefetch(2)


def train_fusion_head(root: str, kernel, bias, tcfg: Train, seed: int,
                      fit_select: Optional[Select] = None,
                      check: Tuple[str, Optional[Select]] = ("val", None)) -> dict:
    """Train the fusion head over the cached features under ``root``; returns the trained
    :func:`~hierarchy.train.heads.fusion_view_head` and its figures on ``check``'s products
    (val whole by default; the initial head's are the source's with predict's geometric
    mean). ``fit_select`` keeps some train products only (tuning trains beside a
    hold-out)."""
    import tensorflow as tf

    from hierarchy.train.heads import fusion_product_model, fusion_view_head

    tf.keras.utils.set_random_seed(seed)
    head = fusion_view_head(kernel, bias, tcfg.fusion_hidden,
                            tcfg.fusion_dropout, tcfg.fusion_score_hidden)
    model = fusion_product_model(head)
    model.compile(tf.keras.optimizers.Adam(tcfg.fusion_learning_rate),
                  loss=tf.keras.losses.CategoricalCrossentropy(
                      label_smoothing=tcfg.fusion_label_smoothing),
                  metrics=[tf.keras.metrics.CategoricalAccuracy(name="accuracy")])
    epoch = [0]

    def next_seed():
        epoch[0] += 1
        return seed * 1000003 + epoch[0]

    dim, n = kernel.shape
    views = tcfg.fusion_max_views
    train = _dataset(root, "train", dim, n, tcfg.batch_size, views, next_seed,
                     tcfg.shuffle_buffer, fit_select)
    split, select = check
    has_val = any(True for _ in product_batches(root, split, None, None, select)) \
        if select is not None else bool(feature_files(root, split))
    # checked products keep every picture, as predict does
    val = _dataset(root, split, dim, n, 256, None, None, 0, select) if has_val else None
    before = model.evaluate(val, verbose=0, return_dict=True) if has_val else {}
    history = model.fit(train, epochs=tcfg.fusion_epochs, verbose=0)
    after = model.evaluate(val, verbose=0, return_dict=True) if has_val else {}
    return {"head": head, "train_loss": float(history.history["loss"][-1]),
            "val_product_accuracy_initial": before.get("accuracy"),
            "val_product_accuracy": after.get("accuracy"),
            "val_loss_initial": before.get("loss"), "val_loss": after.get("loss")}
