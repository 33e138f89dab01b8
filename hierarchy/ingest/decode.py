"""One BSON document in, rows out: the product, its usable pictures, and what was quarantined.

Pure functions (no I/O, no Spark) so tests feed them bytes directly. Pictures are passed
through byte for byte; the only look inside a JPEG is the validity check.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import bson

from hierarchy.taxonomy import Taxonomy

SOI = b"\xff\xd8\xff"
EOI = b"\xff\xd9"

# Quarantine reason codes (stable: the manifest counts them, analysts filter on them).
UNDECODABLE_DOCUMENT = "undecodable_document"
MISSING_ID = "missing_id"
NO_PICTURES = "no_pictures"
NO_USABLE_PICTURES = "no_usable_pictures"
MISSING_CATEGORY = "missing_category"
UNKNOWN_CATEGORY = "unknown_category"
BAD_PICTURE_FIELD = "bad_picture_field"
NOT_JPEG = "not_jpeg"
TRUNCATED_JPEG = "truncated_jpeg"
UNDECODABLE_JPEG = "undecodable_jpeg"


@dataclass
class Outcome:
    """What one document became. ``product`` is None when the document is unusable."""

    product: Optional[dict]
    images: List[dict] = field(default_factory=list)
    quarantine: List[dict] = field(default_factory=list)


def jpeg_problem(data: bytes, verify: str = "markers") -> Optional[Tuple[str, str]]:
    """(reason, detail) when ``data`` is not a usable JPEG, else None."""
    if not isinstance(data, (bytes, bytearray)):
        return BAD_PICTURE_FIELD, f"picture is {type(data).__name__}, not binary"
    if not data.startswith(SOI):
        return NOT_JPEG, f"no JPEG start-of-image marker (first bytes {bytes(data[:4]).hex()})"
    if not data.rstrip(b"\x00").endswith(EOI):
        return TRUNCATED_JPEG, f"no JPEG end-of-image marker ({len(data)} bytes)"
    if verify == "decode":
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
            return UNDECODABLE_JPEG, f"Pillow cannot decode it: {exc}"
    return None


def _q(source: str, offset: int, length: int, product_id, img_idx, level: str, reason: str,
       detail: str) -> dict:
    return {"source": source, "offset": offset, "length": length, "product_id": product_id,
            "img_idx": img_idx, "level": level, "reason": reason, "detail": detail}


def decode_document(raw: bytes, *, source: str, offset: int, kind: str, split: str,
                    taxonomy: Taxonomy, verify_jpeg: str = "markers") -> Outcome:
    """Turn one document's bytes into rows; never raises for bad data."""
    length = len(raw)

    def doc_bad(reason: str, detail: str, product_id=None) -> Outcome:
        return Outcome(None, [], [_q(source, offset, length, product_id, None, "document",
                                     reason, detail)])

    try:
        doc = bson.decode(raw)
    except Exception as exc:  # noqa: BLE001 - bson raises InvalidBSON and others
        return doc_bad(UNDECODABLE_DOCUMENT, f"bson cannot decode it: {exc}")
    product_id = doc.get("_id")
    if not isinstance(product_id, int) or isinstance(product_id, bool):
        return doc_bad(MISSING_ID, f"_id is {product_id!r}, not an integer")

    category_id, levels = doc.get("category_id"), (None, None, None)
    if kind == "train":
        if category_id is None:
            return doc_bad(MISSING_CATEGORY, "train product without category_id", product_id)
        try:
            levels = taxonomy.levels_of_category(category_id)
        except (KeyError, TypeError, ValueError):
            return doc_bad(UNKNOWN_CATEGORY,
                           f"category_id {category_id!r} is not in the taxonomy", product_id)
    else:
        # test dumps carry no labels; keep one when it is present and known
        try:
            levels = taxonomy.levels_of_category(category_id) if category_id is not None \
                else levels
        except (KeyError, TypeError, ValueError):
            category_id = None
    l1, l2, l3 = levels

    pictures = doc.get("imgs")
    out = Outcome(None)
    if not isinstance(pictures, list) or not pictures:
        out.quarantine.append(_q(source, offset, length, product_id, None, "document",
                                 NO_PICTURES, f"imgs is {_describe(pictures)}"))
        pictures = []
    for idx, pic in enumerate(pictures):
        data = pic.get("picture") if isinstance(pic, dict) else None
        problem = jpeg_problem(data, verify_jpeg) if data is not None else \
            (BAD_PICTURE_FIELD, f"imgs[{idx}] has no picture field")
        if problem:
            out.quarantine.append(_q(source, offset, length, product_id, idx, "image", *problem))
            continue
        data = bytes(data)
        out.images.append({
            "product_id": product_id, "img_idx": idx, "category_id": category_id,
            "l1": l1, "l2": l2, "l3": l3, "split": split, "nbytes": len(data),
            "md5": hashlib.md5(data).hexdigest(), "jpeg": data,
        })

    if not out.images and kind == "train":
        if pictures:
            out.quarantine.append(_q(source, offset, length, product_id, None, "document",
                                     NO_USABLE_PICTURES,
                                     f"none of its {len(pictures)} picture(s) is usable"))
        return Outcome(None, [], out.quarantine)
    # A test product stays even with no usable picture: the submission needs its row.
    out.product = {
        "product_id": product_id, "category_id": category_id, "l1": l1, "l2": l2, "l3": l3,
        "split": split, "n_images": len(out.images),
        "n_bad_images": len(pictures) - len(out.images), "source": source, "offset": offset,
        "length": length,
    }
    return out


def _describe(value) -> str:
    if value is None:
        return "missing"
    if isinstance(value, list):
        return "an empty list"
    return f"a {type(value).__name__}, not a list"


_LEN = struct.Struct("<i")


def iter_documents(data: bytes, base_offset: int) -> Iterator[Tuple[int, bytes]]:
    """(absolute offset, bytes) of each document in a byte range the scan already validated."""
    pos, end = 0, len(data)
    while pos + 4 <= end:
        (length,) = _LEN.unpack_from(data, pos)
        if length < 5 or pos + length > end:
            raise ValueError(
                f"byte range at {base_offset} broke at +{pos}: length {length}; the offset "
                "index does not match the file (was it modified since the scan?)"
            )
        yield base_offset + pos, data[pos:pos + length]
        pos += length


def count_reasons(rows: List[dict]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return counts
