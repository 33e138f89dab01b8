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
from bson.int64 import Int64

from hierarchy.contracts.taxonomy import Taxonomy

SOI = b"\xff\xd8\xff"
EOI = b"\xff\xd9"

# Quarantine reason codes (stable: the manifest counts them, analysts filter on them).
UNDECODABLE_DOCUMENT = "undecodable_document"
MISSING_ID = "missing_id"
BAD_ID = "bad_id"
DUPLICATE_ID = "duplicate_id"
MISSING_CATEGORY = "missing_category"
BAD_CATEGORY = "bad_category"
UNKNOWN_CATEGORY = "unknown_category"
NO_PICTURES = "no_pictures"
BAD_IMGS = "bad_imgs"
BAD_IMAGE_ENTRY = "bad_image_entry"
NO_USABLE_PICTURES = "no_usable_pictures"
BAD_PICTURE_FIELD = "bad_picture_field"
NOT_JPEG = "not_jpeg"
TRUNCATED_JPEG = "truncated_jpeg"
UNDECODABLE_JPEG = "undecodable_jpeg"
OVERSIZED_JPEG = "oversized_jpeg"

# Quarantine levels: a corrupt byte region, a document that was not used, a product that was
# kept with something dropped (a test product's unusable label, its missing pictures), a
# picture. Regions and unused documents tile the bytes that products do not cover.
REGION, DOCUMENT, PRODUCT, IMAGE = "region", "document", "product", "image"

_INT_TYPES = (int, Int64)  # what BSON int32 and int64 decode to; bool (BSON 0x08) is excluded


@dataclass
class Outcome:
    """What one document became. ``product`` is None when the document is unusable."""

    product: Optional[dict]
    images: List[dict] = field(default_factory=list)
    quarantine: List[dict] = field(default_factory=list)


# frame headers (SOF0-15) carry the picture's size; C4 (DHT), C8 (JPG) and CC (DAC) are not
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])
SOS = 0xDA


def frame_pixels(data, start: int = 0, end: Optional[int] = None) -> int:
    """Width x height the JPEG in ``data[start:end]`` declares in its frame header, read by
    walking the segments before the scan (a few steps; nothing is decoded). 0 when no frame
    header comes before the scan, or the height is left to a later DNL segment.

    Why: a few hundred bytes may declare 65500 x 65500 pixels. Pillow refuses the extreme
    ones, but TensorFlow's decoder in training does not, and ~12 GB of RGB kills a worker."""
    end = len(data) if end is None else end
    p = start + 2
    while p + 9 <= end:
        if data[p] != 0xFF:
            return 0
        marker = data[p + 1]
        if marker == 0xFF:  # fill byte
            p += 1
        elif marker in _STANDALONE:
            p += 2
        elif marker in _SOF:
            return ((data[p + 5] << 8) | data[p + 6]) * ((data[p + 7] << 8) | data[p + 8])
        elif marker == SOS:
            return 0
        else:
            p += 2 + ((data[p + 2] << 8) | data[p + 3])
    return 0


def oversized(pixels: int, max_pixels: int) -> Tuple[str, str]:
    return OVERSIZED_JPEG, (f"its header declares {pixels} pixels; the limit is {max_pixels} "
                            f"(ingest.max_picture_pixels)")


def jpeg_problem(data: bytes, verify: str = "markers",
                 max_pixels: int = 0) -> Optional[Tuple[str, str]]:
    """(reason, detail) when ``data`` is not a usable JPEG, else None. ``max_pixels`` > 0
    refuses a picture whose header declares more, before anything decodes it."""
    if not isinstance(data, (bytes, bytearray)):
        return BAD_PICTURE_FIELD, f"picture is {bson_type(data)}, not binary"
    if not data.startswith(SOI):
        return NOT_JPEG, f"no JPEG start-of-image marker (first bytes {bytes(data[:4]).hex()})"
    if not data.rstrip(b"\x00").endswith(EOI):
        return TRUNCATED_JPEG, f"no JPEG end-of-image marker ({len(data)} bytes)"
    if max_pixels > 0:
        pixels = frame_pixels(data)
        if pixels > max_pixels:
            return oversized(pixels, max_pixels)
    if verify == "decode":
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
            return UNDECODABLE_JPEG, f"Pillow cannot decode it: {exc}"
    return None


