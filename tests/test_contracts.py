"""The contracts as code: the dataset layout, the model store, the predictions schema, atomic
writes on any filesystem, the error family and the command line's defaults."""

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from hierarchy.cli import main
from hierarchy.contracts import modelstore, predictions, storage
from hierarchy.contracts.dataset import KIND_SPLITS, SPLITS, Dataset, kind_of_split
from hierarchy.contracts.manifest import KindStatus, Manifest, ManifestInvalid
from hierarchy.contracts.modelstore import ModelStore
from hierarchy.contracts.taxonomy import Taxonomy

TAX = Taxonomy.from_rows([(10, "A", "A1", "x"), (20, "A", "A2", "y"), (30, "B", "B1", "z")])


# ------------------------------------------------------------------ layouts
def test_dataset_layout_on_a_url_and_a_path():
    for root in ("data/ds", "hdfs://nn:8020/ds"):
        ds = Dataset(root)
        assert ds.images("val") == f"{root}/images/split=val"
        assert ds.products("test") == f"{root}/products/kind=test"
        assert ds.staging("train-x").quarantine("train") == \
            f"{root}/_staging/train-x/quarantine/kind=train"
        assert ds.manifest_path == f"{root}/manifest.json"
    assert Dataset("hdfs://nn:8020/ds").url("images") == "hdfs://nn:8020/ds/images"
    assert Dataset("/d").url("images") == "file:///d/images"
    assert [kind_of_split(s) for s in SPLITS] == ["train", "train", "test"]
    assert sum(KIND_SPLITS.values(), ()) == SPLITS


