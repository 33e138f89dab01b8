"""Taxonomy versions: a leaf keeps its id across versions, models say what their outputs
are, a head crosses a version over another run's frozen trunk (``train --from-run``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hierarchy.contracts import versions
from hierarchy.contracts.taxonomy import Taxonomy

V1 = [(10, "A", "A1", "a"), (20, "A", "A1", "b"), (30, "A", "A2", "c"),
      (40, "B", "B1", "d"), (50, "B", "B1", "e")]


def test_diff_tables_names_added_removed_renamed_and_moved_leaves():
    v2 = [(10, "A", "A1", "a"), (20, "A", "A1", "b, renamed"), (25, "A", "A1", "new"),
          (40, "A", "A2", "d"), (50, "B", "B1", "e")]
    got = versions.diff_tables(Taxonomy.from_rows(V1), Taxonomy.from_rows(v2))
    assert got == {"added": [25], "removed": [30], "renamed": [20], "moved": [40]}
    assert versions.diff_tables(Taxonomy.from_rows(V1), Taxonomy.from_rows(V1[::-1])) == \
        {"added": [], "removed": [], "renamed": [], "moved": []}


def test_split_and_merged_come_from_where_products_went_not_from_label_fixes():
    pairs = [(30, 30, 50), (30, 31, 45), (30, 99, 1),   # 30 split in two; 1 product relabelled
             (40, 60, 20), (50, 60, 25),                # 40 and 50 merged into 60
             (10, 10, 100), (20, 10, 1), (20, 20, 80)]  # a label fix is not a merge
    split, merged = versions.split_and_merged(pairs, min_share=0.05)
    assert split == {30: [30, 31]}
    assert merged == {60: [40, 50]}


def test_carried_rows_keep_each_leaf_by_id_and_start_new_ones_from_their_siblings():
    old = Taxonomy.from_rows(V1)
    new = Taxonomy.from_rows([*V1[:2], (15, "A", "A1", "new, middle"), *V1[2:],
                              (60, "C", "C1", "new branch")])
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(4, 5)), rng.normal(size=5)
    k2, b2, carried = versions.carry_rows(kernel, bias, old, new)
    assert carried == 5 and k2.shape == (4, 7)
    for cid in old.category_ids:  # every old leaf keeps its own row, wherever it now sits
        i, j = old.l3_of_category(cid), new.l3_of_category(cid)
        np.testing.assert_allclose(k2[:, j], kernel[:, i], rtol=1e-6)
        assert b2[j] == pytest.approx(bias[i], rel=1e-6)
    j = new.l3_of_category(15)  # siblings under A > A1: leaves 10 and 20
    np.testing.assert_allclose(k2[:, j], kernel[:, :2].mean(axis=1), rtol=1e-5)
    assert b2[j] == pytest.approx(bias[:2].mean() - np.log(3), rel=1e-5)


def test_a_model_is_usable_where_its_output_ids_are_this_versions_ids():
    v1, v2 = Taxonomy.from_rows(V1), Taxonomy.from_rows([*V1[:2], (15, "A", "A1", "x"),
                                                         *V1[2:]])
    flat = {"taxonomy_fingerprint": v1.fingerprint,
            versions.OUTPUT_IDS: versions.output_ids(v1, "flat")}
    assert versions.unusable(v1, "flat", flat) is None
    assert "1 id(s) of this version it has no output for (15)" in \
        versions.unusable(v2, "flat", flat)
    # branch B is untouched by a leaf added under A: its model stays valid
    b = {"taxonomy_fingerprint": v1.fingerprint,
         versions.OUTPUT_IDS: versions.output_ids(v1, "branch/1")}
    assert versions.unusable(v2, "branch/1", b) is None
    a = {"taxonomy_fingerprint": v1.fingerprint,
         versions.OUTPUT_IDS: versions.output_ids(v1, "branch/0")}
    assert "model branch/0" in versions.unusable(v2, "branch/0", a)
    level1 = {"taxonomy_fingerprint": v1.fingerprint, versions.OUTPUT_IDS: ["A", "B"]}
    assert versions.unusable(v2, "level1", level1) is None
    assert "needs the whole tree" in versions.unusable(
        v2, "multi", {"taxonomy_fingerprint": v1.fingerprint})
    assert "does not record its output ids" in versions.unusable(
        v2, "flat", {"taxonomy_fingerprint": v1.fingerprint})


# ----------------------------------------------------------------------------- real runs
tf = pytest.importorskip("tensorflow")
TRAIN = ["train.backbone=small_cnn", "train.image_size=32", "train.batch_size=16",
         "train.learning_rate=0.003", "train.warmup_epochs=0", "train.shuffle_buffer=256",
         "train.reader_workers=1", "train.augment=false", "train.epochs=2",
         "train.expert_epochs=2", "train.expert_hidden=8"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, spark):
    """v1: a catalog and its flat run; v2: its table with a leaf added in the middle of the id
    range, the same products ingested under it."""
    from conftest import ingested_synth

    from hierarchy.contracts.config import load_config
    from hierarchy.ingest.pipeline import run_ingest
    from hierarchy.train.launch import run_training

    root = tmp_path_factory.mktemp("versions")
    data1 = ingested_synth(spark, root, products=160, seed=11, test_products=0)
    lines = (root / "synth" / "category_names.csv").read_text().splitlines()
    ids = sorted(int(line.split(",")[0]) for line in lines[1:])
    middle = next(c for c in range(ids[len(ids) // 2], ids[-1]) if c not in ids)
    l1, l2 = lines[1].split(",")[1:3]
    table = root / "v2.csv"
    table.write_text("\n".join(lines + [f"{middle},{l1},{l2},Added in the middle"]) + "\n")
    data2 = str(root / "ds2")
    run_ingest(spark, load_config(overrides=["spark.master=local[2]", "ingest.progress=false"]),
               [str(root / "synth" / "train.bson")], str(table), data2, "train")
    models = str(root / "models")
    run_training(load_config(overrides=TRAIN), data1, models, "v1", level=3, mode="flat")
    return {"root": root, "data1": data1, "data2": data2, "models": models, "middle": middle,
            "table": table}


def _load(path: str):
    from hierarchy.contracts import model as cmodel

    return tf.keras.models.load_model(path, custom_objects=cmodel.custom_objects(),
                                      compile=False)


def test_a_leaf_added_in_the_middle_changes_no_untouched_leafs_answer(world):
    from hierarchy.contracts.dataset import Dataset
    from hierarchy.contracts.modelstore import ModelStore
    from hierarchy.train import heads as theads

    old, new = Dataset(world["data1"]).taxonomy(), Dataset(world["data2"]).taxonomy()
    flat = _load(ModelStore(world["models"]).run("v1").model_file("flat"))
    kernel, bias = theads.expert_source_rows(flat, "all")
    carried = versions.carry_rows(kernel, bias, old, new)
    refit = theads.build_refit_model(flat, 8, *carried[:2])  # what --from-run starts from
    x = np.random.default_rng(3).random((64, 32, 32, 3), dtype=np.float32)
    p_old, p_new = flat.predict_on_batch(x), refit.predict_on_batch(x)
    cols = [new.l3_of_category(c) for c in old.category_ids]
    kept = p_new[:, cols] / p_new[:, cols].sum(axis=1, keepdims=True)
    np.testing.assert_allclose(kept, p_old, rtol=1e-4, atol=1e-6)
    assert (kept.argmax(axis=1) == p_old.argmax(axis=1)).all()
    # by position, the leaves after the new one would each answer for their neighbour
    by_position = p_new[:, :old.n_l3] / p_new[:, :old.n_l3].sum(axis=1, keepdims=True)
    assert not np.allclose(by_position, p_old, atol=1e-3)


def test_refit_from_run_trains_a_head_on_the_new_version_and_records_its_lineage(world):
    from hierarchy.contracts.config import load_config
    from hierarchy.contracts.dataset import Dataset
    from hierarchy.contracts.modelstore import ModelStore
    from hierarchy.infer.modelset import ScoringRefused, load_modelset
    from hierarchy.train.launch import run_training

    cfg = load_config(overrides=TRAIN)
    got = run_training(cfg, world["data2"], world["models"], "v2", level=3, mode="refit",
                       from_run="v1")
    assert got["refit"]["metrics"]["val_conditional_accuracy"] is not None
    old, new = Dataset(world["data1"]).taxonomy(), Dataset(world["data2"]).taxonomy()
    run = ModelStore(world["models"]).run("v2")
    record = json.loads(Path(run.run_file).read_text())
    assert record["taxonomy_fingerprint"] == new.fingerprint
    assert record["from_run"] == {"run_id": "v1", "taxonomy_fingerprint": old.fingerprint,
                                  "model": "flat"}
    assert not Path(run.model_dir("flat")).exists()  # no trunk was trained
    metrics = run.metrics("refit")
    assert metrics[versions.OUTPUT_IDS] == [int(c) for c in new.category_ids]
    assert metrics["leaves_carried"] == old.n_l3 and metrics["from_run"] == "v1"
    assert world["middle"] in metrics[versions.OUTPUT_IDS]
    # the new run scores the new version; the old run's flat model is refused there by name
    assert load_modelset(world["models"], "v2", "refit", new).head.key == "refit"
    with pytest.raises(ScoringRefused, match=rf"model flat .*\({world['middle']}\)"):
        load_modelset(world["models"], "v1", "flat", new)


def test_from_run_that_cannot_be_used_is_refused_in_one_line_before_any_work(
        world, capsys, monkeypatch, tmp_path):
    import hierarchy.spark
    from hierarchy.cli import main

    monkeypatch.setattr(hierarchy.spark, "get_spark", lambda *a, **k: pytest.fail("started"))
    empty = Path(world["models"]) / "empty"
    empty.mkdir(exist_ok=True)
    (empty / "run.json").write_text(json.dumps({"run_id": "empty", "models": {}}))
    def refused(code: int, *argv: str, sets=()) -> str:
        rc = main(["train", "--data", world["data2"], "--models", world["models"],
                   "--level", "3", *argv, "--dry-run", *TRAIN, *sets])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == code and len(err) == 1, (rc, err)
        return err[0]

    assert "no such run" in refused(3, "--mode", "refit", "--run-id", "n", "--from-run", "nope")
    assert "--from-run '../v1': use letters" in refused(2, "--mode", "refit", "--run-id", "n",
                                                        "--from-run", "../v1")
    assert "has no flat trunk" in refused(3, "--mode", "refit", "--run-id", "n",
                                          "--from-run", "empty")
    assert "takes small_cnn at 32 px, train: sets small_cnn at 48 px" in refused(
        2, "--mode", "refit", "--run-id", "n", "--from-run", "v1", sets=["train.image_size=48"])
    assert "needs --level 1, or --level 3 --mode refit, fusion, branch" in refused(
        2, "--mode", "flat", "--run-id", "n", "--from-run", "v1")
    assert "is the run being trained" in refused(2, "--mode", "refit", "--run-id", "v1",
                                                 "--from-run", "v1")
    assert not (Path(world["models"]) / "n").exists()


def test_taxonomy_diff_names_split_merged_and_added_leaves_of_an_evolved_catalog(
        spark, tmp_path, capsys):
    from hierarchy.cli import main
    from hierarchy.contracts.config import load_config
    from hierarchy.ingest.pipeline import run_ingest
    from hierarchy.synth import generate
    from hierarchy.synth.versions import evolve
    from hierarchy.taxonomy.diff import diff, read_version

    generate(str(tmp_path / "truth"), products=240, seed=9, taxonomy="small", test_products=20,
             workers=1, progress=False)
    changes = evolve(str(tmp_path / "truth"), str(tmp_path / "ev"), seed=2, splits=1,
                     merges=1, new_products=3)
    (a, split_into), = changes["split"].items()
    (m, merged_from), = changes["merged"].items()
    tables = [str(tmp_path / "ev" / v / "category_names.csv") for v in ("v1", "v2")]
    # the tables alone: one JSON object on stdout
    assert main(["taxonomy", "diff", "--old", tables[0], "--new", tables[1]]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    got = json.loads(out[0])
    assert got["job"] == "taxonomy" and got["status"] == "done"
    added = sorted([int(m), *[b for b in split_into if b != int(a)],
                    *changes["added_under_new_node"]])
    assert got["added"] == added and got["removed"] == merged_from
    assert got["renamed"] == [] and got["moved"] == [] and "split" not in got
    # with a dataset of each version: split and merged, from the products in both
    cfg = load_config(overrides=["spark.master=local[2]", "ingest.progress=false"])
    data = []
    for v in ("v1", "v2"):
        data.append(str(tmp_path / f"ds-{v}"))
        run_ingest(spark, cfg, [str(tmp_path / "ev" / v / "train.bson")],
                   str(tmp_path / "ev" / v / "category_names.csv"), data[-1], "train")
    got = diff(read_version(tables[0], "--old"), read_version(
        str(tmp_path / "ds-v2" / "taxonomy.json"), "--new"), spark, *data, min_share=0.05)
    assert got["split"] == {a: split_into} and got["merged"] == {m: merged_from}
    assert got["added"] == added and got["products_compared"] > 0
    for argv, reason in ((["--old-data", data[0]], "--old-data and --new-data go together"),
                         (["--old-data", data[1], "--new-data", data[0]],
                          f"--old-data {data[1]}: ingested under taxonomy version")):
        # refused before Spark starts (the test session's own would be stopped by it)
        assert main(["taxonomy", "diff", "--old", tables[0], "--new", tables[1], *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and reason in err[0], err


def test_negative_flip_rate_counts_a_planted_regression_exactly(spark):
    from hierarchy.evaluate.against import compare

    rng = np.random.default_rng(5)
    n = 400
    pid = np.arange(1000, 1000 + n)
    old_truth = rng.choice([10, 20, 30, 40, 50], n)
    new_truth = old_truth.copy()
    moved = rng.random(n) < 0.1  # relabelled by the new version: leaf 30 -> 25
    new_truth[moved & (old_truth == 30)] = 25
    old_pred = np.where(rng.random(n) < 0.8, old_truth, 10 + (old_truth % 50))
    new_pred = np.where(old_pred == old_truth, new_truth, old_pred)  # the same answers...
    planted = (rng.random(n) < 0.15) & (old_pred == old_truth)
    new_pred[planted] = 10 + (new_truth[planted] % 50)                # ...but these broken
    rows = [("old", int(p), "flat", int(a), int(t)) for p, a, t in zip(pid, old_pred, old_truth)]
    rows += [("new", int(p), "refit", int(a), int(t)) for p, a, t in zip(pid, new_pred,
                                                                         new_truth)]
    df = spark.createDataFrame(rows, "run_id string, product_id long, strategy string, "
                                     "category_id long, true_category_id long")
    from pyspark.sql import functions as F

    df.withColumn("split", F.lit("val")).withColumn("fallback", F.lit(False)) \
      .createOrReplaceTempView("planted_predictions")
    old_tax = Taxonomy.from_rows(V1)
    new_tax = Taxonomy.from_rows([*V1, (25, "A", "A2", "c, split off")])
    got = compare(spark, "planted_predictions", "new", ["refit"], "old", "flat", old_tax,
                  new_tax)
    m = got["strategies"]["refit"]
    same = new_truth == old_truth
    flips = same & (old_pred == old_truth) & (new_pred != new_truth)
    assert flips.sum() > 10 and m["negative_flips"] == int(flips.sum())
    assert m["products_compared"] == int(same.sum()) and m["relabelled"] == int((~same).sum())
    assert m["negative_flip_rate"] == pytest.approx(flips.sum() / same.sum())
    assert m["positive_flips"] == int((same & (old_pred != old_truth) &
                                       (new_pred == new_truth)).sum())
    changed = np.isin(new_truth, [25])
    assert got["changed_leaves"] == [25]
    assert m["changed_leaf_products"] == int(changed.sum())
    assert m["changed_leaf_accuracy"] == pytest.approx(
        (new_pred[changed] == new_truth[changed]).mean())


def test_evaluate_against_the_old_run_reports_the_gate(world, spark, cfg, tmp_path):
    from hierarchy.contracts.config import load_config
    from hierarchy.evaluate.pipeline import run_evaluate
    from hierarchy.infer.modelset import ScoringRefused
    from hierarchy.train.launch import run_training

    out = str(tmp_path / "out")
    # the refit test's run (a re-run of a trained model trains nothing)
    run_training(load_config(overrides=TRAIN), world["data2"], world["models"], "v2", level=3,
                 mode="refit", from_run="v1")
    with pytest.raises(ScoringRefused, match="run v1 was never evaluated"):
        run_evaluate(spark, cfg, world["data2"], world["models"], "v2", out, against="v1")
    run_evaluate(spark, cfg, world["data1"], world["models"], "v1", out)
    got = run_evaluate(spark, cfg, world["data2"], world["models"], "v2", out, against="v1")
    gate = got["metrics"]["against"]
    assert gate["run_id"] == "v1" and gate["strategy"] == "flat"
    m = gate["strategies"]["refit"]
    assert m["products_compared"] > 0 and 0 <= m["negative_flip_rate"] <= 1
    assert m["relabelled"] == 0 and gate["changed_leaves"] == [world["middle"]]
    report = Path(got["files"]["report_md"]).read_text()
    assert "## Against run `v1` (flat" in report
    rows = spark.sql(f"SELECT DISTINCT run_id, taxonomy_version FROM "
                     f"{cfg.catalog.database}.{cfg.catalog.table} WHERE run_id IN ('v1', 'v2')"
                     ).collect()
    from hierarchy.contracts.dataset import Dataset

    assert {(r[0], r[1]) for r in rows} == {
        ("v1", Dataset(world["data1"]).taxonomy().fingerprint),
        ("v2", Dataset(world["data2"]).taxonomy().fingerprint)}


@pytest.mark.parametrize("rows, reason", [
    (["10,A,A1,a", "10,B,B1,a"], "leaf category_id 10 under two parents"),
    (["10,A,A1,a", "10,A,A1,a"], "duplicate category_id 10"),
    (["10,A,,a"], "empty category_level2 for category_id 10"),
])
def test_a_table_that_contradicts_itself_is_refused_by_diff_in_one_line(
        tmp_path, capsys, rows, reason):
    from hierarchy.cli import main

    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    header = "category_id,category_level1,category_level2,category_level3"
    good.write_text(f"{header}\n10,A,A1,a\n")
    bad.write_text("\n".join([header, *rows]) + "\n")
    assert main(["taxonomy", "diff", "--old", str(good), "--new", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and reason in err[0], err


def test_evaluate_refuses_a_run_of_another_version_before_scoring(world, tmp_path):
    from hierarchy.evaluate.pipeline import check_evaluate
    from hierarchy.infer.modelset import ScoringRefused

    # its rules would be certified on v2's val and applied by its predicts on v1
    with pytest.raises(ScoringRefused, match="run v1 is of taxonomy version .*--from-run v1"):
        check_evaluate(world["data2"], world["models"], "v1", str(tmp_path))


def test_a_two_stage_run_takes_over_the_models_the_change_left_alone(world, spark, tmp_path):
    from hierarchy.contracts import storage
    from hierarchy.contracts.config import load_config
    from hierarchy.contracts.dataset import Dataset
    from hierarchy.contracts.modelstore import ModelStore
    from hierarchy.infer.modelset import load_modelset
    from hierarchy.ingest.pipeline import run_ingest
    from hierarchy.train.launch import TrainError, check_training, run_training

    cfg, models = load_config(overrides=TRAIN), world["models"]
    run_training(cfg, world["data1"], models, "two1", level=1)
    run_training(cfg, world["data1"], models, "two1", level=3, mode="branch")
    new = Dataset(world["data2"]).taxonomy()
    changed = int(new.l1_of_l3[new.l3_of_category(world["middle"])])
    got = run_training(cfg, world["data2"], models, "two2", level=1, from_run="two1")
    assert got["level1"]["reused_from"] == {"run_id": "two1", "model": "level1"}
    got = run_training(cfg, world["data2"], models, "two2", level=3, mode="branch",
                       from_run="two1")
    store = ModelStore(models)
    old, run = store.run("two1"), store.run("two2")
    for b in range(new.n_l1):
        key = f"branch/{b}"
        if len(new.branch(b)) < 2:
            continue
        same = storage.file_digest(old.model_file(key)) == storage.file_digest(
            run.model_file(key))
        # only the branch that gained a leaf trained; the others are the old files
        assert same == (b != changed), (key, got[key])
        assert ("reused_from" in got[key]) == (b != changed)
    assert run.metrics(f"branch/{changed}")["output_ids"] == [
        int(new.category_ids[i]) for i in new.branch(changed)]
    refs = load_modelset(models, "two2", "two-stage", new)  # every model checked by its ids
    assert refs.level1 is not None and len(refs.branches) >= 2
    # a new level-1 node: the old level-1 model has no output for it
    lines = world["table"].read_text().splitlines()
    table = tmp_path / "v3.csv"
    table.write_text("\n".join(lines + ["99999999,A NEW FAMILY,A NEW FAMILY / X,leaf"]) + "\n")
    run_ingest(spark, load_config(overrides=["spark.master=local[2]", "ingest.progress=false"]),
               [str(world["root"] / "synth" / "train.bson")], str(table), str(tmp_path / "d3"),
               "train")
    with pytest.raises(TrainError, match="model level1 .*no output for \\(A NEW FAMILY\\)"):
        check_training(cfg, str(tmp_path / "d3"), models, 1, None, None, "two3", "two1")