def bson_type(value) -> str:
    """The BSON type a decoded value came from, for messages ("a string", "a double")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if type(value) is int:
        return "an int32"
    if isinstance(value, Int64):
        return "an int64"
    names = {float: "a double", str: "a string", list: "an array", dict: "a document",
             bytes: "binary"}
    for t, name in names.items():
        if isinstance(value, t):
            return name
    return f"a {type(value).__name__}"


def is_bson_int(value) -> bool:
    return type(value) in _INT_TYPES


def _q(source: str, offset: int, length: int, product_id, img_idx, level: str, reason: str,
       detail: str) -> dict:
    return {"source": source, "offset": offset, "length": length, "product_id": product_id,
            "img_idx": img_idx, "level": level, "reason": reason, "detail": detail}


def _head_id(raw: bytes) -> Optional[int]:
    """The ``_id`` the offset index read from the document's first field (int32/int64)."""
    if len(raw) >= 13 and raw[4] == 0x10 and raw[5:9] == b"_id\x00":
        return struct.unpack_from("<i", raw, 9)[0]
    if len(raw) >= 17 and raw[4] == 0x12 and raw[5:9] == b"_id\x00":
        return struct.unpack_from("<q", raw, 9)[0]
    return None


def _label(doc: dict, kind: str, taxonomy: Taxonomy):
    """(category_id, (l1, l2, l3), problem) where problem is (reason, detail) or None.
    Types are checked, never coerced: "1000010653" and 1000010653.5 are not category ids."""
    if "category_id" not in doc:
        if kind == "train":
            return None, (None, None, None), (MISSING_CATEGORY, "train product without "
                                                                "category_id")
        return None, (None, None, None), None
    value = doc["category_id"]
    if not is_bson_int(value):
        return None, (None, None, None), (
            BAD_CATEGORY, f"category_id {value!r} is {bson_type(value)}, not an int32/int64")
    try:
        return int(value), taxonomy.levels_of_category(value), None
    except KeyError:
        return None, (None, None, None), (
            UNKNOWN_CATEGORY, f"category_id {int(value)} is not in the category table")


def _product_id(doc: dict, raw: bytes) -> Tuple[Optional[int], Optional[Tuple[str, str]]]:
    """(the document's product id, None) or (None, (reason, detail))."""
    if "_id" not in doc:
        return None, (MISSING_ID, "no _id field")
    product_id = doc["_id"]
    if not is_bson_int(product_id):
        return None, (BAD_ID, f"_id {product_id!r} is {bson_type(product_id)}, not an "
                              "int32/int64")
    head = _head_id(raw)
    if head is not None and head != product_id:
        # the offset index (and the split) used the first _id; bson kept the last one
        return None, (BAD_ID, f"two _id fields ({head} and {int(product_id)})")
    return int(product_id), None


def _add_pictures(out: Outcome, pictures: list, product_id: int, labels: dict, where: tuple,
                  verify_jpeg: str, max_pixels: int) -> None:
    """Each usable picture of ``imgs`` as an images/ row (``labels``: its product's label
    and split columns), each other one as a quarantine row saying why."""
    for idx, pic in enumerate(pictures):
        if not isinstance(pic, dict):
            problem = BAD_IMAGE_ENTRY, f"imgs[{idx}] is {bson_type(pic)}, not a document"
        elif "picture" not in pic:
            problem = BAD_PICTURE_FIELD, f"imgs[{idx}] has no picture field"
        else:
            problem = jpeg_problem(pic["picture"], verify_jpeg, max_pixels)
        if problem:
            out.quarantine.append(_q(*where, product_id, idx, IMAGE, *problem))
            continue
        data = bytes(pic["picture"])
        out.images.append({"product_id": product_id, "img_idx": idx, **labels,
                           "nbytes": len(data), "md5": hashlib.md5(data).hexdigest(),
                           "jpeg": data})


def _unused(out: Outcome, pictures: list, product_id: int, where: tuple) -> Outcome:
    """A train document with no usable picture: one document-level row says why, pictures
    keep theirs."""
    rows = [q for q in out.quarantine if q["level"] == IMAGE]
    if pictures:
        rows.append(_q(*where, product_id, None, DOCUMENT, NO_USABLE_PICTURES,
                       f"none of its {len(pictures)} picture(s) is usable"))
    else:
        rows += [{**q, "level": DOCUMENT} for q in out.quarantine if q["level"] == PRODUCT]
    return Outcome(None, [], rows)


