"""``ingest --append`` and ``compact`` on local Spark: a day's dump becomes a new snapshot."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import bson
import pyarrow.parquet as pq
import pytest

import hierarchy.petastorm_fix  # noqa: F401
from hierarchy.contracts.config import load_config
from hierarchy.contracts.dataset import Dataset, DatasetNotReady
from hierarchy.ingest.pipeline import IngestError, run_compact, run_ingest

pytestmark = pytest.mark.spark

NEW_IDS = 10_000_000


def docs(path):
    with open(path, "rb") as fh:
        return list(bson.decode_file_iter(fh))


def day_dump(base: Path, other: Path, out: Path, new: int, resent: int, same: int,
             extra: bytes = b"") -> dict:
    """A day's dump: ``new`` products of another catalog under new ids, ``resent`` products
    of the base sent again with other pictures, ``same`` sent again byte for byte."""
    b, o = docs(base), docs(other)
    fresh = [{**d, "_id": d["_id"] + NEW_IDS} for d in o[:new]]
    changed = [{**d, "imgs": o[new + i]["imgs"]} for i, d in enumerate(b[:resent])]
    unchanged = b[resent:resent + same]
    out.write_bytes(b"".join(bson.encode(d) for d in fresh + changed + unchanged) + extra)
    return {"new": {d["_id"] for d in fresh}, "changed": {d["_id"]: d for d in changed},
            "unchanged": {d["_id"] for d in unchanged}}


def config(**ingest):
    return load_config(overrides=["spark.master=local[2]", "ingest.progress=false"]
                       + [f"ingest.{k}={v}" for k, v in ingest.items()])


def ingest(spark, inputs, cats, out, append=False, kind="train", **overrides):
    return run_ingest(spark, config(**overrides), [str(i) for i in inputs], str(cats), str(out),
                      kind, append=append)


def pictures(out):
    """{(product_id, img_idx): md5} of every picture row, and the row count (a duplicate row
    would make them differ)."""
    t = pq.ParquetDataset(str(out / "images")).read(
        columns=["product_id", "img_idx", "md5"]).to_pandas()
    return {(int(r.product_id), int(r.img_idx)): r.md5 for r in t.itertuples()}, len(t)


def products(out, kind="train"):
    t = pq.read_table(out / "products" / f"kind={kind}").to_pandas()
    return t


def catalogs(tmp_path):
    """(base, other): 120 products of one catalog, and 60 more of the same taxonomy."""
    from hierarchy.synth import generate

    generate(str(tmp_path / "syn"), products=180, seed=3, taxonomy="small", test_products=10,
             workers=1, progress=False)
    every = docs(tmp_path / "syn" / "train.bson")
    for name, part in (("base", every[:120]), ("other", every[120:])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.bson").write_bytes(b"".join(bson.encode(d) for d in part))
        (tmp_path / name / "category_names.csv").write_bytes(
            (tmp_path / "syn" / "category_names.csv").read_bytes())
    return tmp_path / "base", tmp_path / "other"


def counted(out, kind="train"):
    """The manifest's counts held against the rows actually there."""
    manifest = Dataset(str(out)).require_complete([kind])  # every listed part whole
    prods = products(out, kind)
    for split in ("train", "val") if kind == "train" else ("test",):
        rows = pq.ParquetDataset(str(out / "images" / f"split={split}")).read(
            columns=["l1"]).to_pandas()
        c = manifest.split(split)
        assert c.images == len(rows), split
        assert c.products == int((prods.split == split).sum()), split
        by_l1 = {str(k): int(v) for k, v in rows.l1.value_counts().items()}
        if kind == "train":
            assert c.images_per_l1 == by_l1, split
    return manifest


