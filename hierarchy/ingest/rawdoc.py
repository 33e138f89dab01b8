"""The fast path of the decode: a mongodump product document read in place.

:func:`hierarchy.ingest.decode.decode_document` is the reference: ``bson.decode`` builds a dict
and a fresh ``bytes`` per picture, every field's type is checked, and anything wrong becomes a
quarantine row. Per gigabyte that is a gigabyte of picture copies plus a dict per document
and per picture, which is what made a Spark task slower per core than a plain loop.

:func:`read_product` walks the BSON bytes of a document that has exactly the Cdiscount shape —
``_id`` (int32/int64) first, ``imgs`` an array ``"0", "1", ...`` of documents holding only a
``picture`` of binary subtype 0 that starts and ends like a JPEG, ``category_id`` (int32/int64,
known to the taxonomy; optional for test dumps), no other field, each at most once — and
returns the pictures as ``memoryview`` slices of the range buffer (no copy: md5 reads them in
place, and the Parquet writer copies each once into its column). Every length is checked
against its enclosing element and every terminator byte is checked, so a document accepted here
is one ``bson.decode`` accepts with the same values. Anything else — another field, another
type, a broken length, an unknown category, a picture that is not a JPEG or declares more
pixels than allowed — returns None and the
reference decode handles it, quarantine rows and all. tests/test_decode_split.py holds the two
paths to the same rows over good, odd and fuzzed documents.
"""

from __future__ import annotations

import struct
from typing import List, Optional, Tuple

from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.ingest.decode import EOI, SOI, frame_pixels

_I32 = struct.Struct("<i").unpack_from
_I64 = struct.Struct("<q").unpack_from
_INT32, _INT64, _ARRAY, _DOCUMENT, _BINARY = 0x10, 0x12, 0x04, 0x03, 0x05
_ID = b"\x10_id\x00", b"\x12_id\x00"
_PICTURE = b"\x05picture\x00"

# (product id, category id or None, (l1, l2, l3), pictures)
Product = Tuple[int, Optional[int], tuple, List[memoryview]]


def read_product(data: bytearray, view: memoryview, pos: int, length: int, kind: str,
                 taxonomy: Taxonomy, max_pixels: int = 0) -> Optional[Product]:
    """The document at ``data[pos:pos + length]`` (``view`` = ``memoryview(data)``) as a
    product, or None when it is not exactly the dump's shape (the reference decode then
    decides). Never raises for bad bytes."""
    try:
        return _read(data, view, pos, length, kind, taxonomy, max_pixels)
    except (struct.error, IndexError, ValueError):
        return None


def _read(data, view, pos, length, kind, taxonomy, max_pixels) -> Optional[Product]:
    end = pos + length - 1  # the document's terminating 0x00
    if length < 5 or data[end] != 0 or _I32(data, pos)[0] != length:
        return None
    head = bytes(data[pos + 4:pos + 9])
    if head == _ID[0]:
        product_id, p = _I32(data, pos + 9)[0], pos + 13
    elif head == _ID[1]:
        product_id, p = _I64(data, pos + 9)[0], pos + 17
    else:
        return None
    category = pictures = None
    while p < end:
        etype = data[p]
        k = data.find(b"\x00", p + 1, end)
        if k < 0:
            return None
        key = bytes(data[p + 1:k])
        p = k + 1
        if key == b"category_id" and category is None:
            if etype == _INT32:
                category, p = _I32(data, p)[0], p + 4
            elif etype == _INT64:
                category, p = _I64(data, p)[0], p + 8
            else:
                return None
        elif key == b"imgs" and pictures is None and etype == _ARRAY:
            size = _I32(data, p)[0]
            if size < 5 or p + size > end:
                return None
            pictures = _pictures(data, view, p, p + size - 1, max_pixels)
            if pictures is None:
                return None
            p += size
        else:
            return None  # another field, a repeated one, or an unexpected type
    if p != end or not pictures:
        return None
    if category is None:
        if kind == "train":
            return None
        levels = (None, None, None)
    else:
        try:
            levels = taxonomy.levels_of_category(category)
        except KeyError:
            return None
    return product_id, category, levels, pictures


def _pictures(data, view, p: int, end: int, max_pixels: int) -> Optional[List[memoryview]]:
    """The ``imgs`` array between its length prefix at ``p`` and its terminator at ``end``."""
    if data[end] != 0:
        return None
    out: List[memoryview] = []
    q = p + 4
    while q < end:
        if data[q] != _DOCUMENT:
            return None
        k = data.find(b"\x00", q + 1, end)
        if k < 0 or bytes(data[q + 1:k]) != str(len(out)).encode():
            return None
        q = k + 1
        size = _I32(data, q)[0]
        doc_end = q + size - 1
        # {"picture": binary}: prefix(4) + 0x05 "picture\0"(9) + length(4) + subtype(1) + bytes
        if size < 19 or doc_end > end or data[doc_end] != 0 or \
                bytes(data[q + 4:q + 13]) != _PICTURE:
            return None
        n = _I32(data, q + 13)[0]
        start = q + 18
        if data[q + 17] != 0 or n < 0 or start + n != doc_end:
            return None
        # the reference's marker check (decode.jpeg_problem): SOI first, EOI last (before
        # any zero padding; most pictures end on EOI itself, so that is looked at first)
        if data[start:start + 3] != SOI or (
                data[doc_end - 2:doc_end] != EOI and
                bytes(data[max(start, doc_end - 64):doc_end]).rstrip(b"\x00")[-2:] != EOI):
            return None
        if max_pixels > 0 and frame_pixels(data, start, doc_end) > max_pixels:
            return None  # the reference decode quarantines it with the declared size
        out.append(view[start:doc_end])
        q = doc_end + 1
    if q != end:
        return None
    return out