def decode_document(raw: bytes, *, source: str, offset: int, kind: str, split: str,
                    taxonomy: Taxonomy, verify_jpeg: str = "markers",
                    max_pixels: int = 0) -> Outcome:
    """Turn one document's bytes into rows; never raises for bad data.

    Every field is checked for its BSON type: ``_id`` an int32/int64 (and the only ``_id``),
    ``category_id`` an int32/int64 in the taxonomy (train; a test product keeps its row and
    drops an unusable label), ``imgs`` a non-empty array of documents whose ``picture`` is
    binary JPEG data."""
    where = (source, offset, len(raw))
    try:
        doc = bson.decode(raw)
    except Exception as exc:  # noqa: BLE001 - bson raises InvalidBSON and others
        doc, problem = None, (UNDECODABLE_DOCUMENT, f"bson cannot decode it: {exc}")
    else:
        product_id, problem = _product_id(doc, raw)
    if problem is not None:
        return Outcome(None, [], [_q(*where, None, None, DOCUMENT, *problem)])

    out = Outcome(None)
    category_id, levels, problem = _label(doc, kind, taxonomy)
    if problem is not None:
        if kind == "train":
            return Outcome(None, [], [_q(*where, product_id, None, DOCUMENT, *problem)])
        # a test product stays (the submission needs its row); its label is dropped, loudly
        out.quarantine.append(_q(*where, product_id, None, PRODUCT, *problem))

    pictures = doc.get("imgs")
    if not isinstance(pictures, list):
        reason = NO_PICTURES if pictures is None else BAD_IMGS
        out.quarantine.append(_q(*where, product_id, None, PRODUCT, reason,
                                 f"imgs is {_describe(pictures)}"))
        pictures = []
    elif not pictures:
        out.quarantine.append(_q(*where, product_id, None, PRODUCT, NO_PICTURES,
                                 "imgs is an empty array"))
    l1, l2, l3 = levels
    _add_pictures(out, pictures, product_id, {"category_id": category_id, "l1": l1, "l2": l2,
                                              "l3": l3, "split": split},
                  where, verify_jpeg, max_pixels)
    if not out.images and kind == "train":
        return _unused(out, pictures, product_id, where)
    # A test product stays even with no usable picture: the submission needs its row.
    out.product = product_row(product_id, category_id, levels, split, len(out.images),
                              len(pictures) - len(out.images), *where)
    return out


def product_row(product_id: int, category_id, levels: tuple, split: str, n_images: int,
                n_bad_images: int, source: str, offset: int, length: int) -> dict:
    """One row of products/ (PRODUCTS_FILE), for the reference decode and the fast path."""
    l1, l2, l3 = levels
    return {"product_id": product_id, "category_id": category_id, "l1": l1, "l2": l2,
            "l3": l3, "split": split, "n_images": n_images, "n_bad_images": n_bad_images,
            "source": source, "offset": offset, "length": length}


def _describe(value) -> str:
    if value is None:
        return "missing"
    return f"{bson_type(value)}, not an array"


_LEN = struct.Struct("<i")


def document_spans(data, base_offset: int, first: int = 0) -> Iterator[Tuple[int, int, int]]:
    """(absolute offset, position in ``data``, length) of each document in a byte range the
    scan already validated, which starts at ``data[first]`` (file offset ``base_offset``)."""
    pos, end = first, len(data)
    unpack = _LEN.unpack_from
    while pos + 4 <= end:
        (length,) = unpack(data, pos)
        if length < 5 or pos + length > end:
            raise ValueError(
                f"byte range at {base_offset} broke at +{pos - first}: length {length}; the offset "
                "index does not match the file (was it modified since the scan?)"
            )
        yield base_offset + pos - first, pos, length
        pos += length


def iter_documents(data: bytes, base_offset: int) -> Iterator[Tuple[int, bytes]]:
    """(absolute offset, bytes) of each document in a byte range the scan already validated."""
    for offset, pos, length in document_spans(data, base_offset):
        yield offset, bytes(data[pos:pos + length])


def count_reasons(rows: List[dict]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return counts
