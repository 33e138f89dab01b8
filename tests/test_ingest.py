"""The ingest job end to end on local Spark: real sample, every kind of damage, re-runs."""

import json
import shutil

import bson
import pyarrow.parquet as pq
import pytest
from corrupt import catalogue_of_failures, split_docs

import hierarchy.petastorm_fix  # noqa: F401
from hierarchy.contracts.config import load_config
from hierarchy.contracts.dataset import Dataset, DatasetNotReady
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.ingest.pipeline import IngestError, run_ingest

pytestmark = pytest.mark.spark


def table(root, name, **filters):
    t = pq.read_table(root / name).to_pandas()
    for col, value in filters.items():
        t = t[t[col].astype(str) == value]
    return t


def images(root, columns=None):
    return pq.ParquetDataset(root / "images").read(columns=columns).to_pandas()


def ingest(spark, cfg, inputs, categories, out, kind="train", **overrides):
    if overrides:
        cfg = load_config(overrides=["spark.master=local[2]", "ingest.progress=false"]
                          + [f"ingest.{k}={v}" for k, v in overrides.items()])
    return run_ingest(spark, cfg, [str(i) for i in inputs], str(categories), str(out), kind)


def test_real_sample_bytes_and_labels_are_exact(spark, cfg, real_bson, real_categories,
                                                tmp_path):
    out = tmp_path / "ds"
    entry = ingest(spark, cfg, [real_bson], real_categories, out, split_mb=0.1)
    assert entry["tasks"] > 1  # really split into byte ranges
    assert (entry["counts"]["products"], entry["counts"]["images"]) == (82, 110)
    assert entry["counts"]["quarantine"] == {}

    tax = Taxonomy.from_csv(str(real_categories))
    source = {(d["_id"], i): (p["picture"], d["category_id"])
              for d in bson.decode_file_iter(open(real_bson, "rb"))
              for i, p in enumerate(d["imgs"])}
    got = images(out)
    assert len(got) == 110 and got[["product_id", "img_idx"]].duplicated().sum() == 0
    for row in got.itertuples():
        jpeg, category = source[(row.product_id, row.img_idx)]
        assert row.jpeg == jpeg  # byte for byte
        assert row.category_id == category
        assert (row.l1, row.l2, row.l3) == tax.levels_of_category(category)
        assert row.nbytes == len(jpeg)
    # a product's pictures never straddle splits
    assert got.groupby("product_id")["split"].nunique().max() == 1

    products = table(out, "products")
    assert len(products) == 82 and products["n_images"].sum() == 110
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kinds"]["train"]["status"] == "complete"
    assert manifest["taxonomy"]["fingerprint"] == tax.fingerprint
    assert sum(s["images"] for s in manifest["splits"].values()) == 110
    assert manifest["kinds"]["train"]["inputs"][0]["size"] == real_bson.stat().st_size
    assert not (out / "_staging").exists()


def test_petastorm_readers_see_the_dataset(spark, cfg, real_bson, real_categories, tmp_path):
    from petastorm import make_batch_reader, make_reader

    out = tmp_path / "ds"
    ingest(spark, cfg, [real_bson], real_categories, out)
    url = "file://" + str(out / "images")
    with make_reader(url, num_epochs=1, workers_count=1,
                     schema_fields=["product_id", "jpeg", "l1", "split"]) as reader:
        rows = list(reader)
    assert len(rows) == 110 and bytes(rows[0].jpeg).startswith(b"\xff\xd8\xff")
    with make_batch_reader(url, num_epochs=1, workers_count=1, schema_fields=["product_id"],
                           filters=[("split", "=", "val")]) as reader:
        n_val = sum(len(b.product_id) for b in reader)
    manifest = json.loads((out / "manifest.json").read_text())
    assert n_val == manifest["splits"]["val"]["images"] > 0
    # petastorm 0.13.1's thread pool could end a one-pass read of a few row groups with no
    # rows (about 1 run in 7 here); hierarchy.petastorm_fix closes that race
    counts = []
    for _ in range(40):
        with make_batch_reader(url, num_epochs=1, workers_count=1,
                               schema_fields=["product_id"]) as reader:
            counts.append(sum(len(b.product_id) for b in reader))
    assert counts == [110] * 40


