"""Per picture: a perceptual hash and the statistics the flags need. Pure functions over
Arrow batches (the Spark job maps them over ``images/``; tests call them directly).

The hash is ImageHash's ``phash`` (64 bits: the signs of the 8x8 lowest frequencies of a
32x32 DCT against their median) of the picture in greyscale, decoded at half size by libjpeg's
DCT scaling (Pillow's ``draft``): the hash only looks at 32x32, and a half-size decode costs a
quarter of a full one. ``pixel_std`` is the standard deviation of the same greyscale pixels:
a blank or near-uniform picture has almost none.
"""

from __future__ import annotations

import io
import logging
from typing import Tuple

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

HASH_BITS = 64
DRAFT = (64, 64)   # decode at the smallest DCT scale that keeps >= 64 px a side
HASH_SIDE = 8      # imagehash.phash's hash_size: 8x8 = 64 bits
PHASH_SIDE = 32    # ... times its highfreq_factor 4: the side of the DCT


def algorithm() -> str:
    """What produced a hash, recorded beside it: comparing hashes of two algorithms (or two
    versions that changed it) would be meaningless."""
    import imagehash
    import PIL

    return (f"imagehash.phash(hash_size=8) {imagehash.__version__}, greyscale, "
            f"draft{DRAFT}, Pillow {PIL.__version__}")


def _small_grey(jpeg: bytes) -> Tuple[np.ndarray, float]:
    """(the 32x32 greyscale picture phash transforms, greyscale pixel std) of one JPEG;
    raises on a bad picture. What ``imagehash.phash`` does before its DCT, step for step."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        im.draft("L", DRAFT)
        grey = im.convert("L")
    small = np.asarray(grey.resize((PHASH_SIDE, PHASH_SIDE), Image.LANCZOS))
    return small, float(np.asarray(grey, dtype=np.float32).std())


def _phash(small: np.ndarray) -> np.ndarray:
    """int64 [B]: ``imagehash.phash(hash_size=8)`` of each 32x32 picture of ``small``
    [B, 32, 32], as a signed int64 (its 64 bits, first bit highest). The same scipy DCT and
    median as imagehash, run on the whole batch in two calls instead of two per picture: the
    per-call cost was a fifth of the hashing pass (same bits: a test compares)."""
    import scipy.fftpack

    dct = scipy.fftpack.dct(scipy.fftpack.dct(small, axis=1), axis=2)
    low = dct[:, :HASH_SIDE, :HASH_SIDE].reshape(len(small), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64).view(np.int64)


def picture_hash(jpeg: bytes) -> Tuple[int, float]:
    """(phash as a signed int64, greyscale pixel std) of one JPEG; raises on a bad picture."""
    small, std = _small_grey(jpeg)
    return int(_phash(small[None])[0]), std


HASHED = pa.schema([
    pa.field("phash", pa.int64()),
    pa.field("pixel_std", pa.float32()),
    pa.field("hash_error", pa.string()),
])


def hash_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` without its ``jpeg`` column, plus :data:`HASHED`'s columns. A picture that
    does not decode gets a null hash and its reason (one log line names it); the others go on."""
    jpegs = batch.column("jpeg")
    n = len(jpegs)
    hashes = np.zeros(n, np.int64)
    stds = np.zeros(n, np.float32)
    valid = np.ones(n, bool)
    errors = [None] * n
    smalls = np.zeros((n, PHASH_SIDE, PHASH_SIDE), np.uint8)
    for i in range(n):
        raw = jpegs[i].as_py()
        try:
            smalls[i], stds[i] = _small_grey(raw)
        except Exception as exc:  # noqa: BLE001 - any decoder error is this picture's problem
            valid[i] = False
            errors[i] = f"does not decode: {exc}"
            log.warning("curate: product %s picture %s %s", batch.column("product_id")[i],
                        batch.column("img_idx")[i], errors[i])
    if n:
        hashes = _phash(smalls)
    keep = [name for name in batch.schema.names if name != "jpeg"]
    columns = [batch.column(name) for name in keep]
    columns += [pa.array(hashes, pa.int64(), mask=~valid),
                pa.array(stds, pa.float32(), mask=~valid), pa.array(errors, pa.string())]
    return pa.RecordBatch.from_arrays(columns, names=keep + HASHED.names)


def to_hex(value: int) -> str:
    return f"{value & (1 << 64) - 1:016x}"
