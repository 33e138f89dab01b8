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
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import numpy as np
import tensorflow as tf

import hierarchy.petastorm_fix  # noqa: F401 - one-pass readers could end with no rows
from hierarchy.contracts import storage
from hierarchy.contracts.dataset import Dataset, images_in
from hierarchy.contracts.errors import Refused
from hierarchy.contracts.model import decode_scaled, resize_for_model, scale_01
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.train.spec import LABELS

log = logging.getLogger(__name__)

CROP_MIN = 0.85            # random crop keeps 85-100 % of the picture's side
MAX_ROTATION_DEG = 10.0
BRIGHTNESS = 0.08          # +- fraction of full scale
CONTRAST = (0.85, 1.15)
SATURATION = (0.85, 1.15)
# pictures per inner decode dataset (see _pictures): each costs an iterator and a function
# instantiation, ~5 % of the training input's CPU time at 16 pictures
DECODE_CHUNK = 64

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


def steps_per_epoch(manifest: dict, split: str, batch_size: int, world_size: int,
                    branch: Optional[int] = None, left_out: int = 0) -> int:
    """ceil(images / global batch), at least 1; the same for every worker.

    ``images`` is the split's count in the manifest, or the branch's count
    (``images_per_l1``) for a branch model, less the ``left_out`` pictures curation
    excludes."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size {batch_size} and world_size {world_size} must be >= 1")
    images = max(0, images_in(manifest, split, branch) - left_out)
    return max(1, math.ceil(images / (batch_size * world_size)))


# ------------------------------------------------------------------------------ row groups
@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int        # row group inside its file
    rows: int
    matching: int     # rows of the branch asked for (= rows without a branch)
    jpeg_bytes: int = 0  # the jpeg column's bytes in this row group (all rows)


def split_row_groups(data: str, split: str, branch: Optional[int] = None) -> List[RowGroup]:
    """The split's row groups in Petastorm's order (files sorted by path, then row groups).

    Petastorm numbers row groups this way and shard ``k`` of ``n`` gets those whose number is
    ``k`` modulo ``n``. Reads only Parquet footers, plus the ``l1`` column of the row groups
    whose statistics cannot tell whether they hold the branch."""
    import pyarrow.parquet as pq

    files = storage.list_files(Dataset(data).images(split), ".parquet")
    groups: List[RowGroup] = []
    for path in files:
        fs, inner = storage.resolve(path)
        with fs.open_input_file(inner) as fh:
            pf = pq.ParquetFile(fh)
            meta = pf.metadata
            col = meta.schema.names.index("l1") if branch is not None else None
            jpeg = meta.schema.names.index("jpeg")
            for i in range(meta.num_row_groups):
                rows = meta.row_group(i).num_rows
                matching = rows
                if branch is not None:
                    stats = meta.row_group(i).column(col).statistics
                    if stats is not None and stats.has_min_max and stats.null_count == 0 \
                            and stats.min == stats.max:
                        matching = rows if stats.min == branch else 0
                    elif stats is not None and stats.has_min_max and \
                            not stats.min <= branch <= stats.max:
                        matching = 0
                    else:
                        l1 = pf.read_row_group(i, columns=["l1"]).column(0).to_numpy(
                            zero_copy_only=False)
                        matching = int(np.count_nonzero(l1 == branch))
                groups.append(RowGroup(path, i, rows, matching,
                                       meta.row_group(i).column(jpeg).total_uncompressed_size))
    return groups


def _petastorm_can_shard(groups: List[RowGroup], world_size: int) -> bool:
    """True when every shard Petastorm would make holds at least one matching row."""
    if world_size <= 1:
        return False
    if len(groups) < world_size:
        return False
    per_shard = [0] * world_size
    for number, group in enumerate(groups):
        per_shard[number % world_size] += group.matching
    return all(per_shard)


def shard_jpeg_bytes(groups: List[RowGroup], rank: int, world_size: int,
                     petastorm_shards: bool) -> int:
    """Estimated bytes of the JPEGs one worker's reader yields in a pass: the matching rows'
    share of each row group's jpeg column, over the row groups of its shard (all of them when
    tf.data shards rows: every worker then reads the whole split)."""
    total = 0.0
    for number, g in enumerate(groups):
        if g.rows and (not petastorm_shards or number % world_size == rank):
            total += g.jpeg_bytes * g.matching / g.rows
    return int(total)


# ------------------------------------------------------------------------------ images
# how much wider than the crop the part of a picture a rotated crop can sample is, at most:
# a square turned by theta covers (|cos| + |sin|) of its side on each axis
ROTATED_REACH = math.cos(math.radians(MAX_ROTATION_DEG)) + math.sin(math.radians(MAX_ROTATION_DEG))


def _draws(seed: tf.Tensor) -> tf.Tensor:
    """float32 [8] in [0, 1): every random number of one picture's augmentation, in one op
    instead of a dozen (at 64 px each op's fixed cost, not its arithmetic, is what counts)."""
    return tf.random.stateless_uniform([8], seed)


def _crop(u: tf.Tensor):
    """(frac, shift (row, col), angle, mirror) of the geometry from draws ``u`` [..., 8]."""
    frac = CROP_MIN + (1.0 - CROP_MIN) * u[..., 0]
    shift = u[..., 1:3] * 2.0 - 1.0
    angle = (u[..., 3] * 2.0 - 1.0) * (MAX_ROTATION_DEG * math.pi / 180)
    return frac, shift, angle, u[..., 4] < 0.5


def crop_window(size: tf.Tensor, u: tf.Tensor):
    """(top-left corner, size), int32 [2] each (row, col): the part of a decoded picture of
    ``size`` that its augmentation (draws ``u`` [8]) can read — the rotated crop's bounding box
    plus two pixels for the bilinear neighbours and rounding. Pictures are cut to it before
    they are batched, so one long panorama does not pad every picture of its batch to its
    length."""
    frac, shift, _, _ = _crop(u)
    extent = tf.cast(size, tf.float32)
    side = frac * tf.reduce_min(extent)
    centre = extent / 2.0 + shift * (extent - side) / 2.0 - 0.5    # in pixel indices
    reach = side * (ROTATED_REACH / 2.0) + 2.0
    top_left = tf.maximum(tf.cast(tf.floor(centre - reach), tf.int32), 0)
    bottom_right = tf.minimum(tf.cast(tf.floor(centre + reach), tf.int32) + 2, size)
    return top_left, bottom_right - top_left


def _affine(size, frac, shift, angle, mirror, image_size: int, origin=None) -> tf.Tensor:
    """float32 [B, 6]: for each picture (``size`` [B, 2] (height, width), the other arguments
    [B] or [B, 2]), the affine map from output pixels to source pixels of :func:`warp`; with
    ``origin`` [B, 2] (row, col), in the coordinates of the window cut at that corner."""
    size = tf.cast(size, tf.float32)
    side = tf.cast(frac, tf.float32) * tf.reduce_min(size, axis=-1)
    off = tf.cast(shift, tf.float32) * (size - side[:, None]) / 2.0   # crop offset (row, col)
    angle = tf.cast(angle, tf.float32)
    sign = tf.where(tf.cast(mirror, tf.bool), -1.0, 1.0)
    k = side / image_size
    a, b = k * tf.cos(angle), k * tf.sin(angle)
    c = 0.5 - image_size / 2.0                               # u = x + c, v = y + c
    # x_in + 0.5 = W/2 + off_x + sign*a*u - b*v ; y_in + 0.5 = H/2 + off_y + sign*b*u + a*v
    centre = size / 2.0 + off - 0.5
    if origin is not None:
        centre -= tf.cast(origin, tf.float32)
    tx = (sign * a - b) * c + centre[:, 1]
    ty = (sign * b + a) * c + centre[:, 0]
    return tf.stack([sign * a, -b, tx, sign * b, a, ty], axis=1)


def warp(image: tf.Tensor, image_size: int, frac, shift, angle, mirror) -> tf.Tensor:
    """Crop a square of ``frac`` x the shorter side, moved by ``shift`` (in [-1, 1] of the room
    left on each axis, (row, col)) from the centre, rotate it by ``angle`` radians, mirror it
    when ``mirror``, and resample to ``image_size`` — one bilinear pass (:func:`_resample`).

    Output pixel (x, y) samples the source at centre + offset + k R F (u, v), where (u, v) is
    the pixel's position from the output centre, k = crop side / output side, F the mirror and
    R the rotation; pixel centres sit at +0.5, as in tf.image.resize, so frac=1, shift=0,
    angle=0 is exactly a bilinear resize. Out-of-picture samples (corners of a rotated full-size
    crop) are white, as the background of most product photos."""
    size = tf.shape(image)[:2]
    transform = _affine(size[None], tf.reshape(frac, [1]), tf.reshape(shift, [1, 2]),
                        tf.reshape(angle, [1]), tf.reshape(mirror, [1]), image_size)
    return _resample(image[None], size[None], transform, image_size)[0]


def _resample(images: tf.Tensor, valid: tf.Tensor, transforms: tf.Tensor,
              image_size: int) -> tf.Tensor:
    """float32 [B, S, S, 3] in [0, 255]: each picture of ``images`` [B, H, W, 3] (its top-left
    ``valid`` [B, 2] (height, width) holds the picture, the rest is padding) sampled by its
    affine map ``transforms`` [B, 6] — what ImageProjectiveTransformV3 (bilinear, constant
    white fill) computes with the transform (t0, t1, t2, t3, t4, t5, 0, 0).

    The pixels go to :func:`_bilinear` flattened and padded to one of four lengths per power
    of two: XLA compiles once per input shape, and pictures of varying sizes would otherwise
    compile a new program for nearly every batch."""
    flat = tf.reshape(images, [-1, 3])
    n = tf.shape(flat)[0]
    step = tf.bitwise.left_shift(1, tf.maximum(_log2_floor(n) - 2, 0))
    flat = tf.pad(flat, [[0, (n + step - 1) // step * step - n], [0, 0]])
    strides = tf.stack([tf.shape(images)[1] * tf.shape(images)[2], tf.shape(images)[2]])
    grid = tf.range(image_size, dtype=tf.float32)
    return _bilinear(flat, strides, tf.cast(valid, tf.int32), transforms, grid)


def _log2_floor(n: tf.Tensor) -> tf.Tensor:
    """floor(log2(n)) of an int32 n >= 1, exact (no float rounding at powers of two)."""
    bits = tf.constant([1 << i for i in range(31)], tf.int32)
    return tf.reduce_sum(tf.cast(bits <= n, tf.int32)) - 1


@tf.function(jit_compile=True, reduce_retracing=True)
def _bilinear(flat, strides, valid, transforms, grid):
    """Bilinear sampling, compiled by XLA into one loop over the output pixels: the same
    arithmetic as TensorFlow's ImageProjectiveTransformV3 kernel, which evaluates the transform
    for every channel of every pixel and took ~150 us per 64 px picture, more than the JPEG
    decode (see :func:`_resample` for the arguments; picture b's pixel (y, x) is
    flat[b * strides[0] + y * strides[1] + x])."""
    t = transforms[:, :, None, None]
    in_x = t[:, 0] * grid + t[:, 1] * grid[:, None] + t[:, 2]      # [B, S, S]
    in_y = t[:, 3] * grid + t[:, 4] * grid[:, None] + t[:, 5]
    x0, y0 = tf.floor(in_x), tf.floor(in_y)
    col, row = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    height, width = valid[:, 0, None, None], valid[:, 1, None, None]
    start = (tf.range(tf.shape(valid)[0]) * strides[0])[:, None, None]

    def pixel(y, x):
        inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
        index = start + tf.clip_by_value(y, 0, height - 1) * strides[1] \
            + tf.clip_by_value(x, 0, width - 1)
        return tf.where(inside[..., None], tf.cast(tf.gather(flat, index), tf.float32), 255.0)

    wx0, wx1 = ((x0 + 1.0) - in_x)[..., None], (in_x - x0)[..., None]
    wy0, wy1 = ((y0 + 1.0) - in_y)[..., None], (in_y - y0)[..., None]
    top = wx0 * pixel(row, col) + wx1 * pixel(row, col + 1)
    bottom = wx0 * pixel(row + 1, col) + wx1 * pixel(row + 1, col + 1)
    return wy0 * top + wy1 * bottom


def colour_factors(u: tf.Tensor) -> tf.Tensor:
    """float32 [..., 3]: brightness delta, contrast factor, saturation factor of each picture,
    from its :func:`_draws` [..., 8]."""
    lo = tf.constant([-BRIGHTNESS, CONTRAST[0], SATURATION[0]], tf.float32)
    hi = tf.constant([BRIGHTNESS, CONTRAST[1], SATURATION[1]], tf.float32)
    return lo + (hi - lo) * u[..., 5:8]


GREY = (0.2989, 0.5870, 0.1140)   # tf.image.rgb_to_grayscale's weights


@tf.function(jit_compile=True, reduce_retracing=True)
def apply_colour(images: tf.Tensor, factors: tf.Tensor) -> tf.Tensor:
    """Small brightness / contrast / saturation jitter of float pixels in [0, 255], a batch
    [B, S, S, 3] at once with its factors [B, 3]. Contrast is tf.image.adjust_contrast's
    (around each channel's mean); saturation a blend with the grey picture (PIL's
    ImageEnhance.Color): the effect of tf.image's HSV round trip for small factors, at a
    fraction of its cost. Compiled by XLA into two passes over the pixels: as a dozen
    TensorFlow ops with broadcasting it cost more per picture than the decode."""
    f = factors[:, None, None, :]
    x = images / 255.0 + f[..., 0:1]
    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    x = (x - mean) * f[..., 1:2] + mean
    grey = tf.reduce_sum(x * tf.constant(GREY), axis=-1, keepdims=True)
    x = grey + f[..., 2:3] * (x - grey)
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def cut_for_augmentation(image: tf.Tensor, u: tf.Tensor):
    """(window of a decoded picture, int32 [6] (height, width, top, left, window height,
    window width)): what :func:`augment_batch` needs of one picture with draws ``u``."""
    size = tf.shape(image)[:2]
    top_left, extent = crop_window(size, u)
    window = tf.slice(image, tf.concat([top_left, [0]], 0), tf.concat([extent, [-1]], 0))
    return window, tf.concat([size, top_left, extent], 0)


def augment_batch(windows: tf.Tensor, meta: tf.Tensor, u: tf.Tensor,
                  image_size: int) -> tf.Tensor:
    """Training augmentation of a batch: ``windows`` [B, H, W, 3] uint8 (from
    :func:`cut_for_augmentation`, padded to the largest), ``meta`` [B, 6], draws ``u`` [B, 8]
    -> float32 [B, S, S, 3] in [0, 255]: random crop + resize + flip + rotation in one
    bilinear pass, then the colour jitter."""
    frac, shift, angle, mirror = _crop(u)
    transforms = _affine(meta[:, 0:2], frac, shift, angle, mirror, image_size, meta[:, 2:4])
    images = _resample(windows, meta[:, 4:6], transforms, image_size)
    return apply_colour(images, colour_factors(u))


def augment_image(image: tf.Tensor, image_size: int, seed: tf.Tensor) -> tf.Tensor:
    """Training augmentation of one decoded uint8 picture -> float32 [S, S, 3] in [0, 255].

    ``seed``: int32/int64 tensor of shape [2] (stateless: same seed, same picture). The input
    pipeline runs the same steps, the geometry and colour per batch (:func:`augment_batch`)."""
    u = _draws(seed)
    window, meta = cut_for_augmentation(image, u)
    return augment_batch(window[None], meta[None], u[None], image_size)[0]


# ------------------------------------------------------------------------------ dataset
@contextlib.contextmanager
def make_dataset(data: str, split: str, *, label: str, image_size: int, batch_size: int,
                 training: bool, preprocess: Optional[Callable[[tf.Tensor], tf.Tensor]] = None,
                 branch: Optional[int] = None, taxonomy: Optional[Taxonomy] = None,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1024, seed: int = 0,
                 augment: bool = True, reader_workers: int = 2, repeat: bool = True,
                 return_keys: bool = False, exclusion=None, dct_scaling: bool = True,
                 input_threads: int = 0, input_ram_budget_mb: int = 0,
                 input_optimizations: bool = True,
                 cache_mb: int = 0) -> Iterator[tf.data.Dataset]:
    """Yield a ``tf.data.Dataset`` of ``(images float32 [B, S, S, 3], labels int32 [B])``.

    data        dataset folder (path or URL) holding ``images/``.
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
                crop of it) still fits (:func:`decode_scaled`); False: full-size decode.
    input_threads, input_ram_budget_mb, input_optimizations   tf.data options (:func:`_options`).
    cache_mb    with ``repeat``: when this worker's JPEGs (estimated from the Parquet footers)
                fit in this many MB, Petastorm reads them once and ``Dataset.cache`` repeats
                them from memory, still reshuffled each pass. A small branch is otherwise
                re-scanned over every row group of the split for each pass: 16 passes for
                one batch of 32 from a branch of 2 pictures. 0: always stream.
    exclusion   a :class:`hierarchy.contracts.curation.Exclusion`: its pictures are filtered out in
                the reader (on the key columns, before the JPEGs are loaded) and its relabels
                replace the stored labels (a branch model gains the pictures relabelled into
                its branch and loses those relabelled out).

    The Petastorm reader is stopped when the ``with`` block ends. A split (or branch) without
    rows raises :class:`EmptySplitError` when training; for validation it yields an empty
    dataset (and logs a warning), so a caller never waits on a stream that cannot come.
    """
    from petastorm import make_batch_reader
    from petastorm.predicates import in_lambda
    from petastorm.tf_utils import make_petastorm_dataset

    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}: expected one of {', '.join(LABELS)}")
    if label == "branch" and (branch is None or taxonomy is None):
        raise ValueError("label='branch' needs branch (a level-1 id) and taxonomy")
    if label == "levels" and taxonomy is None:
        raise ValueError("label='levels' needs the taxonomy")
    if taxonomy is not None and branch is not None and not 0 <= branch < taxonomy.n_l1:
        raise ValueError(f"branch {branch} out of range: the taxonomy has {taxonomy.n_l1} "
                         f"level-1 categories")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size {image_size} and batch_size {batch_size} must be >= 1")
    if split == "test":
        raise ValueError("the test split has no labels: score it with the predict stage")
    preprocess = preprocess or scale_01
    branch = None if branch is None else int(branch)

    groups = split_row_groups(data, split, branch)
    matching = sum(g.matching for g in groups)
    what = f"{data}: split {split!r}" + ("" if branch is None else f", level-1 branch {branch}")
    if matching == 0:
        if training:
            raise EmptySplitError(f"{what}: no images to train on")
        log.warning("%s: no images; the dataset is empty", what)
        yield _empty(image_size, return_keys)
        return

    petastorm_shards = _petastorm_can_shard(groups, world_size)
    tf_shards = world_size > 1 and not petastorm_shards
    cached = repeat and cache_mb > 0 and \
        shard_jpeg_bytes(groups, rank, world_size, petastorm_shards) <= cache_mb << 20
    if tf_shards:
        # every worker must see the same rows in the same order for Dataset.shard to split
        # them without overlap: one reader thread, row groups in file order (the split, or the
        # branch within it, is small here by construction; tf.data still shuffles rows)
        log.info("%s: %d row group(s) for %d workers — every worker reads all and keeps "
                 "1/%d of the rows", what, len(groups), world_size, world_size)
    curated = exclusion is not None and exclusion.active
    relabel = _relabels(exclusion, taxonomy) if curated else None
    fields = ["jpeg", "l1", "l3"] + (["product_id", "img_idx"] if return_keys or curated else [])
    predicate = None
    if curated:
        predicate = _curation_predicate(exclusion.keys(split), relabel, branch)
    elif branch is not None:
        # evaluated by Petastorm's workers on the l1 column alone (a pandas Series)
        predicate = in_lambda(["l1"], lambda l1, b=branch: l1 == b)
    with warnings.catch_warnings():
        # images/ stores its Unischema, so make_batch_reader suggests make_reader; every
        # field is a plain Parquet scalar (ScalarCodec), which the batch reader reads as is
        warnings.filterwarnings("ignore", message="Please use make_reader")
        warnings.filterwarnings("ignore", category=FutureWarning)
        reader = make_batch_reader(
            Dataset(data).url("images"),
            schema_fields=fields,
            filters=[("split", "=", split)],
            predicate=predicate,
            num_epochs=None if repeat and not cached else 1,
            shuffle_row_groups=training and not tf_shards,
            seed=seed,
            cur_shard=rank if petastorm_shards else None,
            shard_count=world_size if petastorm_shards else None,
            workers_count=1 if tf_shards else max(1, reader_workers),
        )
    try:
        ds = make_petastorm_dataset(reader)  # one element per row group (a column batch)
        if cached:
            ds = ds.cache()
            # one whole pass now, so the cache is complete before anyone iterates: Keras makes
            # a new iterator per fit phase and per validation run, and an iterator stopped
            # part-way through the first pass throws the partial cache away; the one-pass
            # reader behind it then has nothing left (one worker's validation comes back
            # empty and Horovod's metric averaging falls out of step)
            groups_read = int(ds.reduce(np.int64(0), lambda n, *_: n + 1))
            if training and not tf_shards and groups_read > 1:
                # each pass in another row-group order, as Petastorm's endless reader gives
                ds = ds.shuffle(groups_read, seed=seed, reshuffle_each_iteration=True)
            ds = ds.repeat()
        # labels and keys are made for a whole column batch at once, then split into rows:
        # per row, that map was a third of the reading and shuffling's cost
        ds = ds.map(_record_fn(label, taxonomy, return_keys, relabel)).unbatch()
        if tf_shards:
            # cached: sharded after the repeat, as the endless stream is, so a split of fewer
            # rows than workers still gives every worker rows (from the later passes)
            ds = ds.shard(world_size, rank)
        if training and shuffle_buffer > 1:
            ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        ds = _pictures(ds, image_size, batch_size, training, training and augment, seed,
                       dct_scaling, preprocess)
        if label == "levels":
            from hierarchy.train.models import level_targets

            targets = level_targets(taxonomy)
            ds = ds.map(lambda x, y, *keys: (x, targets(y), *keys))
        yield ds.prefetch(tf.data.AUTOTUNE).with_options(
            _options(input_threads, input_ram_budget_mb, input_optimizations))
    finally:
        reader.stop()
        reader.join()


def _pictures(ds: tf.data.Dataset, image_size: int, batch_size: int, training: bool,
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
            u = _draws(tf.random.experimental.stateless_fold_in(base, position))
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


def input_options(tcfg: dict) -> dict:
    """make_dataset's input-speed arguments from the ``train:`` config section."""
    return {"dct_scaling": bool(tcfg["dct_scaling"]),
            "input_threads": int(tcfg["input_threads"]),
            "input_ram_budget_mb": int(tcfg["input_ram_budget_mb"]),
            "input_optimizations": bool(tcfg["input_optimizations"]),
            "cache_mb": int(tcfg["input_cache_mb"])}


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