def test_manifest_commit_protocol(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    manifest = ds.manifest()
    assert manifest.kinds == {}
    ds.begin_kind(manifest, "train", TAX)
    with pytest.raises(Exception, match="the train ingest is committing, not complete"):
        ds.require_complete(["train"])
    entry = {"status": "complete", "counts": {"per_split": {"train": {"images": 3}}}}
    ds.finish_kind(manifest, "train", entry, TAX)
    got = ds.require_complete(["train"])
    assert got.splits_json() == {"train": {"images": 3}}
    assert got.fingerprint == TAX.fingerprint and got.images("train") == 3
    ds.write_taxonomy(TAX)
    assert ds.taxonomy().fingerprint == TAX.fingerprint


def _manifest_of_today() -> dict:
    """A manifest as ingest writes one: train complete (every key its entry has), test
    committing."""
    per_split = {"train": {"products": 7, "images": 9, "images_per_l1": {"0": 4, "1": 5}},
                 "val": {"products": 2, "images": 3, "images_per_l1": {"1": 3}}}
    train = {"status": "complete",
             "inputs": [{"url": "file:///d/train.bson", "size": 1234, "mtime": 1.5}],
             "counts": {"documents": 10, "bad_documents": 1, "corrupt_regions": 0,
                        "corrupt_bytes": 0, "input_bytes": 1234, "products": 9, "images": 12,
                        "image_bytes": 999, "per_split": per_split,
                        "quarantine": {"bad_jpeg": 1}},
             "bad_fraction": 0.1, "config": {"val_fraction": 0.2, "split_mb": 64.0},
             "timings": {"scan_s": 0.25, "total_s": 3.0}, "tasks": 2,
             "parts": {"images/split=train": [["part-00000.parquet", 9, 4096]],
                       "images/split=val": [["part-00000.parquet", 3, 2048]],
                       "products/kind=train": [["part-00000.parquet", 9, 1024]]},
             "finished": "2024-05-01T10:00:05+00:00"}
    return {"format": "hierarchy-dataset/1",
            "kinds": {"train": train,
                      "test": {"status": "committing", "started": "2024-05-01T10:01:00+00:00"}},
            "taxonomy": {"fingerprint": TAX.fingerprint, "level1": 2, "level2": 3,
                         "level3": 3},
            "splits": per_split, "updated": "2024-05-01T10:01:00+00:00"}


def test_a_manifest_round_trips_through_its_record_and_is_read_typed(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    today = _manifest_of_today()
    storage.write_json_atomic(ds.manifest_path, today)
    manifest = ds.manifest()
    assert manifest.to_json() == today
    assert manifest.kind("train").status is KindStatus.COMPLETE and manifest.kind("x") is None
    assert manifest.kind("test").status is KindStatus.COMMITTING
    assert manifest.complete_kinds() == ["train"]
    assert (manifest.fingerprint, manifest.n_l1) == (TAX.fingerprint, 2)
    assert manifest.split("val").products == 2 and manifest.split("test").products == 0
    assert manifest.images("train") == 9 and manifest.images("train", 1) == 5
    assert manifest.images("val", 0) == 0 and manifest.splits_json() == today["splits"]
    # an ingest from before ingest.val_draw drew val by category; a new one says how
    assert manifest.val_draw() == "category"
    today["kinds"]["train"]["config"]["val_draw"] = "product"
    assert Manifest.parse(today, "m").val_draw() == "product"
    del today["kinds"]["train"]["config"]["val_draw"]
    # rewritten through the record (test committing again): the train entry as it was
    again = ds.begin_kind(manifest, "test", TAX)
    written = json.loads(open(ds.manifest_path).read())
    assert written == again.to_json() and written["kinds"]["train"] == today["kinds"]["train"]
    assert {k: v for k, v in written.items() if k not in ("kinds", "updated")} == \
        {k: v for k, v in today.items() if k not in ("kinds", "updated")}
    # the empty manifest of a folder nothing was committed to
    assert Dataset(str(tmp_path / "none")).manifest().to_json() == {
        "format": "hierarchy-dataset/1", "kinds": {}}


def test_keys_a_manifest_record_does_not_name_survive_a_rewrite(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    today = _manifest_of_today()
    today["note"] = {"by": "a newer version"}
    today["kinds"]["train"]["checksum"] = "sha256:cc"
    today["kinds"]["train"]["counts"]["per_split"]["val"]["pictures_mb"] = 1.5
    storage.write_json_atomic(ds.manifest_path, today)
    ds.begin_kind(ds.manifest(), "test", TAX)
    written = json.loads(open(ds.manifest_path).read())
    assert written["note"] == {"by": "a newer version"}
    assert written["kinds"]["train"] == today["kinds"]["train"]
    assert written["splits"]["val"]["pictures_mb"] == 1.5


def test_a_kind_status_this_version_does_not_know_is_refused_in_one_line(tmp_path):
    from hierarchy.contracts.errors import Refused

    ds = Dataset(str(tmp_path / "ds"))
    today = _manifest_of_today()
    today["kinds"]["test"]["status"] = "failed"
    storage.write_json_atomic(ds.manifest_path, today)
    for read in (ds.manifest, lambda: ds.require_complete(["train"])):
        with pytest.raises(ManifestInvalid) as got:
            read()
        message = str(got.value)
        assert message.startswith(f"{ds.manifest_path}: kinds.test.status: 'failed' is not "
                                  f"one of committing, complete — ")
        assert "\n" not in message and isinstance(got.value, Refused)
    storage.write_json_atomic(ds.manifest_path, [1])
    with pytest.raises(ManifestInvalid, match="manifest.json: the file: "):
        ds.manifest()


def test_a_dataset_table_is_replaced_whole_or_not_at_all(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    table = ds.path("curation")
    storage.write_text_atomic(storage.join(table, "old.parquet"), "old")
    with pytest.raises(RuntimeError, match="half way"):
        with ds.replacing(table) as staged:
            storage.write_text_atomic(storage.join(staged, "new.parquet"), "new")
            raise RuntimeError("half way")
    assert [n for n, _, _ in storage.list_dir(table)] == ["old.parquet"]
    assert not storage.exists(ds.staging().root)  # nothing staged is left
    with ds.replacing(table) as staged:
        storage.write_text_atomic(storage.join(staged, "new.parquet"), "new")
    assert [n for n, _, _ in storage.list_dir(table)] == ["new.parquet"]
    assert not storage.exists(ds.staging().root)
    with pytest.raises(KeyError):
        with ds.scratch("curate") as scratch:
            storage.write_text_atomic(scratch.path("hashes", "h.parquet"), "h")
            raise KeyError("stop")
    assert storage.list_dir(ds.staging().root) == []


def test_a_single_part_spark_output_becomes_one_file(tmp_path):
    dest = str(tmp_path / "out" / "submission.csv")
    staging = str(tmp_path / "out" / "_staging-submission-x")
    with storage.single_part_file(dest, staging) as folder:
        storage.write_text_atomic(storage.join(folder, "part-00000.csv"), "_id,category_id\n")
        storage.write_text_atomic(storage.join(folder, "_SUCCESS"), "")
    assert storage.read_text(dest) == "_id,category_id\n" and not storage.exists(staging)
    from hierarchy.contracts.errors import Refused

    with pytest.raises(Refused, match="expected one part file, found 2"):
        with storage.single_part_file(dest, staging) as folder:
            for i in range(2):
                storage.write_text_atomic(storage.join(folder, f"part-{i}.csv"), "x")
    assert storage.read_text(dest) == "_id,category_id\n" and not storage.exists(staging)


def test_model_store_layout_and_run_record(tmp_path):
    run = ModelStore(str(tmp_path)).run("r1")
    assert run.model_file("branch/3") == f"{tmp_path}/r1/branch/3/model.h5"
    assert run.best_file("flat") == f"{tmp_path}/r1/flat/checkpoints/best.h5"
    assert modelstore.model_key(1) == "level1" and modelstore.model_key(3, "flat") == "flat"
    assert modelstore.model_key(3, "branch", 7) == "branch/7"
    assert modelstore.branch_of("branch/7") == 7 and modelstore.branch_of("flat") is None
    assert modelstore.train_command("branch/7") == "--level 3 --mode branch --branches 7"
    assert run.read().to_json() == {} and not run.exists()
    run.record(key="flat", config={"epochs": 1, "backbone": "small_cnn", "image_size": 48},
               fingerprint="sha256:aa", data="d", manifest=Manifest(),
               result={"metrics": {"val_accuracy": 0.5}, "epochs": 1})
    assert run.recorded("flat").metrics == {"val_accuracy": 0.5} and run.trained("flat")
    raw = json.loads(Path(run.run_file).read_text())
    assert raw["models"]["flat"] == {"metrics": {"val_accuracy": 0.5}, "epochs": 1}
    assert raw["config"]["flat"]["epochs"] == 1  # keys the record does not name are kept
    assert run.read().config["flat"].image_size == 48
    with pytest.raises(modelstore.RunMismatch, match="use another --run-id"):
        run.check_taxonomy("sha256:bb")
    for key in ("branch/10", "branch/2", "level1"):
        storage.write_json_atomic(run.history_file(key), {"loss": [1.0]})
    assert list(run.histories()) == ["level1", "branch/2", "branch/10"]
    assert run.branch_ids() == [2, 10]


def test_run_json_is_read_as_typed_records_and_refused_in_one_line_when_it_is_not(tmp_path):
    from hierarchy.contracts.runrecord import DecisionRule, ModelStatus, RunFileInvalid

    run = ModelStore(str(tmp_path)).run("r1")
    run.record(key="branch/3", config={"backbone": "small_cnn", "image_size": 48},
               fingerprint="sha256:aa", data="d", manifest=Manifest(),
               result={"status": "no training images"})
    assert run.recorded("branch/3").status is ModelStatus.NO_TRAINING_IMAGES
    assert not run.trained("branch/3")
    rule = DecisionRule(target=0.9, levels=(3, 2), confidence=0.95, temperature=1.0,
                        threshold=None)
    run.record_evaluation(decisions={"flat": rule}, calibration={
        "temperature": 2.0, "w": 0.5, "v": 0.0, "model": "experts", "products": 9, "grid": {}},
        recommended="flat", variants={"two-stage-k1": {"strategy": "two-stage",
                                                       "top_branches": 1}})
    got = run.read()
    assert got.rule("flat") == rule and got.calibration.correction() == {
        "temperature": 2.0, "w": 0.5, "v": 0.0}
    raw = json.loads(Path(run.run_file).read_text())
    assert raw["decisions"]["flat"] == {"target": 0.9, "levels": [3, 2], "confidence": 0.95,
                                        "temperature": 1.0, "threshold": None, "reason": "",
                                        "certifier": "fixed-sequence"}
    assert raw["calibration"]["grid"] == {} and raw["variants"]["two-stage-k1"]["top_branches"] == 1
    run.record(key="flat", config={"backbone": "small_cnn", "image_size": 48},
               fingerprint="sha256:aa", data="d", manifest=Manifest(), result={})
    assert "decisions" not in json.loads(Path(run.run_file).read_text())  # stale: dropped
    for text, words in (("", "not JSON"), ("[1]", "a JSON list"),
                        ('{"models": {"flat": {"status": "weird"}}}', "models.flat.status")):
        Path(run.run_file).write_text(text)
        with pytest.raises(RunFileInvalid, match=words) as got_exc:
            run.read()
        assert run.run_file in str(got_exc.value) and "\n" not in str(got_exc.value)


# ------------------------------------------------------------------ storage
def test_atomic_writes_leave_nothing_behind_on_failure(tmp_path):
    target = str(tmp_path / "a" / "file.bin")
    storage.write_bytes_atomic(target, b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_output(target) as (fs, tmp):
            with fs.open_output_stream(tmp) as out:
                out.write(b"half")
            raise RuntimeError("killed")
    assert storage.read_bytes(target) == b"old"
    with pytest.raises(RuntimeError):
        with storage.atomic_local_file(str(tmp_path / "m.h5")) as tmp:
            open(tmp, "wb").write(b"x")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "file.bin"]


def test_storage_speaks_urls_and_paths_alike(tmp_path):
    for base in (str(tmp_path / "p"), f"file://{tmp_path}/u", f"memory://t-{tmp_path.name}"):
        storage.write_json_atomic(storage.join(base, "x", "doc.json"), {"a": 1})
        assert storage.read_json(storage.join(base, "x", "doc.json")) == {"a": 1}
        assert storage.read_json(storage.join(base, "nope.json"), None) is None
        assert [n for n, _, _ in storage.list_dir(storage.join(base, "x"))] == ["doc.json"]
        storage.remove(storage.join(base, "x"))
        assert not storage.exists(storage.join(base, "x"))
    assert storage.is_remote("hdfs:///x") and not storage.is_remote("file:///x")
    assert not storage.is_remote("rel/path")


# ------------------------------------------------------------------ predictions schema
def test_predictions_columns_derive_from_one_declaration():
    assert predictions.TABLE_COLUMNS[:9] == predictions.SCORED_COLUMNS[:9]
    assert "top5" in predictions.TABLE_COLUMNS
    assert "top_category_id" not in predictions.TABLE_COLUMNS
    assert predictions.TABLE_COLUMNS[-3:] == list(predictions.PARTITIONS)
    assert predictions.SCORED_DDL.startswith("product_id long, category_id long")
    row = predictions.fallback_prediction(TAX, 20, 0.25)
    assert (row["category_id"], row["category_level3"], row["l1"], row["confidence"],
            row["top_category_id"], row["fallback"]) == (20, "y", 0, 0.25, [20], True)
    assert set(row) | {"product_id", "bad_image_count", *predictions.TRUTH} == \
        set(predictions.SCORED_COLUMNS)


@pytest.mark.spark
def test_the_spark_fallback_row_is_the_scorer_fallback_row(spark):
    from hierarchy.infer.pipeline import fallback_rows

    products = spark.createDataFrame(
        [(7, 30, 1, 2, 2, 3)], "product_id long, category_id long, l1 int, l2 int, l3 int, "
                               "n_bad_images int")
    images = spark.createDataFrame([(8,)], "product_id long")
    got = fallback_rows(products, images, TAX, (20, 0.25)).toPandas()
    assert list(got.columns) == predictions.SCORED_COLUMNS
    want = {"product_id": 7, **predictions.fallback_prediction(TAX, 20, 0.25),
            "bad_image_count": 3, "true_category_id": 30, "true_l1": 1, "true_l2": 2,
            "true_l3": 2}
    row = got.iloc[0].to_dict()
    for key in ("top_category_id", "top_probability"):
        row[key] = list(row[key])
    # toPandas reads a null number as NaN
    row.update({k: None for k, v in row.items() if isinstance(v, float) and v != v})
    assert row == want


# ------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, spark):
    from hierarchy.contracts.config import load_config
    from hierarchy.ingest.pipeline import run_ingest
    from hierarchy.synth import generate

    root = tmp_path_factory.mktemp("contracts")
    generate(str(root / "syn"), products=60, seed=3, taxonomy="small", test_products=5,
             workers=1, progress=False)
    cfg = load_config(overrides=["spark.master=local[2]", "ingest.progress=false"])
    run_ingest(spark, cfg, [str(root / "syn" / "train.bson")],
               str(root / "syn" / "category_names.csv"), str(root / "ds"), "train")
    return root / "ds"


@pytest.mark.spark
def test_a_run_of_another_taxonomy_is_refused_before_training_with_exit_3(
        small_dataset, tmp_path, capsys):
    run = ModelStore(str(tmp_path / "m")).run("r")
    storage.write_json_atomic(run.run_file, {"run_id": "r", "taxonomy_fingerprint":
                                             "sha256:" + "0" * 64})
    rc = main(["train", "--data", str(small_dataset), "--models", str(tmp_path / "m"),
               "--run-id", "r", "--level", "1", "train.epochs=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1 and "use another --run-id" in err[0], err
    assert not storage.exists(run.model_dir("level1"))  # nothing was trained


@pytest.mark.spark
def test_a_split_whose_files_are_gone_exits_3_not_a_traceback(small_dataset, tmp_path):
    import subprocess
    import sys

    data = tmp_path / "ds"
    shutil.copytree(small_dataset, data)
    for part in (data / "images" / "split=train").glob("*.parquet"):
        part.unlink()
    # the real command, as a scheduler runs it (in-process training would share TensorFlow's
    # log handlers with the test harness)
    r = subprocess.run([sys.executable, "-m", "hierarchy.cli", "train", "--data", str(data),
                        "--models", str(tmp_path / "m"), "--level", "1", "-q",
                        "train.epochs=1", "train.image_size=32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    # the manifest's list of parts names the first file gone, before TensorFlow starts
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hierarchy train: error: {data}/images/split=train/part-")
    assert ": missing (" in last and f"re-run `hierarchy ingest --kind train` into {data}" in last
    assert "Traceback" not in r.stderr


def test_paths_config_is_the_default_of_the_folder_flags(tmp_path, capsys):
    conf = tmp_path / "site.yaml"
    conf.write_text(f"paths:\n  data: {tmp_path}/nods\n  models: {tmp_path}/m\n"
                    f"  output: {tmp_path}/out\n")
    assert main(["train", "--config", str(conf), "--level", "1"]) == 2
    assert f"--data {tmp_path}/nods: no such folder" in capsys.readouterr().err
    # a flag still wins over the config
    (tmp_path / "other").mkdir()
    assert main(["predict", "--config", str(conf), "--data", str(tmp_path / "other"),
                 "--run-id", "r"]) == 2
    assert f"--models {tmp_path}/m: no such folder" in capsys.readouterr().err


def test_quiet_and_verbose_set_one_logging_level(tmp_path):
    from hierarchy.cli import setup_logging

    log = logging.getLogger("hierarchy")
    setup_logging(quiet=True)
    assert log.level == logging.WARNING
    setup_logging(verbose=True)
    assert log.level == logging.DEBUG
    setup_logging()
    assert log.level == logging.INFO
    assert sum(getattr(h, "_hierarchy", False) for h in log.handlers) == 1


def test_a_predictions_frame_has_the_declared_pandas_types():
    import numpy as np

    from hierarchy.infer.decide import DecisionRule
    from hierarchy.infer.modelset import ModelSet
    from hierarchy.infer.scoring import (
        ScoringPlan,  # noqa: F401 - documents the input
        _finished_frame,
        _Product,
    )

    rule = DecisionRule(target=0.9, levels=(3, 2, 1), confidence=0.95, temperature=1.0,
                        threshold=0.6)

    class Plan:
        top_n, prior_category_id, prior_share = 2, 20, 0.25
        models = ModelSet(run_id="r", strategy="flat", decision=rule)

    probs = np.array([[0.1, 0.2, 0.7]])
    seen = {5: _Product(decoded=1, truth=(30, 1, 2, 2)), 6: _Product(bad=2)}
    df = _finished_frame(Plan(), TAX, (np.array([5]), probs, np.array([1])), seen, keep=None)
    assert list(df.columns) == predictions.SCORED_COLUMNS
    assert df.loc[0, "category_id"] == 30 and df.loc[0, "top_category_id"] == [30, 20]
    assert bool(df.loc[1, "fallback"]) and df.loc[1, "category_id"] == 20
    assert str(df["true_l1"].dtype) == "Int32" and pd.isna(df.loc[1, "true_l1"])
    assert json.dumps(df.loc[0, "top_probability"])  # plain floats, not numpy scalars
    # filed at its leaf (0.7 clears 0.6); the product with no picture goes to review
    assert df.loc[0, "decision_level"] == 3 and df.loc[0, "decision_id"] == 30
    assert df.loc[1, "decision_level"] == 0 and pd.isna(df.loc[1, "decision_id"])
    assert str(df["decision_level"].dtype) == "Int32"