def test_every_kind_of_damage_is_quarantined_and_good_data_kept(
        spark, cfg, real_bson, real_categories, tmp_path):
    docs = split_docs(real_bson.read_bytes())
    data, expected = catalogue_of_failures(docs, 1000010653)
    bad = tmp_path / "bad.bson"
    bad.write_bytes(data)
    out = tmp_path / "ds"
    entry = ingest(spark, cfg, [bad], real_categories, out, max_bad_fraction=1.0, split_mb=0.02)

    good_ids = {bson.decode(docs[i])["_id"] for i in (0, 1, 2, 4, 6, 7)} | {900002, 900005}
    products = table(out, "products")
    assert set(products["product_id"]) == good_ids
    got = images(out, ["product_id", "img_idx"])
    good_images = sum(len(bson.decode(docs[i])["imgs"]) for i in (0, 1, 2, 4, 6, 7)) + 2
    assert len(got) == good_images
    assert got[got.product_id == 900002]["img_idx"].tolist() == [1]
    # the header bomb never reached the dataset; the real picture beside it did
    assert got[got.product_id == 900005]["img_idx"].tolist() == [1]

    q = table(out, "quarantine")
    counts = q["reason"].value_counts().to_dict()
    assert counts == expected
    assert entry["counts"]["quarantine"] == expected
    assert (q["source"] == str(bad)).all()
    # every quarantined piece says where it is and why
    assert q["offset"].ge(0).all() and q["detail"].str.len().gt(10).all()
    row = q[q.reason == "not_jpeg"].iloc[0]
    assert (row.product_id, row.img_idx, row.level) == (900002, 0, "image")
    row = q[q.reason == "oversized_jpeg"].iloc[0]
    assert (row.product_id, row.img_idx, row.level) == (900005, 0, "image")
    assert "declares 4290250000 pixels" in row.detail and "ingest.max_picture_pixels" in \
        row.detail
    region = q[q.reason == "garbage"].iloc[0]
    assert region.offset == len(docs[0]) + len(docs[1]) and region.length == 100


def test_above_the_bad_fraction_nothing_is_committed(spark, cfg, real_bson, real_categories,
                                                     tmp_path):
    docs = split_docs(real_bson.read_bytes())
    data, _ = catalogue_of_failures(docs, 1000010653)
    bad = tmp_path / "bad.bson"
    bad.write_bytes(data)
    out = tmp_path / "ds"
    with pytest.raises(IngestError, match=r"above ingest.max_bad_fraction=0.01 .*quarantine is "
                                          r"in .*_staging"):
        ingest(spark, cfg, [bad], real_categories, out)
    assert not (out / "images").exists() and not (out / "manifest.json").exists()
    with pytest.raises(DatasetNotReady, match="no manifest.json"):
        Dataset(str(out)).require_complete(["train"])


def test_rerun_gives_the_same_rows_and_test_kind_adds_its_split(
        spark, cfg, real_bson, real_categories, tmp_path):
    out = tmp_path / "ds"
    ingest(spark, cfg, [real_bson], real_categories, out)
    first = images(out, ["product_id", "img_idx", "md5", "split"]).sort_values(
        ["product_id", "img_idx"]).reset_index(drop=True)
    # the test kind: same documents without labels, into the same folder
    test_file = tmp_path / "test.bson"
    test_file.write_bytes(b"".join(
        bson.encode({"_id": d["_id"] + 10_000, "imgs": d["imgs"]})
        for d in bson.decode_file_iter(open(real_bson, "rb"))))
    ingest(spark, cfg, [test_file], real_categories, out, kind="test")
    ingest(spark, cfg, [real_bson], real_categories, out)  # re-run train over its own output

    again = images(out, ["product_id", "img_idx", "md5", "split"])
    train_again = again[again.split != "test"].sort_values(
        ["product_id", "img_idx"]).reset_index(drop=True)
    assert train_again.astype(str).equals(first.astype(str))
    test_rows = again[again.split == "test"]
    assert len(test_rows) == 110 and test_rows["product_id"].min() >= 10_000
    products = pq.read_table(out / "products").to_pandas()
    assert products["kind"].astype(str).value_counts().to_dict() == {"train": 82, "test": 82}
    assert products["category_id"][products.kind.astype(str) == "test"].isna().all()
    manifest = Dataset(str(out)).require_complete(["train", "test"])
    assert manifest.split("test").to_json() == {"products": 82, "images": 110,
                                                "images_per_l1": {}}
    train_split = manifest.split("train")
    assert sum(train_split.images_per_l1.values()) == train_split.images


def test_a_different_taxonomy_is_refused(spark, cfg, real_bson, real_categories, tmp_path):
    out = tmp_path / "ds"
    ingest(spark, cfg, [real_bson], real_categories, out)
    other = tmp_path / "other.csv"
    shutil.copy(real_categories, other)
    with open(other, "a") as fh:
        fh.write("1,NEW,NEW,NEW\n")
    with pytest.raises(IngestError, match="is not the taxonomy this dataset was ingested with"):
        ingest(spark, cfg, [real_bson], other, out)


