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


def algorithm() -> str:
    """What produced a hash, recorded beside it: comparing hashes of two algorithms (or two
    versions that changed it) would be meaningless."""
    import imagehash
    import PIL

    return (f"imagehash.phash(hash_size=8) {imagehash.__version__}, greyscale, "
            f"draft{DRAFT}, Pillow {PIL.__version__}")


def picture_hash(jpeg: bytes) -> Tuple[int, float]:
    """(phash as a signed int64, greyscale pixel std) of one JPEG; raises on a bad picture."""
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        im.draft("L", DRAFT)
        grey = im.convert("L")
    bits = imagehash.phash(grey).hash.flatten()
    value = int(np.packbits(bits).view(">u8")[0])
    std = float(np.asarray(grey, dtype=np.float32).std())
    return value - (1 << 64) if value >= 1 << 63 else value, std


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
    for i in range(n):
        raw = jpegs[i].as_py()
        try:
            hashes[i], stds[i] = picture_hash(raw)
        except Exception as exc:  # noqa: BLE001 - any decoder error is this picture's problem
            valid[i] = False
            errors[i] = f"does not decode: {exc}"
            log.warning("curate: product %s picture %s %s", batch.column("product_id")[i],
                        batch.column("img_idx")[i], errors[i])
    keep = [name for name in batch.schema.names if name != "jpeg"]
    columns = [batch.column(name) for name in keep]
    columns += [pa.array(hashes, pa.int64(), mask=~valid),
                pa.array(stds, pa.float32(), mask=~valid), pa.array(errors, pa.string())]
    return pa.RecordBatch.from_arrays(columns, names=keep + HASHED.names)


def to_hex(value: int) -> str:
    return f"{value & (1 << 64) - 1:016x}"