def test_append_adds_new_replaces_resent_and_twice_changes_nothing(spark, tmp_path):
    base, other = catalogs(tmp_path)
    cats = base / "category_names.csv"
    out = tmp_path / "ds"
    ingest(spark, [base / "train.bson"], cats, out, split_mb=0.2)
    before, _ = pictures(out)
    day = day_dump(base / "train.bson", other / "train.bson", tmp_path / "day1.bson",
                   new=20, resent=6, same=5)

    entry = ingest(spark, [tmp_path / "day1.bson"], cats, out, append=True)
    a = entry["append"]
    assert (a["added"], a["replaced"], a["unchanged"], a["committed"], a["snapshot"]) == \
        (20, 6, 5, True, 1)
    after, rows = pictures(out)
    assert rows == len(after)  # one row per picture: no product's rows twice
    want = dict(before)
    for pid, d in day["changed"].items():
        for key in [k for k in want if k[0] == pid]:
            del want[key]
        import hashlib

        want.update({(pid, i): hashlib.md5(p["picture"]).hexdigest()
                     for i, p in enumerate(d["imgs"])})
    new = {k: v for k, v in after.items() if k[0] in day["new"]}
    assert {k[0] for k in new} == day["new"]
    assert {k: v for k, v in after.items() if k[0] not in day["new"]} == want
    prods = products(out)
    assert len(prods) == 140 and prods.product_id.is_unique
    manifest = counted(out)
    assert manifest.kinds["train"].snapshot == 1
    assert [s["snapshot"] for s in manifest.kinds["train"].snapshots] == [1]
    # a re-sent product keeps its split: the split is the product id's, whatever the night
    first = products(out).set_index("product_id").split
    assert all(first[p] in ("train", "val") for p in day["changed"])

    # the same dump again: nothing to commit, not a byte of the dataset changes
    manifest_bytes = (out / "manifest.json").read_bytes()
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    again = ingest(spark, [tmp_path / "day1.bson"], cats, out, append=True)["append"]
    assert (again["added"], again["replaced"], again["unchanged"], again["committed"]) == \
        (0, 0, 31, False)
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == listing


