import struct

import bson
import numpy as np
from bson.binary import Binary
from bson.int64 import Int64
from corrupt import JPEG_OK, split_docs

from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.ingest.decode import decode_document, iter_documents, jpeg_problem
from hierarchy.ingest.split import TRAIN, VAL, assign_splits

TAX = Taxonomy.from_rows([(10, "A", "A1", "x"), (20, "A", "A2", "y"), (30, "B", "B1", "z")])


def run(doc, kind="train", raw=None):
    raw = raw if raw is not None else bson.encode(doc)
    return decode_document(raw, source="f.bson", offset=100, kind=kind, split="train",
                           taxonomy=TAX)


def test_good_product_keeps_bytes_and_levels():
    pic = JPEG_OK + b"\x00"  # trailing padding after EOI is tolerated
    out = run({"_id": 7, "imgs": [{"picture": JPEG_OK}, {"picture": pic}], "category_id": 30})
    assert out.product["n_images"] == 2 and out.product["l1"] == 1 and out.product["l3"] == 2
    assert [i["jpeg"] for i in out.images] == [JPEG_OK, pic]
    assert out.images[0]["nbytes"] == len(JPEG_OK) and len(out.images[0]["md5"]) == 32
    assert out.quarantine == []


def test_bad_pictures_are_quarantined_one_by_one():
    out = run({"_id": 7, "imgs": [{"picture": b"\x89PNG...."}, {"picture": JPEG_OK[:-2]},
                                  {"picture": JPEG_OK}, {"nope": 1}], "category_id": 10})
    assert out.product["n_images"] == 1 and out.product["n_bad_images"] == 3
    assert [q["reason"] for q in out.quarantine] == ["not_jpeg", "truncated_jpeg",
                                                      "bad_picture_field"]
    assert [q["img_idx"] for q in out.quarantine] == [0, 1, 3]


def test_unusable_train_documents():
    cases = {
        "missing_category": {"_id": 1, "imgs": [{"picture": JPEG_OK}]},
        "unknown_category": {"_id": 1, "imgs": [{"picture": JPEG_OK}], "category_id": 99},
        "missing_id": {"imgs": [{"picture": JPEG_OK}], "category_id": 10},
        "no_pictures": {"_id": 1, "imgs": [], "category_id": 10},
        "no_usable_pictures": {"_id": 1, "imgs": [{"picture": b"xx"}], "category_id": 10},
    }
    for reason, doc in cases.items():
        out = run(doc)
        assert out.product is None and not out.images, reason
        assert reason in [q["reason"] for q in out.quarantine], reason
    out = run(None, raw=b"\x0c\x00\x00\x00\x77a\x00\x01\x00\x00\x00\x00")
    assert out.quarantine[0]["reason"] == "undecodable_document"
    assert out.quarantine[0]["offset"] == 100


def test_test_products_are_kept_even_without_pictures():
    out = run({"_id": 5, "imgs": []}, kind="test")
    assert out.product["n_images"] == 0 and out.product["category_id"] is None
    assert out.quarantine[0]["reason"] == "no_pictures"


def test_full_jpeg_verification(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "JPEG")
    good = buf.getvalue()
    broken = good[:20] + b"\x00" * 40 + good[60:]
    assert jpeg_problem(good, "decode") is None
    assert jpeg_problem(broken, "markers") is None
    assert jpeg_problem(broken, "decode")[0] == "undecodable_jpeg"


def test_iter_documents_walks_a_range():
    docs = [bson.encode({"_id": i}) for i in range(3)]
    got = list(iter_documents(b"".join(docs), 1000))
    assert [o for o, _ in got] == [1000, 1000 + len(docs[0]), 1000 + 2 * len(docs[0])]


def test_splits_are_deterministic_by_product_and_keep_one_train_per_category():
    rng = np.random.default_rng(0)
    pids = rng.permutation(20_000).astype(np.int64)
    cats = rng.integers(0, 300, size=len(pids)).astype(np.int64)
    a = assign_splits(pids, cats, "train", 0.5, seed=3, draw="category")
    b = assign_splits(pids[::-1], cats[::-1], "train", 0.5, seed=3, draw="category")[::-1]
    assert np.array_equal(a, b)  # independent of order and partitioning
    assert 0.46 < (a == VAL).mean() < 0.5
    for c in np.unique(cats):
        assert (a[cats == c] == TRAIN).any()
    assert not np.array_equal(a, assign_splits(pids, cats, "train", 0.5, seed=4,
                                               draw="category"))
    # duplicate product ids never straddle splits
    dup = assign_splits(np.array([5, 5, 6]), np.array([1, 2, 1]), "train", 0.99, 1,
                        draw="category")
    assert dup[0] == dup[1]
    assert (assign_splits(pids, cats, "test", 0.5, 3) == 2).all()


