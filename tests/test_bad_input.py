"""One bad document must never cost the rest: the fuzzing campaign's findings, one test each,
and a seeded fuzzer over the real sample.

1. a numeric-string category_id crashed the whole ingest;
2. duplicate _ids were kept silently (and predict failed at the very end, naming nothing);
3. a float category_id was truncated to an integer category;
4. an empty dump committed a "complete" empty dataset, and train on it ended in a traceback;
5. tracebacks where one line belongs (missing --categories, --output a file, a read-only
   folder, synth --products -5 / 0);
6. exit codes: a missing or directory input gave 3, which is for refusals.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bson
import pyarrow.parquet as pq
import pytest
from bson.int64 import Int64
from corrupt import JPEG_OK, split_docs

import hierarchy.petastorm_fix  # noqa: F401
from hierarchy.cli import main
from hierarchy.contracts.config import load_config
from hierarchy.contracts.dataset import DatasetNotReady
from hierarchy.contracts.errors import Refused
from hierarchy.contracts.modelstore import RunMismatch
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.infer.modelset import ScoringRefused
from hierarchy.ingest.decode import decode_document
from hierarchy.ingest.lock import OutputLocked
from hierarchy.ingest.pipeline import IngestError, run_ingest
from hierarchy.train.data import EmptySplitError
from hierarchy.train.launch import TrainError
from hierarchy.train.models import WeightsUnavailable

BIN = Path(sys.executable).parent
CAT = 1000010653  # a real category of the sample's table
TAX = Taxonomy.from_rows([(10, "A", "A1", "x"), (20, "A", "A2", "y"), (30, "B", "B1", "z")])


def decode(doc, kind="train", raw=None):
    raw = raw if raw is not None else bson.encode(doc)
    return decode_document(raw, source="f.bson", offset=100, kind=kind, split=kind,
                           taxonomy=TAX)


def reasons(out):
    return [(q["level"], q["reason"]) for q in out.quarantine]


# ------------------------------------------------------------------ decode: types, not coercion
@pytest.mark.parametrize("value", ["10", 10.0, 10.5, True, None, [10], {"id": 10}, b"10"])
def test_category_id_of_another_bson_type_is_quarantined_not_coerced(value):
    out = decode({"_id": 1, "imgs": [{"picture": JPEG_OK}], "category_id": value})
    assert out.product is None and not out.images
    assert reasons(out) == [("document", "bad_category")]
    assert "not an int32/int64" in out.quarantine[0]["detail"]


def test_int32_and_int64_category_ids_are_both_categories():
    for value in (30, Int64(30)):
        out = decode({"_id": 1, "imgs": [{"picture": JPEG_OK}], "category_id": value})
        assert out.product["category_id"] == 30 and out.product["l3"] == 2
        assert type(out.images[0]["category_id"]) is int
    out = decode({"_id": 1, "imgs": [{"picture": JPEG_OK}], "category_id": 99})
    assert reasons(out) == [("document", "unknown_category")]


@pytest.mark.parametrize("value", ["7", 7.0, True, None, [7], b"\x07"])
def test_id_of_another_bson_type_is_quarantined(value):
    out = decode({"_id": value, "imgs": [{"picture": JPEG_OK}], "category_id": 10})
    assert out.product is None and reasons(out) == [("document", "bad_id")]


def test_int64_id_is_kept_and_a_second_id_field_is_refused():
    out = decode({"_id": Int64(2**40), "imgs": [{"picture": JPEG_OK}], "category_id": 10})
    assert out.product["product_id"] == 2**40
    # two _id fields: the offset index read the first, bson keeps the last
    raw = bytearray(bson.encode({"_id": 5, "imgs": [{"picture": JPEG_OK}], "_iX": 6,
                                 "category_id": 10}))
    raw[raw.index(b"_iX")+2] = ord("d")
    out = decode(None, raw=bytes(raw))
    assert reasons(out) == [("document", "bad_id")] and "two _id fields" in \
        out.quarantine[0]["detail"]
    assert reasons(decode({"imgs": [{"picture": JPEG_OK}], "category_id": 10})) == \
        [("document", "missing_id")]


def test_imgs_and_picture_fields_are_checked_for_their_type():
    out = decode({"_id": 1, "imgs": "not an array", "category_id": 10})
    assert reasons(out) == [("document", "bad_imgs")]
    out = decode({"_id": 1, "imgs": [{"picture": JPEG_OK}, "a string", {"picture": "text"},
                                     {"photo": JPEG_OK}], "category_id": 10})
    assert out.product["n_images"] == 1
    assert reasons(out) == [("image", "bad_image_entry"), ("image", "bad_picture_field"),
                            ("image", "bad_picture_field")]


def test_a_test_product_keeps_its_row_and_drops_an_unusable_label_loudly():
    for value, reason in (("30", "bad_category"), (30.5, "bad_category"),
                          (99, "unknown_category")):
        out = decode({"_id": 1, "imgs": [{"picture": JPEG_OK}], "category_id": value},
                     kind="test")
        assert out.product["category_id"] is None and out.images[0]["category_id"] is None
        assert reasons(out) == [("product", reason)]
    out = decode({"_id": 1, "imgs": [{"picture": JPEG_OK}], "category_id": 30}, kind="test")
    assert out.product["category_id"] == 30 and out.quarantine == []


# ------------------------------------------------------------------ real ingests
def ingest(spark, inputs, categories, out, kind="train", **over):
    cfg = load_config(overrides=["spark.master=local[2]", "ingest.progress=false"]
                      + [f"ingest.{k}={v}" for k, v in over.items()])
    return run_ingest(spark, cfg, [str(i) for i in inputs], str(categories), str(out), kind)


def read(root, name):
    return pq.read_table(root / name).to_pandas()


def accounted_bytes(root, source, size):
    """Products and unused documents/regions tile the input exactly: no byte twice, none
    missing. Returns the number of intervals."""
    products = read(root, "products")
    q = read(root, "quarantine")
    spans = [(r.offset, r.length) for r in products[products.source == source].itertuples()]
    spans += [(r.offset, r.length) for r in q[(q.source == source)
                                              & q.level.isin(["region", "document"])]
              .itertuples()]
    spans.sort()
    pos = 0
    for offset, length in spans:
        assert offset == pos, f"{source}: bytes {pos}..{offset} unaccounted or counted twice"
        pos = offset + length
    assert pos == size, f"{source}: bytes {pos}..{size} unaccounted"
    return len(spans)


@pytest.mark.spark
def test_string_and_float_category_ids_cost_only_their_own_documents(
        spark, real_bson, real_categories, tmp_path):
    data = real_bson.read_bytes()
    extra = [bson.encode({"_id": 900001, "imgs": [{"picture": JPEG_OK}],
                          "category_id": str(CAT)}),
             bson.encode({"_id": 900002, "imgs": [{"picture": JPEG_OK}],
                          "category_id": CAT + 0.5})]
    dump = tmp_path / "train.bson"
    dump.write_bytes(data + b"".join(extra))
    out = tmp_path / "ds"
    entry = ingest(spark, [dump], real_categories, out, max_bad_fraction=0.05, split_mb=0.1)
    assert entry["counts"]["products"] == 82
    assert entry["counts"]["quarantine"] == {"bad_category": 2}
    q = read(out, "quarantine")
    assert sorted(q.product_id) == [900001, 900002] and set(q.level) == {"document"}
    assert accounted_bytes(out, str(dump), dump.stat().st_size) == 84
    # the same documents in a test dump: kept (the submission needs them), label dropped
    test = tmp_path / "test.bson"
    test.write_bytes(b"".join(extra))
    entry = ingest(spark, [test], real_categories, out, kind="test")
    products = read(out, "products")
    kept = products[products.kind.astype(str) == "test"]
    assert sorted(kept.product_id) == [900001, 900002] and kept.category_id.isna().all()


@pytest.mark.spark
def test_duplicate_ids_keep_the_first_usable_occurrence_across_ranges_and_files(
        spark, real_bson, real_categories, tmp_path):
    docs = split_docs(real_bson.read_bytes())
    ids = [bson.decode(d)["_id"] for d in docs]
    # file A: the sample, then (far from the originals, in other byte ranges) copies of
    # documents 3 and 5, and an unusable document 900 followed by a usable one
    unusable = bson.encode({"_id": 900, "imgs": [], "category_id": CAT})
    usable = bson.encode({"_id": 900, "imgs": [{"picture": JPEG_OK}], "category_id": CAT})
    a = tmp_path / "a.bson"
    a_parts = docs + [docs[3], unusable, usable, docs[5]]
    a.write_bytes(b"".join(a_parts))
    # file B: copies of documents 0 and 1 (another file of the same kind), one new product
    b = tmp_path / "b.bson"
    b.write_bytes(docs[0] + bson.encode({"_id": 901, "imgs": [{"picture": JPEG_OK}],
                                         "category_id": CAT}) + docs[1])
    out = tmp_path / "ds"
    entry = ingest(spark, [a, b], real_categories, out, split_mb=0.05, max_bad_fraction=0.1)
    assert entry["tasks"] > 4

    offsets_a = [sum(len(p) for p in a_parts[:i]) for i in range(len(a_parts))]
    products = read(out, "products")
    assert not products.product_id.duplicated().any()
    assert set(products.product_id) == set(ids) | {900, 901}
    first = products.set_index("product_id")
    for i in (0, 1, 3, 5):  # the originals are kept, in file A at their first offset
        assert (first.loc[ids[i], "source"], first.loc[ids[i], "offset"]) == (str(a),
                                                                              offsets_a[i])
    assert first.loc[900, "offset"] == offsets_a[84]  # the usable one, not the first

    q = read(out, "quarantine")
    dups = q[q.reason == "duplicate_id"].sort_values(["source", "offset"])
    assert list(zip(dups.source, dups.product_id)) == [
        (str(a), ids[3]), (str(a), ids[5]), (str(b), ids[0]), (str(b), ids[1])]
    assert f"offset {offsets_a[3]}" in dups.iloc[0].detail
    assert f"offset {offsets_a[0]} of {a}" in dups.iloc[2].detail
    assert entry["counts"]["quarantine"] == {"duplicate_id": 4, "no_pictures": 1}

    images = pq.ParquetDataset(out / "images").read(
        columns=["product_id", "img_idx"]).to_pandas()
    assert not images.duplicated().any()
    assert len(images) == entry["counts"]["images"] == products.n_images.sum()
    per_split = entry["counts"]["per_split"]
    assert sum(s["products"] for s in per_split.values()) == len(products)
    for path, size in ((a, a.stat().st_size), (b, b.stat().st_size)):
        accounted_bytes(out, str(path), size)
    # re-running over its own output gives the same rows
    ingest(spark, [a, b], real_categories, out, split_mb=0.05, max_bad_fraction=0.1)
    again = read(out, "products")
    assert sorted(again.product_id) == sorted(products.product_id)


@pytest.mark.spark
def test_an_input_without_a_usable_document_is_refused(spark, real_bson, real_categories,
                                                       tmp_path):
    from fuzz import junk_file

    empty = tmp_path / "empty.bson"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.bson"
    junk.write_bytes(junk_file(3, 20_000))
    out = tmp_path / "ds"
    with pytest.raises(IngestError, match=r"empty.bson: empty file \(0 bytes\)"):
        ingest(spark, [empty], real_categories, out, max_bad_fraction=1.0)
    with pytest.raises(IngestError, match=r"junk.bson: no usable document in 20,000 bytes "
                                          r"\(garbage: 1\)"):
        ingest(spark, [junk], real_categories, out, max_bad_fraction=1.0)
    # one empty file among good ones is refused too: it is the wrong file or a broken copy
    with pytest.raises(IngestError, match="junk.bson: no usable document"):
        ingest(spark, [real_bson, junk], real_categories, out, max_bad_fraction=1.0)
    assert not (out / "manifest.json").exists() and not (out / "images").exists()


def test_an_empty_dump_exits_3_before_spark_starts(real_categories, tmp_path, capsys,
                                                   no_spark):
    empty = tmp_path / "empty.bson"
    empty.write_bytes(b"")
    rc = main(["ingest", "--input", str(empty), "--categories", str(real_categories),
               "--output", str(tmp_path / "ds")])
    assert rc == 3
    assert capsys.readouterr().err.strip().splitlines() == [
        f"hierarchy ingest: error: input {empty}: empty file (0 bytes), no document to ingest"]


def test_train_on_an_empty_split_exits_3_with_a_message(tmp_path, capsys, no_spark):
    # what an ingest of an empty dump used to commit: a "complete" dataset with no rows
    data = tmp_path / "ds"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({
        "format": "hierarchy-dataset/1", "kinds": {"train": {"status": "complete"}},
        "taxonomy": {"fingerprint": TAX.fingerprint, "level1": 2, "level2": 3, "level3": 3},
        "splits": {}}))
    (data / "taxonomy.json").write_text(TAX.to_json())
    for mode in (["--level", "1"], ["--level", "3", "--mode", "flat"]):
        rc = main(["train", "--data", str(data), "--models", str(tmp_path / "m"), *mode])
        assert rc == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"hierarchy train: error: {data}: the train split has no images to "
                       f"train on (see its manifest.json and quarantine/)"]


def test_the_error_family_maps_every_refusal_to_exit_3():
    for cls in (IngestError, DatasetNotReady, OutputLocked, TrainError, WeightsUnavailable,
                ScoringRefused, EmptySplitError, RunMismatch):
        assert issubclass(cls, Refused) and cls("x").exit_code == 3, cls


# ------------------------------------------------------------------ command lines
@pytest.fixture
def no_spark(monkeypatch):
    """Fails a test whose command starts Spark: the checks must come first."""
    import hierarchy.spark

    def refuse(*args, **kwargs):
        raise AssertionError("Spark was started before the command line was checked")

    monkeypatch.setattr(hierarchy.spark, "get_spark", refuse)


def _paths(tmp_path, real_bson, real_categories):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    return {"file": str(a_file), "dir": str(folder), "missing": str(tmp_path / "missing"),
            "bson": str(real_bson), "csv": str(real_categories), "out": str(tmp_path / "out")}


BAD_COMMANDS = {
    "missing categories": (["ingest", "--input", "{bson}", "--categories", "{missing}",
                            "--output", "{out}"], "--categories {missing}: no such file"),
    "categories a folder": (["ingest", "--input", "{bson}", "--categories", "{dir}",
                             "--output", "{out}"], "--categories {dir}: is a folder, not a file"),
    "categories not a table": (["ingest", "--input", "{bson}", "--categories", "{bson}",
                                "--output", "{out}"], "{bson}: not UTF-8 text"),
    "missing input": (["ingest", "--input", "{missing}", "--categories", "{csv}",
                       "--output", "{out}"], "input {missing}: no such file"),
    "input a folder": (["ingest", "--input", "{dir}", "--categories", "{csv}",
                        "--output", "{out}"], "input {dir}: is a folder, not a file"),
    "ingest output a file": (["ingest", "--input", "{bson}", "--categories", "{csv}",
                              "--output", "{file}"], "--output {file}: is a file, not a folder"),
    "ingest output under a file": (["ingest", "--input", "{bson}", "--categories", "{csv}",
                                    "--output", "{file}/ds"],
                                   "--output {file}/ds: cannot be created, {file} is a file"),
    "predict output a file": (["predict", "--data", "{dir}", "--models", "{dir}", "--run-id",
                               "r", "--output", "{file}"],
                              "--output {file}: is a file, not a folder"),
    "predict data missing": (["predict", "--data", "{missing}", "--models", "{dir}",
                              "--run-id", "r", "--output", "{out}"],
                             "--data {missing}: no such folder"),
    "evaluate output a file": (["evaluate", "--data", "{dir}", "--models", "{dir}",
                                "--run-id", "r", "--output", "{file}"],
                               "--output {file}: is a file, not a folder"),
    "train models a file": (["train", "--data", "{dir}", "--models", "{file}", "--level", "1"],
                            "--models {file}: is a file, not a folder"),
    "train bad branches": (["train", "--data", "{dir}", "--models", "{out}", "--level", "3",
                            "--mode", "branch", "--branches", "x"],
                           "--branches 'x': expected level-1 ids like 0,3,7"),
    "train level 3 without a mode": (["train", "--data", "{dir}", "--models", "{out}",
                                      "--level", "3"],
                                     "--level 3 needs --mode flat or branch or multi or "
                                     "experts or refit or fusion"),
}


@pytest.mark.parametrize("name", sorted(BAD_COMMANDS))
def test_a_bad_command_line_is_one_line_and_exit_2_before_spark(
        name, tmp_path, real_bson, real_categories, capsys, no_spark):
    argv, message = BAD_COMMANDS[name]
    paths = _paths(tmp_path, real_bson, real_categories)
    rc = main([a.format(**paths) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    stage = argv[0]
    assert err == [f"hierarchy {stage}: error: " + message.format(**paths)] or \
        (len(err) == 1 and message.format(**paths) in err[0]), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--products", "-5"], ["--products", "0"],
                                  ["--test-products", "-1"], ["--seed", "x"]])
def test_synth_refuses_counts_that_make_no_catalog(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["synth", "--output", str(tmp_path / "s"), *argv])
    assert exit_.value.code == 2
    assert f"argument {argv[0]}" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def _as_nobody() -> list:
    """argv prefix that runs a command as an unprivileged user (root writes anywhere)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a folder unwritable")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_a_read_only_output_folder_is_one_line_and_exit_2(real_bson, real_categories):
    # a folder everyone can read: the unprivileged process must reach the inputs
    root = tempfile.mkdtemp(prefix="hierarchy-ro-", dir="/tmp")
    try:
        os.chmod(root, 0o755)
        shutil.copy(real_bson, f"{root}/train.bson")
        shutil.copy(real_categories, f"{root}/cats.csv")
        os.chmod(f"{root}/train.bson", 0o644)
        os.chmod(f"{root}/cats.csv", 0o644)
        ro = f"{root}/ro"
        os.mkdir(ro, 0o555)
        os.chmod(ro, 0o555)
        for target, verb in ((ro, "is not writable"), (f"{ro}/ds", f"cannot be created (in {ro})")):
            t0 = time.time()
            r = subprocess.run(
                [*_as_nobody(), sys.executable, "-m", "hierarchy.cli", "ingest", "--input",
                 f"{root}/train.bson", "--categories", f"{root}/cats.csv", "--output", target],
                capture_output=True, text=True, timeout=120, cwd=root,
                env={**os.environ, "HOME": root})
            assert r.returncode == 2, r.stderr
            assert r.stderr.strip().splitlines() == [
                f"hierarchy ingest: error: --output {target}: {verb}: Permission denied"]
            assert time.time() - t0 < 60  # no Spark started (it alone takes ~5 s)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ the fuzzer
