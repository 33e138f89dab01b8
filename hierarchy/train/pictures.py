"""Rows of JPEG bytes -> batches of pictures a model reads: decoded (at the smallest DCT scale
that still fits), cut and augmented when training, batched, preprocessed for the backbone.
Part of :func:`hierarchy.train.data.make_dataset`'s stream.
"""

from __future__ import annotations

import tensorflow as tf

from hierarchy.contracts.model import decode_scaled, resize_for_model
from hierarchy.train.augment import (
    CROP_MIN,
    augment_batch,
    cut_for_augmentation,
    draws,
)

# pictures per inner decode dataset (see picture_batches): each costs an iterator and a function
# instantiation, ~5 % of the training input's CPU time at 16 pictures
DECODE_CHUNK = 64


def picture_batches(ds: tf.data.Dataset, image_size: int, batch_size: int, training: bool,
              augmenting: bool, seed: int, dct_scaling: bool, preprocess) -> tf.data.Dataset:
    """Rows (jpeg, label, *keys) -> batches (images, label, *keys), decoded, augmented and
    preprocessed."""
    ds = ds.enumerate()  # position in the stream -> per-picture augmentation seed
    decode = _decode_fn(image_size, augmenting, seed, dct_scaling)
    # a picture TensorFlow cannot decode (ingest's default check looks at the JPEG
    # markers only) is dropped with a warning instead of ending the training. Pictures
    # are decoded in small inner datasets of DECODE_CHUNK, so ignore_errors only ever
    # sees decode errors, never an error of the reader upstream (which must stay fatal)
    # a chunk no longer than the batch (but 16 at least): a shard of a few rows would
    # otherwise read many passes of its row groups before its first small batch
    size = min(DECODE_CHUNK, max(16, batch_size))
    ds = ds.batch(size).interleave(
        lambda *chunk: tf.data.Dataset.from_tensor_slices(chunk).map(decode)
        .ignore_errors(log_warning=True),
        cycle_length=tf.data.AUTOTUNE, block_length=size,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = _batch(ds, batch_size, training, augmenting)
    if augmenting:
        _first_compile_quietly(image_size)
    return ds.map(_per_batch(augmenting, preprocess, image_size),
                  num_parallel_calls=tf.data.AUTOTUNE)


def _first_compile_quietly(image_size: int) -> None:
    """Compile the augmentation once on a tiny batch with the C++ notes of a process's first
    XLA compile sent to the job's log (:func:`hierarchy.joblog.native_stderr_to_log`):
    printed from the input pipeline's threads they would land on the console."""
    from hierarchy import joblog

    # on the host, as tf.data runs it (a GPU worker would otherwise compile for its GPU)
    with joblog.native_stderr_to_log(), tf.device("/CPU:0"):
        augment_batch(tf.zeros([1, 8, 8, 3], tf.uint8), tf.constant([[8, 8, 0, 0, 8, 8]]),
                      tf.zeros([1, 8]), image_size)


def _decode_fn(image_size: int, augmenting: bool, seed: int, dct_scaling: bool = True):
    """Per picture: decode, then (validation) the resize: float32 [S, S, 3] in [0, 255], or
    (training) the draws and the window the augmentation reads: (uint8 window, int32 [6],
    draws float32 [8]) (:func:`cut_for_augmentation`), then *rest. The geometry, the colour
    jitter and the backbone's preprocessing run per batch (:func:`_per_batch`): per picture,
    each of their ops costs a fixed ~2 us however small the picture."""
    base = tf.constant([seed, 0x5EED], dtype=tf.int64)
    # a training crop keeps CROP_MIN of the shorter side and maps it onto image_size: decode
    # no smaller than that, so the warp never enlarges a picture the DCT shrank
    min_side = image_size / CROP_MIN if augmenting else image_size

    def decode(position, record):
        jpeg, *rest = record
        if dct_scaling:
            image = decode_scaled(jpeg, min_side)
        else:
            image = tf.io.decode_jpeg(jpeg, channels=3)
        if augmenting:
            u = draws(tf.random.experimental.stateless_fold_in(base, position))
            return (*cut_for_augmentation(image, u), u, *rest)
        return (resize_for_model(image, image_size), *rest)

    return decode


def _batch(ds: tf.data.Dataset, batch_size: int, drop_remainder: bool,
           augmenting: bool) -> tf.data.Dataset:
    """Batches of :func:`_decode_fn`'s pictures: training's windows differ in size and are
    padded to the largest of their batch (the padding is never read)."""
    if not augmenting:
        return ds.batch(batch_size, drop_remainder=drop_remainder)
    padding = (tf.constant(0, tf.uint8),) + (None,) * (len(ds.element_spec) - 1)
    return ds.padded_batch(batch_size, padding_values=padding, drop_remainder=drop_remainder)


def _per_batch(augmenting: bool, preprocess, image_size: int):
    def finish(images, *rest):
        if augmenting:
            meta, u, *rest = rest
            images = augment_batch(images, meta, u, image_size)
        return (tf.cast(preprocess(images), tf.float32), *rest)

    return finish