def test_product_draw_puts_the_long_tail_in_val_at_its_rate():
    """The default draw ignores the category: val's products are a hash sample of the dump,
    so the share of val products whose category has no train product is what a new product
    drawn like the dump meets (under the category draw it is 0: val never sees the tail)."""
    rng = np.random.default_rng(1)
    n = 40_000
    pids = rng.permutation(n).astype(np.int64)
    # a long tail: Zipf-like category sizes, thousands of categories with one or two products
    cats = np.minimum(rng.zipf(1.3, size=n), 50_000).astype(np.int64)
    a = assign_splits(pids, cats, "train", 0.3, seed=7)
    assert np.array_equal(a, assign_splits(pids[::-1], cats[::-1], "train", 0.3, 7)[::-1])
    assert 0.29 < (a == VAL).mean() < 0.31
    # the same share of val as of a fresh hash sample of the same dump
    in_train = set(cats[a == TRAIN].tolist())
    unseen_val = np.mean([c not in in_train for c in cats[a == VAL]])
    u = rng.random(n) < 0.3
    fresh_train = set(cats[~u].tolist())
    unseen_fresh = np.mean([c not in fresh_train for c in cats[u]])
    assert unseen_val > 0.01 and abs(unseen_val - unseen_fresh) < 0.01
    old = assign_splits(pids, cats, "train", 0.3, seed=7, draw="category")
    kept = set(cats[old == TRAIN].tolist())
    assert not any(c not in kept for c in cats[old == VAL])


# ------------------------------------------------------------------ the fast path
def _spans(data: bytes):
    from hierarchy.ingest.scan import scan_bytes

    scan = scan_bytes(data)
    return list(zip(scan.offsets.tolist(), scan.lengths.tolist()))


def _same_as_reference(buf: bytearray, off: int, length: int, kind: str, tax) -> bool:
    """Whether the fast path took the document; asserts it read what the reference does."""
    from hierarchy.ingest.rawdoc import read_product

    fast = read_product(buf, memoryview(buf), off, length, kind, tax)
    if fast is None:
        return False
    ref = decode_document(bytes(buf[off:off + length]), source="s", offset=off, kind=kind,
                          split="train", taxonomy=tax)
    assert ref.product is not None and not ref.quarantine, (off, ref.quarantine)
    product_id, category_id, levels, pictures = fast
    p = ref.product
    assert (p["product_id"], p["category_id"], (p["l1"], p["l2"], p["l3"])) == \
        (product_id, category_id, levels)
    assert type(product_id) is int and p["n_bad_images"] == 0
    assert [bytes(x) for x in pictures] == [i["jpeg"] for i in ref.images]
    return True


def test_fast_path_takes_the_real_dump_and_reads_what_bson_decodes(real_bson,
                                                                   real_categories):
    tax = Taxonomy.from_csv(str(real_categories))
    buf = bytearray(real_bson.read_bytes())
    spans = _spans(bytes(buf))
    taken = sum(_same_as_reference(buf, off, n, kind, tax)
                for off, n in spans for kind in ("train", "test"))
    assert taken == 2 * len(spans) == 164  # every real document, as train and as test


def test_fast_path_leaves_every_other_shape_to_the_reference():
    pic = JPEG_OK + b"\x00" * 3
    cases = {
        "int64 id": ({"_id": Int64(1 << 40), "imgs": [{"picture": pic}], "category_id": 10},
                     True),
        "test product without category": ({"_id": 2, "imgs": [{"picture": JPEG_OK}]}, True),
        "extra field": ({"_id": 3, "imgs": [{"picture": JPEG_OK}], "category_id": 10,
                         "x": 1}, False),
        "string category": ({"_id": 4, "imgs": [{"picture": JPEG_OK}],
                             "category_id": "10"}, False),
        "unknown category": ({"_id": 5, "imgs": [{"picture": JPEG_OK}],
                              "category_id": 99}, False),
        "png": ({"_id": 6, "imgs": [{"picture": b"\x89PNG" + JPEG_OK}],
                 "category_id": 10}, False),
        "empty imgs": ({"_id": 7, "imgs": [], "category_id": 10}, False),
        "picture with a second field": ({"_id": 8, "imgs": [{"picture": JPEG_OK, "w": 1}],
                                         "category_id": 10}, False),
        "binary subtype 2": ({"_id": 9, "imgs": [{"picture": Binary(JPEG_OK, 2)}],
                              "category_id": 10}, False),
        "double id": ({"_id": 1.0, "imgs": [{"picture": JPEG_OK}], "category_id": 10},
                      False),
    }
    for name, (doc, fast) in cases.items():
        buf = bytearray(bson.encode(doc))
        for kind in ("train", "test"):
            want = fast and not (kind == "train" and "category_id" not in doc)
            assert _same_as_reference(buf, 0, len(buf), kind, TAX) is want, (name, kind)
    two_ids = bytearray(bson.encode({"_id": 1, "imgs": [{"picture": JPEG_OK}]}))
    two_ids[4:4] = b"\x10_id\x00" + struct.pack("<i", 2)  # a second _id the head hides
    struct.pack_into("<i", two_ids, 0, len(two_ids))
    assert not _same_as_reference(two_ids, 0, len(two_ids), "test", TAX)