def test_a_killed_commit_is_refused_to_readers_and_rolled_forward_by_the_next_append(
        spark, tmp_path, monkeypatch):
    from hierarchy.contracts import dataset as dataset_module

    base, other = catalogs(tmp_path)
    cats = base / "category_names.csv"
    out = tmp_path / "ds"
    ingest(spark, [base / "train.bson"], cats, out, split_mb=0.2)
    day_dump(base / "train.bson", other / "train.bson", tmp_path / "day.bson",
             new=10, resent=4, same=0)
    real_move, moved = dataset_module.storage.move, []

    def killed_after_two(src, dst):
        if len(moved) == 2:
            raise KeyboardInterrupt("killed during the commit")
        moved.append(dst)
        real_move(src, dst)

    monkeypatch.setattr(dataset_module.storage, "move", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        ingest(spark, [tmp_path / "day.bson"], cats, out, append=True)
    monkeypatch.undo()
    with pytest.raises(DatasetNotReady, match="append or compaction of the train kind is "
                                              "committing"):
        Dataset(str(out)).require_complete(["train"])
    from hierarchy.curate.pipeline import check_curate

    with pytest.raises(DatasetNotReady, match="committing"):  # not curated without the kind
        check_curate(config(), str(out))
    # `hierarchy compact`, which the refusal names, finishes it (here with nothing to merge)
    done = subprocess.run([sys.executable, "-m", "hierarchy.cli", "compact", "--data", str(out),
                           "spark.master=local[2]", "ingest.compact_small_mb=0.0001"],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compact train: nothing to merge" in done.stdout
    assert Dataset(str(out)).require_complete(["train"]).kinds["train"].snapshot == 1
    # the next append (here the same dump, re-run) has nothing to add
    again = ingest(spark, [tmp_path / "day.bson"], cats, out, append=True)["append"]
    assert (again["added"], again["replaced"], again["committed"]) == (0, 0, False)
    got, rows = pictures(out)
    assert rows == len(got) and len(products(out)) == 130
    assert counted(out).kinds["train"].snapshot == 1
    assert not (out / "_staging").exists()


def test_kill_9_during_an_append_leaves_the_snapshot_and_the_rerun_completes(
        spark, tmp_path):
    base, other = catalogs(tmp_path)
    cats = base / "category_names.csv"
    out = tmp_path / "ds"
    ingest(spark, [base / "train.bson"], cats, out, split_mb=0.2)
    before = pictures(out)
    manifest_bytes = (out / "manifest.json").read_bytes()
    day_dump(base / "train.bson", other / "train.bson", tmp_path / "day.bson",
             new=30, resent=5, same=5)
    cmd = [sys.executable, "-m", "hierarchy.cli", "ingest", "--append", "--input",
           str(tmp_path / "day.bson"), "--categories", str(cats), "--output", str(out),
           "spark.master=local[2]", "ingest.split_mb=0.05"]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True, cwd=Path(__file__).parent.parent)
    deadline = time.time() + 120
    while not list((out / "_staging").glob("train-*")) and time.time() < deadline:
        assert job.poll() is None, "the append ended before it staged anything"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and its JVM, mid-append
    job.wait()
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    counted(out)  # the snapshot before: whole, readable
    assert pictures(out) == before
    # the rerun takes over the dead job's lock and completes
    entry = ingest(spark, [tmp_path / "day.bson"], cats, out, append=True)
    assert (entry["append"]["added"], entry["append"]["replaced"]) == (30, 5)
    assert len(products(out)) == 150
    counted(out)


def test_bad_appends_commit_nothing_and_a_few_bad_documents_are_quarantined(spark, tmp_path):
    base, other = catalogs(tmp_path)
    cats = base / "category_names.csv"
    out = tmp_path / "ds"
    ingest(spark, [base / "train.bson"], cats, out, split_mb=0.2)
    manifest_bytes = (out / "manifest.json").read_bytes()
    before = pictures(out)
    bad = bson.encode({"_id": 77, "imgs": [{"picture": b"not a jpeg"}], "category_id": 1})
    # another taxonomy: refused before any work
    other_cats = tmp_path / "other.csv"
    other_cats.write_text(cats.read_text() + "1,NEW,NEW,NEW\n")
    day_dump(base / "train.bson", other / "train.bson", tmp_path / "day.bson",
             new=10, resent=2, same=0, extra=bad * 3)
    with pytest.raises(IngestError, match="is not the taxonomy this dataset was ingested with"):
        ingest(spark, [tmp_path / "day.bson"], other_cats, out, append=True)
    # too many bad documents: nothing committed
    with pytest.raises(IngestError, match="above ingest.max_bad_fraction=0.1"):
        ingest(spark, [tmp_path / "day.bson"], cats, out, append=True, max_bad_fraction=0.1)
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    assert pictures(out) == before
    # a few: the good ones are appended, the bad quarantined beside the snapshot's
    entry = ingest(spark, [tmp_path / "day.bson"], cats, out, append=True,
                   max_bad_fraction=0.3)
    assert (entry["append"]["added"], entry["append"]["replaced"]) == (10, 2)
    assert entry["append"]["quarantined"] == 3
    q = pq.read_table(out / "quarantine" / "kind=train").to_pandas()
    assert (q.source == str(tmp_path / "day.bson")).sum() == 3
    assert any(p.name.startswith("part-a0001-") for p in (out / "quarantine" / "kind=train")
               .iterdir())
    counted(out)


def test_compaction_keeps_every_row_and_runs_by_itself_past_the_threshold(spark, tmp_path):
    from petastorm import make_batch_reader

    base, other = catalogs(tmp_path)
    cats = base / "category_names.csv"
    out = tmp_path / "ds"
    ingest(spark, [base / "train.bson"], cats, out, split_mb=0.2)
    o = docs(other / "train.bson")
    for night in range(3):
        night_docs = [{**d, "_id": d["_id"] + NEW_IDS * (night + 1)}
                      for d in o[night * 15:(night + 1) * 15]]
        (tmp_path / f"n{night}.bson").write_bytes(b"".join(bson.encode(d) for d in night_docs))
        ingest(spark, [tmp_path / f"n{night}.bson"], cats, out, append=True, split_mb=0.05,
               compact_after=1000)
    before, rows = pictures(out)
    files_before = len(list((out / "images").rglob("*.parquet")))
    # on demand
    cfg = config(compact_small_mb=64)
    record = run_compact(spark, cfg, str(out), ["train"])["train"]
    assert record["compacted"] > record["into"] >= 1
    after, rows_after = pictures(out)
    assert after == before and rows_after == rows
    assert len(list((out / "images").rglob("*.parquet"))) < files_before
    manifest = counted(out)
    assert manifest.kinds["train"].snapshot == 4
    with make_batch_reader(Dataset(str(out)).url("images"), schema_fields=["product_id"],
                           num_epochs=1) as reader:
        assert sum(len(b.product_id) for b in reader) == rows  # Petastorm's index agrees
    # by itself: an append past compact_after small parts compacts what it left
    night_docs = [{**d, "_id": d["_id"] + NEW_IDS * 9} for d in o[45:60]]
    (tmp_path / "n9.bson").write_bytes(b"".join(bson.encode(d) for d in night_docs))
    entry = ingest(spark, [tmp_path / "n9.bson"], cats, out, append=True, split_mb=0.05,
                   compact_after=1, compact_small_mb=64)
    assert entry["compaction"]["compacted"] >= 2
    assert len(pictures(out)[0]) == rows + sum(len(d["imgs"]) for d in night_docs)
    counted(out)