def _fuzz_one(spark, good: bytes, seed: int, categories, root) -> dict:
    from fuzz import junk_file, mutate

    path = root / f"fuzz-{seed}.bson"
    if seed % 13 == 12:  # now and then a whole junk file
        dump, data = None, junk_file(seed, 1 + seed * 37 % 5000)
    else:
        dump = mutate(good, seed, n_mutations=1 + seed % 6)
        data = dump.bytes()
    path.write_bytes(data)
    out = root / f"ds-{seed}"
    figures = {"bytes": len(data), "mutations": len(dump.mutations) if dump else 1,
               "refused": 0, "lost": 0, "unaccounted": 0, "intact": 0}
    try:
        ingest(spark, [path], categories, out, max_bad_fraction=1.0, split_mb=0.05)
    except IngestError as exc:
        # only "nothing usable" may be refused at max_bad_fraction=1
        assert "no usable document" in str(exc) or "empty file" in str(exc), exc
        assert dump is None or not dump.intact(), (seed, dump.mutations, exc)
        figures["refused"] = 1
        return figures
    products = read(out, "products")
    assert not products.product_id.duplicated().any(), (seed, dump and dump.mutations)
    images = pq.ParquetDataset(out / "images").read(columns=["product_id", "img_idx"])
    assert not images.to_pandas().duplicated().any(), seed
    accounted_bytes(out, str(path), len(data))
    if dump is not None:
        q = read(out, "quarantine")
        kept = {(r.product_id, r.offset) for r in products.itertuples()}
        dups = q[q.reason == "duplicate_id"]
        for pid, offset in dump.intact().items():
            figures["intact"] += 1
            if (pid, offset) in kept:
                continue
            # legitimately second: a damaged document earlier in the file kept its id
            taken = products[(products.product_id == pid) & (products.offset < offset)]
            if len(taken) and ((dups.product_id == pid) & (dups.offset == offset)).any():
                continue
            figures["lost"] += 1
            raise AssertionError(f"seed {seed} ({dump.mutations}): intact document {pid} at "
                                 f"offset {offset} lost")
    shutil.rmtree(out)
    return figures