def test_interrupted_commit_is_not_mistaken_for_complete(spark, cfg, real_bson,
                                                         real_categories, tmp_path,
                                                         monkeypatch):
    from hierarchy.contracts import dataset

    out = tmp_path / "ds"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed during commit")

    monkeypatch.setattr(dataset, "write_metadata", crash)
    with pytest.raises(KeyboardInterrupt):
        ingest(spark, cfg, [real_bson], real_categories, out)
    with pytest.raises(DatasetNotReady, match="the train ingest is committing, not complete"):
        Dataset(str(out)).require_complete(["train"])
    monkeypatch.undo()
    ingest(spark, cfg, [real_bson], real_categories, out)  # a re-run repairs it
    assert Dataset(str(out)).require_complete(["train"]).images("train") > 0
    assert len(images(out, ["product_id"])) == 110


def test_synthetic_catalog_round_trips_through_ingest(spark, cfg, tmp_path):
    from hierarchy.synth import generate

    syn = tmp_path / "syn"
    stats = generate(str(syn), products=120, seed=3, taxonomy="small", test_products=30,
                     workers=1, progress=False)
    out = tmp_path / "ds"
    cats = syn / "category_names.csv"
    train = ingest(spark, cfg, [syn / "train.bson"], cats, out, split_mb=0.2)
    test = ingest(spark, cfg, [syn / "test.bson"], cats, out, kind="test")
    assert train["counts"]["products"] == stats["products"]["train"] == 120
    assert test["counts"]["products"] == stats["products"]["test"] == 30
    assert train["counts"]["images"] + test["counts"]["images"] == sum(stats["images"].values())
    assert train["counts"]["quarantine"] == {} and test["counts"]["quarantine"] == {}
    got = images(out, ["product_id", "img_idx", "md5", "split"])
    import hashlib

    want = {(d["_id"], i): hashlib.md5(p["picture"]).hexdigest()
            for f in ("train.bson", "test.bson")
            for d in bson.decode_file_iter(open(syn / f, "rb"))
            for i, p in enumerate(d["imgs"])}
    assert {(r.product_id, r.img_idx): r.md5 for r in got.itertuples()} == want
    assert set(got["split"].astype(str)) == {"train", "val", "test"}


def test_a_second_ingest_into_a_busy_folder_is_refused_and_a_dead_ones_lock_taken_over(
        spark, cfg, real_bson, real_categories, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from hierarchy.contracts.dataset import LOCK_FILE
    from hierarchy.ingest.lock import OutputLocked

    out = tmp_path / "ds"
    out.mkdir()
    lock = out / LOCK_FILE
    live = {"host": socket.gethostname(), "pid": os.getpid(), "kind": "test", "since": 0}
    lock.write_text(json.dumps(live))
    with pytest.raises(OutputLocked, match=f"pid {os.getpid()}"):
        ingest(spark, cfg, [real_bson], real_categories, out)
    assert not (out / "manifest.json").exists() and lock.exists()  # nothing touched

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    lock.write_text(json.dumps({**live, "pid": int(gone)}))  # its process has ended
    entry = ingest(spark, cfg, [real_bson], real_categories, out)
    assert entry["counts"]["products"] == 82
    assert not lock.exists()  # released when the job ended


def test_fast_decoder_writes_the_reference_dataset(spark, cfg, real_bson, real_categories,
                                                   tmp_path):
    """ingest.raw_decoder=true (documents read in place) and false (bson.decode of each, the
    reference) give the same images, products and quarantine on a damaged dump; the
    Petastorm row-group index written from the writers' counts matches the footers."""
    from fuzz import mutate

    from hierarchy.contracts.schema import read_row_groups

    dump = tmp_path / "fuzzed.bson"
    dump.write_bytes(real_bson.read_bytes() + mutate(real_bson.read_bytes(), 5, 6).bytes())
    outs = {}
    for raw in ("true", "false"):
        outs[raw] = tmp_path / f"ds-{raw}"
        ingest(spark, cfg, [dump], real_categories, outs[raw], raw_decoder=raw, split_mb=0.2,
               max_bad_fraction=1.0)

    def tables(root):
        key = ["product_id", "img_idx"]
        q = table(root, "quarantine")
        return (images(root).sort_values(key).reset_index(drop=True),
                table(root, "products").sort_values("product_id").reset_index(drop=True),
                q.sort_values(["offset", "level", "reason"]).reset_index(drop=True))

    fast, ref = tables(outs["true"]), tables(outs["false"])
    assert len(fast[0]) > 100 and len(fast[2]) > 0  # pictures kept and damage quarantined
    for a, b in zip(fast, ref):
        assert a.equals(b)
    index = read_row_groups(str(outs["true"] / "images"))
    files = sorted((outs["true"] / "images").glob("split=*/*.parquet"))
    assert len(files) > 2 and index == {
        str(f.relative_to(outs["true"] / "images")): pq.read_metadata(f).num_row_groups
        for f in files}