def test_fast_path_agrees_with_the_reference_on_flipped_bytes(real_bson, real_categories):
    """Thousands of one-byte corruptions in the BSON structure (lengths, type bytes, keys,
    terminators, ids): whatever the fast path takes, bson.decode reads the same way."""
    import random

    tax = Taxonomy.from_csv(str(real_categories))
    good = real_bson.read_bytes()
    rng = random.Random(3)
    taken = tried = 0
    for off, n in _spans(good):
        doc = bytearray(good[off:off + n])
        picture_at = doc.find(b"\x05picture\x00")
        hot = list(range(0, min(n, 48))) + list(range(max(0, n - 32), n)) + \
            list(range(max(0, picture_at - 24), min(n, picture_at + 24)))
        for _ in range(40):
            bad = bytearray(doc)
            i = rng.choice(hot)
            bad[i] = rng.choice([0, 1, 2, 3, 4, 5, 0x10, 0x12, 0x30, 0x7F, 0xFF, bad[i] ^ 1])
            tried += 1
            taken += _same_as_reference(bad, 0, n, rng.choice(["train", "test"]), tax)
    assert tried == 40 * 82 and 0 < taken < tried


def test_the_offset_index_decides_when_the_duplicate_step_can_be_skipped():
    from hierarchy.ingest.duplicates import may_repeat_across_ranges
    from hierarchy.ingest.scan import NO_VALUE

    assert not may_repeat_across_ranges([1, 2, 3, 4], [2, 2])
    assert not may_repeat_across_ranges([1, 1, 3, 4], [2, 2])  # inside one range: the task's
    assert may_repeat_across_ranges([1, 2, 3, 1], [2, 2])
    assert may_repeat_across_ranges([1, NO_VALUE, 3, 4], [2, 2])  # an id the scan could not read
    assert not may_repeat_across_ranges([1, 1], [2])  # one range


def test_a_header_bomb_is_quarantined_by_its_declared_size_before_any_decode(real_bson):
    """A few hundred bytes that declare 65500 x 65500 pixels: the fast path leaves the
    document to the reference, which drops that picture alone, naming the size and the key;
    the real picture beside it is kept. Baseline, progressive and fill-byte headers are read."""
    import io

    from corrupt import declaring
    from PIL import Image

    from hierarchy.ingest.decode import frame_pixels
    from hierarchy.ingest.rawdoc import read_product

    real = bson.decode(split_docs(real_bson.read_bytes())[0])["imgs"][0]["picture"]
    assert frame_pixels(real) == 180 * 180
    for options in ({}, {"progressive": True}):
        out = io.BytesIO()
        Image.new("RGB", (300, 70)).save(out, "JPEG", **options)
        assert frame_pixels(out.getvalue()) == 300 * 70, options
    filled = real[:2] + b"\xff\xff" + real[2:]  # fill bytes before a marker are legal
    assert frame_pixels(filled) == 180 * 180
    assert frame_pixels(JPEG_OK) == 0 and frame_pixels(b"\xff\xd8") == 0

    bomb = declaring(real, 65500)
    doc = bytearray(bson.encode({"_id": 5, "imgs": [{"picture": bomb}, {"picture": real}],
                                 "category_id": 10}))
    assert read_product(doc, memoryview(doc), 0, len(doc), "train", TAX) is not None
    assert read_product(doc, memoryview(doc), 0, len(doc), "train", TAX, 25_000_000) is None
    out = decode_document(bytes(doc), source="d.bson", offset=0, kind="train", split="train",
                          taxonomy=TAX, max_pixels=25_000_000)
    assert [i["img_idx"] for i in out.images] == [1]
    (row,) = out.quarantine
    assert (row["reason"], row["img_idx"], row["level"]) == ("oversized_jpeg", 0, "image")
    assert "declares 4290250000 pixels; the limit is 25000000" in row["detail"]
