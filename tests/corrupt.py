"""Builders of corrupt Cdiscount dumps from good documents: one per failure the ingest must
survive. Each returns the new bytes; the good documents stay byte-identical."""

import struct
from typing import List, Tuple

import bson

JPEG_OK = b"\xff\xd8\xff\xe0" + b"\x00" * 16 + b"\xff\xd9"


def split_docs(data: bytes) -> List[bytes]:
    docs, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<i", data, pos)
        docs.append(data[pos:pos + n])
        pos += n
    return docs


def encode(doc: dict) -> bytes:
    return bson.encode(doc)


def bad_inner_document(doc: bytes) -> bytes:
    """Length and terminator intact, an element type inside replaced by an invalid one."""
    b = bytearray(doc)
    b[4 + 4 + 4 + 1] = 0x77  # the type byte of imgs' first element
    return bytes(b)


def lying_length(doc: bytes, delta: int) -> bytes:
    b = bytearray(doc)
    struct.pack_into("<i", b, 0, len(doc) + delta)
    return bytes(b)


def catalogue_of_failures(docs: List[bytes], category_id: int) -> Tuple[bytes, dict]:
    """A dump holding every kind of damage between good documents.
    Returns (bytes, {reason: count expected in quarantine})."""
    parts = [docs[0], docs[1]]
    parts.append(b"\xde\xad\xbe\xef" * 25)                        # garbage between documents
    parts.append(docs[2])
    parts.append(lying_length(docs[3], +5000))                     # a length prefix that lies
    parts.append(docs[4])
    parts.append(bad_inner_document(docs[5]))                      # fails to decode
    parts.append(docs[6])
    parts.append(encode({"_id": 900001, "imgs": [], "category_id": category_id}))  # no pictures
    parts.append(encode({"_id": 900002, "imgs": [{"picture": b"GIF89a not a jpeg"},
                                                 {"picture": JPEG_OK}],
                         "category_id": category_id}))             # one bad picture of two
    parts.append(encode({"_id": 900003, "imgs": [{"picture": JPEG_OK}]}))  # no category_id
    parts.append(encode({"_id": 900004, "imgs": [{"picture": JPEG_OK}],
                         "category_id": 12345}))                   # unknown category
    real = bson.decode(docs[0])["imgs"][0]["picture"]
    parts.append(encode({"_id": 900005, "imgs": [{"picture": declaring(real, 65500)},
                                                 {"picture": real}],
                         "category_id": category_id}))             # a header bomb beside
    parts.append(docs[7])
    parts.append(docs[8][: len(docs[8]) // 2])                     # truncated tail
    expected = {"garbage": 1, "bad_length": 1, "undecodable_document": 1, "no_pictures": 1,
                "not_jpeg": 1, "missing_category": 1, "unknown_category": 1, "truncated": 1,
                "oversized_jpeg": 1}
    return b"".join(parts), expected


def declaring(jpeg: bytes, side: int) -> bytes:
    """``jpeg`` with its frame header (SOF0-2) claiming side x side pixels, data unchanged:
    a few hundred bytes that would decode to side * side * 3 bytes of RGB."""
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        at = jpeg.find(marker)
        if at > 0:
            size = side.to_bytes(2, "big")
            return jpeg[:at + 5] + size + size + jpeg[at + 9:]
    raise AssertionError("no frame header in the JPEG")
