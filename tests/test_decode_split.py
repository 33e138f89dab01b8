import bson
import numpy as np
from corrupt import JPEG_OK

from hierarchy.ingest.decode import decode_document, iter_documents, jpeg_problem
from hierarchy.ingest.split import TRAIN, VAL, assign_splits
from hierarchy.taxonomy import Taxonomy

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
    a = assign_splits(pids, cats, "train", 0.5, seed=3)
    b = assign_splits(pids[::-1], cats[::-1], "train", 0.5, seed=3)[::-1]
    assert np.array_equal(a, b)  # independent of order and partitioning
    assert 0.46 < (a == VAL).mean() < 0.5
    for c in np.unique(cats):
        assert (a[cats == c] == TRAIN).any()
    assert not np.array_equal(a, assign_splits(pids, cats, "train", 0.5, seed=4))
    # duplicate product ids never straddle splits
    dup = assign_splits(np.array([5, 5, 6]), np.array([1, 2, 1]), "train", 0.99, 1)
    assert dup[0] == dup[1]
    assert (assign_splits(pids, cats, "test", 0.5, 3) == 2).all()
