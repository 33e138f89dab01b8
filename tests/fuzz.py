"""A seeded fuzzer of Cdiscount dumps: mutations of a good dump that keep track of which
documents stayed intact and where they now sit, so a test can check that ingest kept every
intact document, accounted for every byte and never crashed.

A dump is built as a list of segments (bytes + whether it is an intact original document);
each mutation rewrites some segments. Mutations follow what a fuzzing campaign against ingest
tried: flipped bytes, lying length prefixes, changed type bytes, odd ``_id`` and
``category_id`` values and types, truncated or foreign pictures, junk between documents, a
truncated tail, duplicated documents, whole junk files.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from typing import Callable, Dict, List

import bson
from bson.int64 import Int64
from corrupt import split_docs

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
GIF = b"GIF89a" + b"\x01" * 40
TYPE_CODES = [0x01, 0x02, 0x03, 0x04, 0x05, 0x07, 0x08, 0x09, 0x0A, 0x10, 0x11, 0x12, 0x13,
              0x20, 0x7F, 0xFF, 0x00]


@dataclass
class Segment:
    data: bytes
    intact_id: int = -1  # the _id of an untouched original document, else -1

    @property
    def intact(self) -> bool:
        return self.intact_id >= 0


@dataclass
class Dump:
    segments: List[Segment]
    mutations: List[str]

    def bytes(self) -> bytes:
        return b"".join(s.data for s in self.segments)

    def intact(self) -> Dict[int, int]:
        """{product id: offset} of the intact documents in the mutated file."""
        out, pos = {}, 0
        for s in self.segments:
            if s.intact:
                out[s.intact_id] = pos
            pos += len(s.data)
        return out


def _doc_index(rng: random.Random, dump: Dump) -> int:
    """A segment that is an intact document (mutations pick among those)."""
    choices = [i for i, s in enumerate(dump.segments) if s.intact]
    return rng.choice(choices) if choices else rng.randrange(len(dump.segments))


def _damaged(dump: Dump, i: int, data: bytes) -> None:
    dump.segments[i] = Segment(data)


def flip_bytes(rng, dump, taken_ids):
    i = _doc_index(rng, dump)
    b = bytearray(dump.segments[i].data)
    for _ in range(rng.randint(1, 4)):
        # the head (prefix, first element) is where flips hurt the most: favour it
        pos = rng.randrange(min(len(b), 24)) if rng.random() < 0.5 else rng.randrange(len(b))
        b[pos] ^= 1 << rng.randrange(8)
    _damaged(dump, i, bytes(b))


def lie_length(rng, dump, taken_ids):
    i = _doc_index(rng, dump)
    b = bytearray(dump.segments[i].data)
    delta = rng.choice([-1, 1, -7, 13, -len(b) + 3, 5000, 1 << 26, -(1 << 31) + 1])
    struct.pack_into("<i", b, 0, max(-(1 << 31), min((1 << 31) - 1, len(b) + delta)))
    _damaged(dump, i, bytes(b))


def _find_type_byte(data: bytes, key: bytes) -> int:
    at = data.find(key + b"\x00")
    return at - 1 if at > 0 else -1


def change_type_byte(rng, dump, taken_ids):
    i = _doc_index(rng, dump)
    data = dump.segments[i].data
    key = rng.choice([b"_id", b"category_id", b"imgs", b"picture"])
    pos = _find_type_byte(data, key)
    if pos < 0:
        return
    b = bytearray(data)
    b[pos] = rng.choice([c for c in TYPE_CODES if c != b[pos]])
    _damaged(dump, i, bytes(b))


def _reencode(rng, dump, edit: Callable[[dict], None]):
    i = _doc_index(rng, dump)
    try:
        doc = bson.decode(dump.segments[i].data)
    except Exception:  # noqa: BLE001 - already damaged: leave it
        return
    edit(doc)
    _damaged(dump, i, bson.encode(doc))


def odd_id(rng, dump, taken_ids):
    fresh = max(taken_ids) + 1 + rng.randrange(1000)
    value = rng.choice([str(fresh), float(fresh) + 0.5, float(fresh), True, None,
                        Int64(fresh), [fresh], {"n": fresh}, b"\x01\x02"])
    i = _doc_index(rng, dump)
    try:
        doc = bson.decode(dump.segments[i].data)
    except Exception:  # noqa: BLE001
        return
    rest = {k: v for k, v in doc.items() if k != "_id"}
    _damaged(dump, i, bson.encode({"_id": value, **rest}))
    if isinstance(value, Int64):
        taken_ids.add(int(value))


def odd_category(rng, dump, taken_ids):
    def edit(doc):
        cid = doc.get("category_id", 1000010653)
        doc["category_id"] = rng.choice([str(cid), float(cid) + 0.5, float(cid), True, None,
                                         12345, -1, Int64(cid), [cid], "", b"x"])

    _reencode(rng, dump, edit)


def drop_field(rng, dump, taken_ids):
    field = rng.choice(["_id", "imgs", "category_id"])
    _reencode(rng, dump, lambda doc: doc.pop(field, None))


def odd_imgs(rng, dump, taken_ids):
    def edit(doc):
        choice = rng.randrange(6)
        imgs = doc.get("imgs") or []
        if choice == 0:
            doc["imgs"] = []
        elif choice == 1:
            doc["imgs"] = "not an array"
        elif choice == 2 and imgs:
            doc["imgs"] = [*imgs, "a string"]
        elif choice == 3 and imgs:
            imgs[0] = {"picture": rng.choice([PNG, GIF, b"", "text", 7])}
        elif choice == 4 and imgs:
            pic = imgs[0]["picture"]
            imgs[-1] = {"picture": pic[: rng.randrange(1, max(2, len(pic)))]}
        else:
            doc["imgs"] = [{"photo": b"\xff\xd8\xff"}]

    _reencode(rng, dump, edit)


def insert_junk(rng, dump, taken_ids):
    at = rng.randrange(len(dump.segments) + 1)
    junk = bytes(rng.randrange(256) for _ in range(rng.choice([1, 3, 9, 100, 777])))
    dump.segments.insert(at, Segment(junk))


def zero_region(rng, dump, taken_ids):
    i = _doc_index(rng, dump)
    b = bytearray(dump.segments[i].data)
    start = rng.randrange(len(b))
    end = min(len(b), start + rng.choice([4, 64, 1000]))
    b[start:end] = b"\x00" * (end - start)
    _damaged(dump, i, bytes(b))


def duplicate_doc(rng, dump, taken_ids):
    """A copy of an intact document later in the file: the original (first) must stay."""
    i = _doc_index(rng, dump)
    if not dump.segments[i].intact:
        return
    at = rng.randrange(i + 1, len(dump.segments) + 1)
    dump.segments.insert(at, Segment(dump.segments[i].data))


def truncate_tail(rng, dump, taken_ids):
    i = rng.randrange(len(dump.segments))
    data = dump.segments[i].data
    dump.segments[i:] = [Segment(data[: rng.randrange(len(data))])] if len(data) > 1 else []


MUTATIONS = [flip_bytes, lie_length, change_type_byte, odd_id, odd_category, drop_field,
             odd_imgs, insert_junk, zero_region, duplicate_doc, truncate_tail]


def mutate(good: bytes, seed: int, n_mutations: int) -> Dump:
    rng = random.Random(seed)
    docs = split_docs(good)
    ids = [bson.decode(d)["_id"] for d in docs]
    dump = Dump([Segment(d, pid) for d, pid in zip(docs, ids)], [])
    taken = set(ids)
    for _ in range(n_mutations):
        # a truncated tail last at most: anything after it would sit past the cut
        pool = MUTATIONS if rng.random() < 0.15 else MUTATIONS[:-1]
        mutation = rng.choice(pool)
        mutation(rng, dump, taken)
        dump.mutations.append(mutation.__name__)
        if not dump.segments:
            break
    return dump


def junk_file(seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.randrange(256) for _ in range(size))
