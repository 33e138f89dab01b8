"""Training augmentation: a random crop (85-100 % of the side, anywhere in the picture), the
resize, a horizontal flip and a rotation of up to +-10 degrees in one bilinear pass, then a
small colour jitter (brightness, contrast, saturation).

Random draws are stateless, seeded by the run's seed and the picture's position in the
stream (:mod:`hierarchy.train.data`), so a seed and a read order give the same pictures. A
picture is first cut to the window its crop can reach (:func:`cut_for_augmentation`); the
geometry and the colour then run on whole padded batches, compiled by XLA
(:func:`augment_batch`): per picture, TensorFlow's projective-transform kernel and a few
dozen small ops cost more than the decode itself. :func:`augment_image` is the same for one
picture.
"""

from __future__ import annotations

import math

import tensorflow as tf

CROP_MIN = 0.85            # random crop keeps 85-100 % of the picture's side
MAX_ROTATION_DEG = 10.0
BRIGHTNESS = 0.08          # +- fraction of full scale
CONTRAST = (0.85, 1.15)
SATURATION = (0.85, 1.15)


# how much wider than the crop the part of a picture a rotated crop can sample is, at most:
# a square turned by theta covers (|cos| + |sin|) of its side on each axis
ROTATED_REACH = math.cos(math.radians(MAX_ROTATION_DEG)) + math.sin(math.radians(MAX_ROTATION_DEG))


def draws(seed: tf.Tensor) -> tf.Tensor:
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
    from its :func:`draws` [..., 8]."""
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
    u = draws(seed)
    window, meta = cut_for_augmentation(image, u)
    return augment_batch(window[None], meta[None], u[None], image_size)[0]