@pytest.mark.spark
def test_seeded_fuzzer_over_the_real_sample(spark, real_bson, real_categories, tmp_path):
    """No traceback, no intact document lost, every byte accounted for, no duplicate rows.
    HIERARCHY_FUZZ_DUMPS (default 26) sets the number of mutated dumps."""
    n = int(os.environ.get("HIERARCHY_FUZZ_DUMPS", "26"))
    good = real_bson.read_bytes()
    t0 = time.time()
    totals: dict = {}
    for seed in range(n):
        for k, v in _fuzz_one(spark, good, seed, real_categories, tmp_path).items():
            totals[k] = totals.get(k, 0) + v
    totals.update(files=n, seconds=round(time.time() - t0, 1))
    print("fuzz:", json.dumps(totals))
    assert totals["lost"] == 0 and totals["unaccounted"] == 0
    assert totals["intact"] > 0 and totals["refused"] < n


# ------------------------------------------------------------------ a damaged dataset
def test_a_damaged_dataset_part_is_one_line_exit_3_before_any_work(spark, tmp_path, capsys,
                                                                   monkeypatch):
    """A deleted, truncated, same-size corrupted or extra Parquet part: train, its --dry-run,
    predict's --dry-run and curate each refuse in one line naming the file and the repair,
    before Spark or Horovod start (training once succeeded with 7.6% of pictures missing)."""
    from conftest import ingested_synth

    import hierarchy.contracts.dataset as hd
    import hierarchy.spark

    data = ingested_synth(spark, tmp_path, products=120, seed=4, test_products=0,
                          overrides=("split_mb=0.2",))
    manifest = json.loads(open(os.path.join(data, "manifest.json")).read())
    parts = manifest["kinds"]["train"]["parts"]
    assert len(parts["images/split=train"]) >= 2, "the test needs two parts to damage one"
    models = str(tmp_path / "m")

    def refused(*extra: str) -> str:
        hd._VERIFIED.clear()  # a process checks a commit once; here every command is new
        rc = main(["train", "--data", data, "--models", models, "--level", "1", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 3 and len(err) == 1, err
        assert "re-run `hierarchy ingest --kind train`" in err[0]
        return err[0]

    assert main(["train", "--data", data, "--models", models, "--level", "1", "--dry-run"]) == 0
    monkeypatch.setattr(hierarchy.spark, "get_spark", lambda *a, **k: pytest.fail("started"))
    name, rows, size, digest = parts["images/split=train"][0]
    assert digest.startswith("sha256:")
    part = os.path.join(data, "images", "split=train", name)
    original = open(part, "rb").read()
    try:
        os.rename(part, part + ".gone")
        assert f"{part}: missing ({rows} rows" in refused("--dry-run")
        os.rename(part + ".gone", part)
        open(part, "wb").write(original[: size // 2])
        assert f"{part}: {size // 2} bytes, manifest.json says {size}" in refused()
        open(part, "wb").write(original[:-8] + b"\0" * 8)  # same size, footer gone
        assert f"{part}: not a readable Parquet file" in refused("--dry-run")
        open(part, "wb").write(original)
        extra = os.path.join(data, "images", "split=val", "part-99999.parquet")
        shutil.copy(part, extra)
        assert f"{extra}: not in manifest.json" in refused("--dry-run")
        hd._VERIFIED.clear()
        assert main(["curate", "--data", data, "--dry-run"]) == 3
        assert "not in manifest.json" in capsys.readouterr().err
        os.remove(extra)
        # a dataset committed before parts were recorded is held to its counts
        old = dict(manifest, kinds={k: {n: v for n, v in e.items() if n != "parts"}
                                    for k, e in manifest["kinds"].items()})
        open(os.path.join(data, "manifest.json"), "w").write(json.dumps(old))
        os.rename(part, part + ".gone")
        folder = os.path.join(data, "images", "split=train")
        left = old["kinds"]["train"]["counts"]["per_split"]["train"]["images"] - rows
        assert f"{folder}: {left} rows, manifest.json counts" in refused("--dry-run")
        os.rename(part + ".gone", part)
        open(part, "wb").write(original[:-8] + b"\0" * 8)
        assert f"{part}: not a readable Parquet file" in refused("--dry-run")
    finally:
        open(part, "wb").write(original)
        open(os.path.join(data, "manifest.json"), "w").write(json.dumps(manifest))
    for kept in (manifest, old):
        open(os.path.join(data, "manifest.json"), "w").write(json.dumps(kept))
        hd._VERIFIED.clear()
        assert main(["train", "--data", data, "--models", models, "--level", "1",
                     "--dry-run"]) == 0
    # weights that are not there: the dry run says so, as the real run would, and nothing
    # (no run folder, no taxonomy.json) is left behind by either
    capsys.readouterr()
    for extra in (["--dry-run"], []):
        assert main(["train", "--data", data, "--models", models, "--level", "1",
                     "--run-id", "w", "train.weights=/no/such/weights.h5", *extra]) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "/no/such/weights.h5" in err[0] and "does not exist" in err[0]
        assert not os.path.exists(os.path.join(models, "w"))


def test_a_part_damaged_at_the_same_size_is_named_by_verify_and_by_the_job_that_reads_it(
        spark, tmp_path):
    """Bytes flipped inside a part, its size and footer intact: every check before a job
    passes (they read sizes and footers), so `hierarchy verify` reads every part against the
    digest its commit recorded, and a job whose Spark read cannot decode it ends in one line
    naming the part (it once died after 38 s with a 144-line traceback). An append or a
    compaction refuses to copy it into a part with a fresh digest."""
    from conftest import ingested_synth

    from hierarchy.contracts.dataset import Dataset, require_digest

    data = ingested_synth(spark, tmp_path, products=120, seed=4, test_products=0,
                          overrides=("split_mb=0.2",))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    over = [f"catalog.warehouse={tmp_path / 'wh'}",
            f"catalog.metastore={tmp_path / 'wh' / 'ms'}", "spark.master=local[1]"]

    def job(*cmd: str):
        proc = subprocess.run([str(BIN / "hierarchy"), *cmd, "--data", data, "-q", *over],
                              env=env, capture_output=True, text=True, timeout=600)
        return proc.returncode, proc.stdout, proc.stderr.strip().splitlines()

    rc, out, err = job("verify")
    assert rc == 0 and "every digest as committed" in out, (out, err)
    manifest = json.loads(open(os.path.join(data, "manifest.json")).read())
    name, _, size, digest = manifest["kinds"]["train"]["parts"]["images/split=train"][0]
    part = os.path.join(data, "images", "split=train", name)
    whole = open(part, "rb").read()
    # the first page header after the magic: what a reader decodes first
    open(part, "wb").write(whole[:4] + bytes(b ^ 0x5A for b in whole[4:68]) + whole[68:])
    assert os.path.getsize(part) == size
    assert main(["train", "--data", data, "--models", str(tmp_path / "m"), "--level", "1",
                 "--dry-run"]) == 0  # sizes and footers: it looks whole
    rc, out, err = job("verify")
    assert rc == 3 and len(err) == 1 and f"{part}: content digest" in out, (out, err)
    assert "1 of" in err[0] and part in err[0] and "re-run `hierarchy ingest --kind train`" \
        in err[0]
    rc, out, err = job("curate")
    assert rc == 3 and len(err) == 1, err
    assert f"{part}: cannot be decoded" in err[0] and "damaged" in err[0], err
    with pytest.raises(OSError, match="its content digest is not the"):
        require_digest(part, Dataset(data).recorded_digests("train")[part])
    open(part, "wb").write(whole)
    require_digest(part, digest)


def test_a_second_job_on_a_busy_derby_metastore_is_refused_at_its_start(tmp_path, capsys,
                                                                        monkeypatch):
    """Embedded Derby lets one process in: a second predict once failed after 8 minutes with
    a Hive stack trace. Now it is one line before Spark starts, naming the way out."""
    wh = tmp_path / "wh"
    over = [f"catalog.warehouse={wh}", f"catalog.metastore={wh / 'ms'}", "spark.master=local[1]"]
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from hierarchy.contracts.config import load_config; "
         "from hierarchy.spark import get_spark; "
         "s = get_spark(load_config(overrides=sys.argv[1:]), 'holder', hold_metastore=True); "
         "print('held', flush=True); time.sleep(600)", *over],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from pyspark.sql import SparkSession

        import hierarchy.spark

        monkeypatch.setattr(SparkSession.Builder, "getOrCreate",
                            lambda self: pytest.fail("Spark started before the refusal"))
        # (as a job's own process: the suite's session, if any, is not this job's)
        monkeypatch.setattr(hierarchy.spark, "_session_active", lambda: False)
        assert main(["runs", "list", *over]) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"catalog.metastore {wh / 'ms'}" in err[0], err
        assert "make metastore" in err[0]
    finally:
        holder.kill()
        holder.wait()


def test_two_jobs_started_in_the_same_moment_on_one_derby_metastore_one_is_refused(tmp_path):
    """Derby's own lock is taken only once a JVM boots the database: two jobs started in the
    same second both passed the busy check and one died at its first table write with a
    traceback. The claim taken before Spark starts lets exactly one in."""
    wh = tmp_path / "wh"
    over = [f"catalog.warehouse={wh}", f"catalog.metastore={wh / 'ms'}", "spark.master=local[1]"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    jobs = [subprocess.Popen([sys.executable, "-m", "hierarchy.cli", "runs", "list", "-q",
                              *over], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env) for _ in range(2)]
    done = [(job.wait(timeout=300), job.stderr.read()) for job in jobs]
    assert sorted(rc for rc, _ in done) == [0, 3], done
    err = next(e for rc, e in done if rc == 3).strip().splitlines()
    assert len(err) == 1 and f"catalog.metastore {wh / 'ms'}" in err[0], err
    # once the first has finished, the next job gets in
    proc = subprocess.run([sys.executable, "-m", "hierarchy.cli", "runs", "list", "-q", *over],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_a_finished_command_has_let_go_of_the_derby_metastore(tmp_path):
    """`make demo` runs predict then curate on one embedded Derby: curate was refused as
    "another job has this metastore open" because predict's JVM outlived its Python for a
    moment. A `hierarchy` command now returns only once its JVM is gone."""
    from hierarchy.spark import refuse_busy_derby

    wh = tmp_path / "wh"
    over = [f"catalog.warehouse={wh}", f"catalog.metastore={wh / 'ms'}", "spark.master=local[1]"]
    hierarchy = str(Path(sys.executable).parent / "hierarchy")
    log = tmp_path / "console.txt"
    for _ in range(2):
        # output to a file, as a terminal: pipes would make the wait last until every
        # process holding them (the JVM too) has closed them, and hide the race
        with open(log, "w") as out:
            code = subprocess.run([hierarchy, "runs", "list", "-q", *over], stdout=out,
                                  stderr=subprocess.STDOUT, timeout=300).returncode
        refuse_busy_derby(str(wh / "ms"))   # raises while any JVM holds the lock
        console = log.read_text()
        assert code == 0 and "----" not in console, console   # no socket error at exit


@contextlib.contextmanager
def small_disk(where: Path, size: str):
    """A real file system of ``size`` at ``where`` (a tmpfs mounted as root), else a skip."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                       str(where)]).returncode:
        pytest.skip("this machine does not let root mount a tmpfs")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)])


def test_a_full_disk_during_ingest_is_one_line_exit_3_and_nothing_committed(tmp_path):
    """A real full disk (a 1 MB tmpfs, mounted as root): a Py4J stack from a Spark worker's
    "[Errno 28]" used to be all a user saw. The stack trace stays available with -v."""
    with small_disk(tmp_path / "tiny", "1m") as tiny:
        syn = tmp_path / "syn"
        subprocess.run([str(BIN / "hierarchy"), "synth", "--output", str(syn), "--products",
                        "300", "--test-products", "0", "-q"], check=True, capture_output=True)
        out = tiny / "ds"
        cmd = [str(BIN / "hierarchy"), "ingest", "--input", str(syn / "train.bson"),
               "--categories", str(syn / "category_names.csv"), "--output", str(out),
               "spark.master=local[1]"]
        done = subprocess.run([*cmd, "-q"], capture_output=True, text=True, timeout=300)
        ours = [line for line in done.stderr.splitlines() if line.startswith("hierarchy ")]
        assert done.returncode == 3, done.stderr[-3000:]
        assert ours == [f"hierarchy ingest: error: writing under {out}: no space left on the "
                        f"device — free space there, or point the job at a bigger disk (the "
                        f"stack trace is logged with -v)"], done.stderr[-3000:]
        # nothing else: the failed task's traceback and Spark's notes are in the job's log
        assert not [line for line in done.stderr.splitlines()
                    if line.strip() and not line.startswith("hierarchy ")], done.stderr[-3000:]
        log = json.loads(done.stdout.strip().splitlines()[-1])["log"]
        assert "No space left on device" in open(log).read()
        assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "refused"
        assert not (out / "manifest.json").exists()
        verbose = subprocess.run([*cmd, "-v"], capture_output=True, text=True, timeout=300)
        assert verbose.returncode == 3
        assert [line for line in verbose.stderr.splitlines() if line.startswith("Traceback")]


def test_a_full_disk_at_a_training_checkpoint_names_the_run_folder(tmp_path):
    """The training loop's own checkpoint callback on a real full disk (a 256 KB tmpfs):
    whatever TensorFlow or h5py raise, the CLI's handler finds the fault and a path in the
    run's folder, the one line a user sees. The last complete epoch's state stays intact."""
    import tensorflow as tf

    from hierarchy.contracts.errors import environment_fault
    from hierarchy.contracts.modelstore import ModelStore
    from hierarchy.train.callbacks import CheckpointCallback

    with small_disk(tmp_path / "tiny", "256k") as tiny:
        run = ModelStore(str(tiny / "models")).run("r1")
        model = tf.keras.Sequential([tf.keras.Input((64,)), tf.keras.layers.Dense(4096),
                                     tf.keras.layers.Dense(10)])  # ~1 MB of weights
        model.compile(optimizer="adam", loss="mse")
        callback = CheckpointCallback(run, "l1", {}, "train")
        callback.set_model(model)
        with pytest.raises(Exception) as caught:
            callback.on_epoch_end(0, {"loss": 1.0, "val_loss": 1.0})
        line = environment_fault(caught.value, str(tiny / "models"))
        assert line is not None, repr(caught.value)
        assert line.startswith(str(tiny / "models")) and "no space left on the device" in line
        assert not os.path.exists(run.state_file("l1")), "a state naming a partial save"


def test_environment_faults_are_found_in_the_exception_chain():
    from hierarchy.contracts.errors import environment_fault

    full = OSError(28, "No space left on device", "/data/ckpt/model.h5")
    assert environment_fault(full).startswith("/data/ckpt/model.h5: no space left")
    try:
        try:
            raise PermissionError(13, "Permission denied")
        except PermissionError as inner:
            raise RuntimeError("An error occurred while calling o42.parquet") from inner
    except RuntimeError as outer:
        assert environment_fault(outer, "/out").startswith("writing under /out: permission")
    java = RuntimeError("java.io.IOException: Mkdirs failed: Read-only file system: "
                        "file:/mnt/ro/ds/_staging\n  at org.apache.hadoop.fs.Foo (Foo.java:1)")
    assert environment_fault(java).startswith("/mnt/ro/ds/_staging: the file system is read")
    assert environment_fault(ValueError("a bug")) is None
