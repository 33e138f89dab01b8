"""Predict and evaluate end to end on a tiny synthetic catalog: ingest -> train -> predict."""

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import bson
import numpy as np
import pandas as pd
import pytest
from corrupt import JPEG_OK, split_docs

from hierarchy.contracts import storage
from hierarchy.contracts.config import load_config
from hierarchy.contracts.dataset import Dataset
from hierarchy.contracts.errors import UsageError
from hierarchy.infer import loaded
from hierarchy.infer.modelset import ScoringRefused, load_modelset
from hierarchy.infer.pipeline import read_images, run_predict, score
from hierarchy.infer.scoring import ScoringPlan
from hierarchy.train.launch import run_training

pytestmark = pytest.mark.spark

RUN = "p1"
ALL_BAD_AT_INGEST = 990001    # its only picture is not a JPEG: quarantined, no image row
ALL_BAD_AT_SCORING = 990002   # JPEG markers but no picture: ingested, undecodable later
NINE_PICTURES = 990003        # more pictures than any training product had
# what the world's run (level 1, flat, branches, fusion) can serve, in report order
AVAILABLE = ["flat", "two-stage", "blend", "fusion", "greedy"]


def predict_cfg(tmp_path, extra=(), **predict):
    """The session's metastore is shared: a database per test keeps their tables apart."""
    db = "t_" + re.sub(r"\W", "_", tmp_path.name)
    over = ["spark.master=local[2]", "ingest.progress=false", "predict.progress=false",
            f"catalog.database={db}", *extra]
    return load_config(overrides=over + [f"predict.{k}={v}" for k, v in predict.items()])


@pytest.fixture(scope="module")
def world(tmp_path_factory, spark, cfg):
    """A dataset (train + test, two broken test products) and a run with every model."""
    from hierarchy.ingest.pipeline import run_ingest
    from hierarchy.synth import generate

    root = tmp_path_factory.mktemp("predict")
    syn = root / "syn"
    generate(str(syn), products=300, seed=5, taxonomy="small", test_products=40, workers=1,
             progress=False)
    test_bytes = (syn / "test.bson").read_bytes()
    test_bytes += bson.encode({"_id": ALL_BAD_AT_INGEST, "imgs": [{"picture": b"GIF89a..."}]})
    test_bytes += bson.encode({"_id": ALL_BAD_AT_SCORING, "imgs": [{"picture": JPEG_OK},
                                                                   {"picture": JPEG_OK}]})
    some = bson.decode(split_docs(test_bytes)[0])["imgs"]
    test_bytes += bson.encode({"_id": NINE_PICTURES,
                               "imgs": [some[i % len(some)] for i in range(9)]})
    (syn / "test.bson").write_bytes(test_bytes)
    icfg = load_config(overrides=["spark.master=local[2]", "ingest.progress=false",
                                  "ingest.split_mb=0.4", "ingest.val_fraction=0.2",
                                  "ingest.max_bad_fraction=0.1"])
    data = root / "ds"
    for kind in ("train", "test"):
        run_ingest(spark, icfg, [str(syn / f"{kind}.bson")], str(syn / "category_names.csv"),
                   str(data), kind)
    tcfg = load_config(overrides=[
        "train.backbone=small_cnn", "train.image_size=48", "train.batch_size=16",
        "train.learning_rate=0.003", "train.warmup_epochs=0", "train.shuffle_buffer=256",
        "train.reader_workers=1", "train.augment=false", "train.epochs=3",
        "train.fusion_epochs=3"])
    models = str(root / "models")
    run_training(tcfg, str(data), models, RUN, level=1)
    run_training(tcfg, str(data), models, RUN, level=3, mode="flat")
    run_training(tcfg, str(data), models, RUN, level=3, mode="branch")
    run_training(tcfg, str(data), models, RUN, level=3, mode="fusion")
    n_test = len(split_docs(test_bytes))
    return {"root": root, "syn": syn, "data": str(data), "models": models, "n_test": n_test}


def test_two_stage_submission_has_one_row_per_test_product_and_the_table_answers_sql(
        world, spark, tmp_path):
    out = tmp_path / "out"
    pcfg = predict_cfg(tmp_path)
    res = run_predict(spark, pcfg, world["data"], world["models"], RUN, "test", "two-stage",
                      str(out))
    sub = pd.read_csv(out / "submission.csv")
    assert list(sub.columns) == ["_id", "category_id"]
    assert len(sub) == world["n_test"] == res["products"] and sub["_id"].is_unique
    assert sub["_id"].is_monotonic_increasing
    tax = Dataset(world["data"]).taxonomy()
    assert set(sub["category_id"]) <= set(tax.category_ids)

    table = res["table"]
    row = spark.sql(f"SELECT count(*) AS n, sum(CAST(fallback AS INT)) AS fb, "
                    f"min(size(top5)) AS k FROM {table} WHERE run_id = '{RUN}' "
                    f"AND split = 'test' AND strategy = 'two-stage'").first()
    assert (row.n, row.fb, row.k) == (world["n_test"], 2, 1)  # fallbacks have one candidate
    scored = spark.sql(f"SELECT top5, confidence, category_id, level1_probability FROM {table}"
                       f" WHERE NOT fallback").toPandas()
    for _, r in scored.iterrows():
        probs = [c["probability"] for c in r.top5]
        assert probs == sorted(probs, reverse=True) and r.top5[0]["category_id"] == r.category_id
        assert r.confidence == pytest.approx(probs[0]) and sum(probs) <= 1 + 1e-9
        assert r.level1_probability >= r.confidence - 1e-9  # the leaf's branch holds its mass

    # a re-run replaces its own partition: same rows, no duplicates
    run_predict(spark, pcfg, world["data"], world["models"], RUN, "test", "two-stage", str(out))
    assert spark.sql(f"SELECT count(*) FROM {table} WHERE run_id = '{RUN}'").first()[0] == \
        world["n_test"]


def test_products_without_a_usable_picture_still_get_a_flagged_row(world, spark, tmp_path):
    res = run_predict(spark, predict_cfg(tmp_path), world["data"], world["models"], RUN,
                      "test", "flat", str(tmp_path / "out"))
    rows = spark.table(res["table"]).where(
        f"product_id IN ({ALL_BAD_AT_INGEST}, {ALL_BAD_AT_SCORING})").toPandas() \
        .set_index("product_id")
    assert rows["fallback"].all()
    # the training prior: the most frequent category among training products
    products = pd.read_parquet(f"{world['data']}/products/kind=train")
    prior = products[products.split == "train"].category_id.value_counts()
    assert set(rows["category_id"]) == {int(prior.index[0])}
    assert rows.loc[ALL_BAD_AT_SCORING, "bad_image_count"] == 2
    assert rows.loc[ALL_BAD_AT_SCORING, "image_count"] == 0
    assert res["fallback"] == 2 and res["bad_images"] >= 2


@pytest.mark.parametrize("strategy", ["two-stage", "fusion"])
def test_a_product_spread_over_partitions_and_batches_is_aggregated_once(world, spark, cfg,
                                                                         strategy):
    """fusion: the weights of a product's pictures add up across batches as they do within."""
    tax = Dataset(world["data"]).taxonomy()
    models = load_modelset(world["models"], RUN, strategy, tax)
    plan = ScoringPlan(models=models, taxonomy_json=tax.to_json(),
                       prior_category_id=tax.category_ids[0], prior_share=0.1,
                       params=(("top_branches", 0), ("blend_weight", 0.5)),
                       aggregate="log_mean", tta_flip=False, top_n=5,
                       threads=0)
    images = read_images(spark, world["data"], "val")
    per_product = images.groupBy("product_id").count().toPandas().set_index("product_id")
    assert (per_product["count"] > 1).any()
    # round-robin spreads a product's pictures over partitions; 3-row Arrow batches split it
    spread = images.repartition(5)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "3")
    try:
        many = score(spread, {strategy: plan}, partitions=3).toPandas() \
            .set_index("product_id")
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "10000")
        one = score(images.coalesce(1), {strategy: plan}, partitions=1).toPandas() \
            .set_index("product_id")
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    assert many.index.is_unique and len(many) == len(per_product)
    assert (many["image_count"] == per_product.loc[many.index, "count"]).all()
    # same answer whatever the partitioning (k = all: the exact P(l1) * P(l3 | l1))
    np.testing.assert_allclose(many.loc[one.index, "confidence"], one["confidence"], rtol=1e-5)
    assert (many.loc[one.index, "category_id"] == one["category_id"]).all()


def _ingest_test_under(spark, world, tmp_path, csv_lines, name):
    from hierarchy.ingest.pipeline import run_ingest

    table = tmp_path / f"{name}.csv"
    table.write_text("\n".join(csv_lines) + "\n")
    data = tmp_path / name
    icfg = load_config(overrides=["spark.master=local[2]", "ingest.progress=false",
                                  "ingest.max_bad_fraction=0.1"])
    for kind in ("train", "test"):
        run_ingest(spark, icfg, [str(world["syn"] / f"{kind}.bson")], str(table), str(data),
                   kind)
    return str(data)


def test_a_model_whose_outputs_this_version_changed_is_refused_by_name(world, spark, tmp_path):
    csv = (world["syn"] / "category_names.csv").read_text().splitlines()
    ids = sorted(int(line.split(",")[0]) for line in csv[1:])
    middle = next(c for c in range(ids[0] + 1, ids[-1]) if c not in ids)
    l1, l2 = csv[1].split(",")[1:3]
    data = _ingest_test_under(spark, world, tmp_path, csv + [f"{middle},{l1},{l2},New leaf"],
                              "added")
    # a leaf added in the middle of the id range: the flat model has no output for it
    with pytest.raises(ScoringRefused, match=rf"model flat .*no output for \({middle}\)"):
        run_predict(spark, predict_cfg(tmp_path), data, world["models"], RUN,
                    "test", "flat", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # refused before anything was scored or written


def test_a_renamed_leaf_keeps_its_identity_and_its_models(world, spark, tmp_path):
    csv = (world["syn"] / "category_names.csv").read_text().splitlines()
    renamed = int(csv[1].split(",")[0])
    csv[1] = csv[1].rsplit(",", 1)[0] + ",Renamed leaf"
    data = _ingest_test_under(spark, world, tmp_path, csv, "renamed")
    pcfg = predict_cfg(tmp_path)
    same = run_predict(spark, pcfg, world["data"], world["models"], RUN, "test", "flat",
                       str(tmp_path / "same"))
    other = run_predict(spark, pcfg, data, world["models"], RUN, "test", "flat",
                        str(tmp_path / "other"))
    assert same["products"] == other["products"]
    a = pd.read_csv(tmp_path / "same" / "submission.csv").set_index("_id")
    b = pd.read_csv(tmp_path / "other" / "submission.csv").set_index("_id")
    # a leaf is its category_id: the same model answers the same ids under the new table
    assert (a.loc[b.index, "category_id"] == b["category_id"]).all()
    names = spark.sql(f"SELECT DISTINCT category_level3 FROM {pcfg.catalog.database}."
                      f"{pcfg.catalog.table} WHERE category_id = {renamed}").collect()
    assert names, "the renamed leaf was never predicted: pick a run that files it"


def test_duplicated_product_ids_are_refused_before_scoring_naming_the_ids(
        world, spark, tmp_path, monkeypatch):
    from hierarchy.infer import pipeline

    # a dataset ingested before duplicate ids were quarantined at ingest
    data = tmp_path / "ds"
    shutil.copytree(world["data"], data)
    part = sorted((data / "products" / "kind=test").glob("part-*.parquet"))[0]
    shutil.copy(part, part.with_name("part-99999.parquet"))
    ids = sorted(pd.read_parquet(part).product_id)[:3]
    # (such a manifest lists no parts; its counts include the duplicates, as such an ingest
    # counted them, so the integrity check has nothing to say)
    manifest = json.loads((data / "manifest.json").read_text())
    for entry in manifest["kinds"].values():
        entry.pop("parts", None)
    manifest["kinds"]["test"]["counts"]["products"] += len(pd.read_parquet(part))
    (data / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(pipeline, "score",
                        lambda *a, **k: pytest.fail("scored before the duplicate check"))
    with pytest.raises(ScoringRefused, match=r"product id\(s\) appear more than once \(e\.g\. "
                                           + ", ".join(map(str, ids))):
        run_predict(spark, predict_cfg(tmp_path), str(data), world["models"], RUN, "test",
                    "flat", str(tmp_path / "out"))


def test_the_submission_check_names_the_offending_ids(spark):
    from hierarchy.infer.tables import check_submission_rows

    products = spark.createDataFrame([(1,), (2,), (3,), (4,)], "product_id long")
    sub = spark.createDataFrame([(1, 10), (1, 10), (2, 10), (9, 10)],
                                "_id long, category_id long")
    with pytest.raises(ScoringRefused, match=r"4 rows for 4 products: 1 duplicated \(e\.g\. 1\);"
                                           r" 2 missing \(e\.g\. 3, 4\); 1 unknown \(e\.g\. 9\);"
                                           r" nothing was published"):
        check_submission_rows(sub, products)
    assert check_submission_rows(sub.limit(0).union(spark.createDataFrame(
        [(i, 10) for i in (1, 2, 3, 4)], "_id long, category_id long")), products) == (4, 4)


def test_two_outputs_fill_one_table_that_lists_and_drops_runs(world, spark, tmp_path):
    """--output holds the submission and reports only: two predicts into two folders land in
    one table inside the warehouse, as partitions a run can be listed and dropped by."""
    from hierarchy.infer import tables

    pcfg = predict_cfg(tmp_path)
    a = run_predict(spark, pcfg, world["data"], world["models"], RUN, "test", "flat",
                    str(tmp_path / "a"))
    b = run_predict(spark, pcfg, world["data"], world["models"], RUN, "val", "flat",
                    str(tmp_path / "b"))
    assert a["table"] == b["table"] and a["table_path"] == b["table_path"]
    db_location = spark.catalog.getDatabase(pcfg.catalog.database).locationUri
    assert a["table_path"] == "file://" + db_location[len("file:"):].rstrip("/") + "/predictions"
    assert (tmp_path / "a" / "submission.csv").exists()
    assert not (tmp_path / "a" / "predictions").exists()
    runs = {(r["split"], r["strategy"]): r for r in tables.list_runs(spark, pcfg.catalog)}
    assert set(runs) == {("test", "flat"), ("val", "flat")}
    assert runs["test", "flat"]["products"] == world["n_test"]
    assert runs["test", "flat"]["accuracy_l3"] is None       # no truth on test
    assert 0 <= runs["val", "flat"]["accuracy_l3"] <= 1
    assert runs["val", "flat"]["products"] == b["products"]

    would = tables.drop_runs(spark, pcfg.catalog, RUN, "val", dry_run=True)
    assert [(r["split"], r["strategy"]) for r in would] == [("val", "flat")]
    assert len(tables.list_runs(spark, pcfg.catalog)) == 2   # a dry run drops nothing
    dropped = tables.drop_runs(spark, pcfg.catalog, RUN, "val")
    assert [(r["split"], r["strategy"]) for r in dropped] == [("val", "flat")]
    left = tables.list_runs(spark, pcfg.catalog)
    assert [(r["split"], r["products"]) for r in left] == [("test", world["n_test"])]
    table_dir = a["table_path"][len("file://"):]
    assert (Path(table_dir) / f"run_id={RUN}" / "split=test").is_dir()
    assert not (Path(table_dir) / f"run_id={RUN}" / "split=val").exists()
    assert tables.drop_runs(spark, pcfg.catalog, RUN, "val") == []  # twice: nothing to do
    with pytest.raises(UsageError, match="--strategy needs --split"):
        tables.drop_runs(spark, pcfg.catalog, RUN, None, "flat")


def test_a_table_registered_elsewhere_than_the_config_says_is_refused(world, spark, tmp_path):
    pcfg = predict_cfg(tmp_path)
    run_predict(spark, pcfg, world["data"], world["models"], RUN, "val", "flat",
                str(tmp_path / "a"))
    pcfg = predict_cfg(tmp_path, [f"catalog.location={tmp_path / 'elsewhere'}"])
    with pytest.raises(ScoringRefused, match="catalog.location"):
        run_predict(spark, pcfg, world["data"], world["models"], RUN, "val", "flat",
                    str(tmp_path / "a"))


def test_a_table_registered_outside_the_warehouse_is_refused_until_relocated(world, spark,
                                                                             tmp_path):
    """A data root copied with its metastore: the copy's catalog still registers the table in
    the original project. Predict refuses to write there (naming both places) and leaves the
    original's files as they were; `runs relocate` registers the copy's own files."""
    from hierarchy.infer import tables

    original = tmp_path / "original" / "predictions"
    pcfg = predict_cfg(tmp_path, [f"catalog.location={original}"])
    run_predict(spark, pcfg, world["data"], world["models"], RUN, "val", "flat",
                str(tmp_path / "a"))
    before = {p: p.read_bytes() for p in original.rglob("*.parquet")}
    assert before
    copy = predict_cfg(tmp_path)  # catalog.location empty: the table belongs in the warehouse
    with pytest.raises(ScoringRefused, match=r"outside catalog.warehouse .*runs relocate") as e:
        run_predict(spark, copy, world["data"], world["models"], RUN, "val", "flat",
                    str(tmp_path / "b"))
    assert str(original) in str(e.value)
    assert {p: p.read_bytes() for p in original.rglob("*.parquet")} == before
    target = tables.configured_location(spark, copy.catalog)
    assert storage.within(target, tables.warehouse(spark))
    with pytest.raises(ScoringRefused, match="nothing at"):
        tables.relocate(spark, copy.catalog)
    shutil.copytree(original, target[len("file://"):])   # the copy's own files
    old, new = tables.relocate(spark, copy.catalog, dry_run=True)
    assert storage.same_location(old, str(original)) and new == target
    assert tables.table_location(spark, pcfg.catalog) == storage.to_url(str(original))
    tables.relocate(spark, copy.catalog)
    assert [r["products"] for r in tables.list_runs(spark, copy.catalog)] == \
        [len(spark.read.parquet(str(original)).collect())]
    got = run_predict(spark, copy, world["data"], world["models"], RUN, "val", "flat",
                      str(tmp_path / "b"), rescore_all=True)
    assert got["table_path"] == target
    assert {p: p.read_bytes() for p in original.rglob("*.parquet")} == before


def test_two_stage_refuses_a_run_without_its_branch_models(world, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(world["models"], models, ignore=shutil.ignore_patterns("mlruns"))
    shutil.rmtree(models / RUN / "branch" / "1")
    with pytest.raises(ScoringRefused, match="--mode branch --branches 1"):
        load_modelset(str(models), RUN, "two-stage", Dataset(world["data"]).taxonomy())


def test_evaluate_scores_every_strategy_and_writes_the_report(world, spark, tmp_path):
    """Every strategy the run can serve, and a variant of one beside it (its own parameters,
    rule and rows); predict then takes the variant by name from what run.json recorded."""
    from hierarchy.evaluate.pipeline import run_evaluate
    from hierarchy.infer.modelset import resolve_strategy
    from hierarchy.infer.pipeline import check_predict, run_scoring

    models = str(tmp_path / "models")
    shutil.copytree(world["models"], models, ignore=shutil.ignore_patterns("mlruns"))
    # two-stage at one branch, and flat under a name of its own (a variant setting nothing)
    variant = "variants={two-stage-k1: {strategy: two-stage, top_branches: 1}, plain: " \
        "{strategy: flat}}"
    # at temperature 1 a product's distribution keeps its branches' mass as scored
    res = run_evaluate(spark, predict_cfg(tmp_path, extra=[variant, "decide.temperature=1"]),
                       world["data"], models, RUN, str(tmp_path / "out"))
    assert res["strategies"] == [*AVAILABLE, "plain", "two-stage-k1"]
    report = json.loads((tmp_path / "out" / "evaluation" / RUN / "report.json").read_text())
    for name in res["strategies"]:
        m = report["strategies"][name]
        assert m["accuracy_l1"] > 0.5, (name, m)  # four level-1 classes: chance is 0.25
        assert m["accuracy_l1"] >= m["accuracy_l3"]
        assert "decisions" in m  # each its own rule
    md = (tmp_path / "out" / "evaluation" / RUN / "report.md").read_text()
    assert "two-stage" in md and "flat" in md and "two-stage-k1" in md
    assert (tmp_path / "out" / "evaluation" / RUN / "training_curves.png").stat().st_size > 0
    run_json = json.loads((Path(models) / RUN / "run.json").read_text())
    assert run_json["variants"] == {"two-stage-k1": {"strategy": "two-stage", "top_branches": 1},
                                    "plain": {"strategy": "flat"}}
    assert set(run_json["decisions"]) == set(res["strategies"])

    assert resolve_strategy(models, RUN, "plain").strategy == "flat"
    spec = resolve_strategy(models, RUN, "two-stage-k1")  # no configuration names it now
    assert spec.params == (("top_branches", 1),)
    with pytest.raises(UsageError, match="strategy 'two-stage-k2': expected one of auto, "):
        resolve_strategy(models, RUN, "two-stage-k2")
    pcfg = predict_cfg(tmp_path)
    checked = check_predict(world["data"], models, RUN, "test", spec, str(tmp_path / "out"))
    run_scoring(spark, pcfg, world["data"], models, RUN, "test", {spec.name: checked},
                str(tmp_path / "out"))
    rows = spark.sql(f"SELECT level1_probability, fallback FROM {pcfg.catalog.database}"
                     f".predictions WHERE strategy = 'two-stage-k1' AND split = 'test'"
                     ).toPandas()
    assert len(rows) == world["n_test"]
    # one branch expanded, renormalised: the variant's parameter, not predict.top_branches
    # (3, whose products keep their runner-up branches' mass)
    assert (rows.loc[~rows.fallback, "level1_probability"] > 1 - 1e-4).all()
    three = spark.sql(f"SELECT level1_probability FROM {pcfg.catalog.database}.predictions "
                      f"WHERE strategy = 'two-stage' AND split = 'val' AND NOT fallback"
                      ).toPandas()
    assert (three.level1_probability < 1 - 1e-4).any()


def test_decisions_agree_in_the_table_the_report_and_the_served_answer(world, spark, tmp_path,
                                                                       caplog):
    """evaluate fits each strategy's rule on val and writes val rows with it; the table's
    decision counts are the report's, the served answer is the table's, product by product,
    and predict of test fills the decision columns and the review queue. A lenient target
    (0.5 at confidence 0.8: 3 filed products suffice) so that ~30 calibration products can
    certify something."""
    from hierarchy.evaluate.pipeline import run_evaluate
    from hierarchy.serve.classifier import Classifier, Product

    over = ["decide.target_precision=0.5", "decide.confidence=0.8",
            "decide.calibration_share=0.6"]
    cfg = predict_cfg(tmp_path, extra=over)
    models = str(tmp_path / "models")
    shutil.copytree(world["models"], models)
    run_file = Path(models) / RUN / "run.json"  # another test may have evaluated the run
    run_file.write_text(json.dumps({k: v for k, v in json.loads(run_file.read_text()).items()
                                    if k != "decisions"}))
    # a run without a rule: predict says so in one line and leaves the columns null
    with caplog.at_level(logging.WARNING):
        res = run_predict(spark, cfg, world["data"], models, RUN, "test", "flat",
                          str(tmp_path / "out"))
    assert res["decisions"] is None
    assert "has no decision rule for strategy flat" in caplog.text
    assert "hierarchy evaluate --data" in caplog.text
    res = run_evaluate(spark, cfg, world["data"], models, RUN, str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "evaluation" / RUN / "report.json").read_text())
    run_json = json.loads((Path(models) / RUN / "run.json").read_text())
    d = report["strategies"]["flat"]["decisions"]
    assert run_json["decisions"]["flat"]["threshold"] == d["threshold"] is not None, d["reason"]
    assert d["calibration_products"] > 10 and d["fit_products"] > 5
    assert (tmp_path / "out" / "evaluation" / RUN / "risk_coverage.png").stat().st_size > 0
    assert "## Decisions" in (tmp_path / "out" / "evaluation" / RUN / "report.md").read_text()
    table = spark.table(f"{cfg.catalog.database}.predictions").where(
        f"run_id = '{RUN}' AND split = 'val' AND strategy = 'flat'").toPandas()
    scored = table[~table["fallback"]]
    for level in ("3", "2", "1"):
        assert (scored["decision_level"] == int(level)).sum() == \
            d["all"]["per_level"][level]["filed"], level
    filed = scored[scored["decision_level"] > 0]
    assert len(filed) and (filed["decision_probability"] >= d["threshold"]).all()
    assert (scored[scored["decision_level"] == 0]["decision_probability"].isna()).all()
    # the served answer is the table's row, decision included
    classifier = Classifier(cfg, models, RUN, strategy="flat")
    classifier.load()
    images = read_images(spark, world["data"], "val").toPandas().sort_values(
        ["product_id", "img_idx"])
    some = list(images.groupby("product_id"))[:15]
    answers = classifier.classify([Product(str(pid), classifier.decode(list(g["jpeg"])))
                                   for pid, g in some])
    rows = table.set_index("product_id")
    for got in answers:
        row = rows.loc[int(got["id"])]
        assert got["decision"]["level"] == row["decision_level"]
        if row["decision_level"] > 0:
            assert got["decision"]["name"] == row["decision_name"]
            assert got["decision"]["id"] == row["decision_id"]
            assert abs(got["decision"]["probability"] - row["decision_probability"]) < 1e-6
            assert got["decision"]["text"].startswith("filed under ")
        else:
            assert got["decision"]["text"] == "needs review"
    # test: the decision columns filled, the review queue holds what is not filed at a leaf
    res = run_predict(spark, cfg, world["data"], models, RUN, "test", "flat",
                      str(tmp_path / "out"))
    assert sum(res["decisions"].values()) == res["products"]
    queue = spark.table(f"{cfg.catalog.database}.review_queue").where(
        f"run_id = '{RUN}' AND split = 'test' AND strategy = 'flat'").toPandas()
    assert len(queue) == res["products"] - res["decisions"]["3"]
    assert list(queue["review_priority"]) == sorted(queue["review_priority"], reverse=True)


def test_fusion_weighs_every_picture_in_the_table_and_the_served_answer(world, spark,
                                                                         tmp_path):
    """The fusion model's table rows and served answers come from one pooling: the same
    distribution for the same pictures; a product with nine pictures (training saw at most
    four) is answered from all nine, and one with none usable still gets the prior."""
    from hierarchy.serve.classifier import Classifier, Product

    cfg = predict_cfg(tmp_path)
    res = run_predict(spark, cfg, world["data"], world["models"], RUN, "test", "fusion",
                      str(tmp_path / "out"))
    rows = spark.table(res["table"]).where(
        f"run_id = '{RUN}' AND split = 'test' AND strategy = 'fusion'").toPandas() \
        .set_index("product_id")
    assert len(rows) == world["n_test"] and res["fallback"] == 2
    nine = rows.loc[NINE_PICTURES]
    assert nine["image_count"] == 9 and not nine["fallback"]
    assert rows.loc[[ALL_BAD_AT_INGEST, ALL_BAD_AT_SCORING], "fallback"].all()
    classifier = Classifier(cfg, world["models"], RUN, strategy="fusion")
    classifier.load()
    images = read_images(spark, world["data"], "test").toPandas().sort_values(
        ["product_id", "img_idx"])
    groups = [(pid, g) for pid, g in images.groupby("product_id")
              if pid not in (ALL_BAD_AT_INGEST, ALL_BAD_AT_SCORING)]
    chosen = groups[:10] + [g for g in groups if g[0] == NINE_PICTURES]
    answers = classifier.classify([Product(str(pid), classifier.decode(list(g["jpeg"])))
                                   for pid, g in chosen])
    for got in answers:
        row = rows.loc[int(got["id"])]
        assert got["pictures"] == row["image_count"]
        assert [c["category_id"] for c in got["top"]] == \
            [int(c["category_id"]) for c in row["top5"]][:len(got["top"])]
        assert abs(got["confidence"] - row["confidence"]) <= 1e-5


def test_calibration_scores_the_pictures_predict_scores(world, spark):
    """evaluate fits the hierarchical strategy on val, then predict scores val with the
    fitted point: the fit's hits and NLL must be predict's own, picture for picture. The
    synthetic pictures are 180 px and the model's input 48 px, so predict decodes them at a
    DCT scale: a calibration that decoded them whole fitted on other pixels (the e2e run saw
    0.4 fitted and 0.2 scored for one point)."""
    from dataclasses import replace

    from hierarchy.evaluate import calibrate
    from hierarchy.infer.pipeline import by_product

    run = "p1multi"
    tcfg = load_config(overrides=[
        "train.backbone=small_cnn", "train.image_size=48", "train.batch_size=16",
        "train.warmup_epochs=0", "train.shuffle_buffer=256", "train.reader_workers=1",
        "train.augment=false", "train.epochs=2"])
    run_training(tcfg, world["data"], world["models"], run, level=3, mode="multi")
    tax = Dataset(world["data"]).taxonomy()
    grid = calibrate.correction_grid([0.75], [0.5], [0.25])  # the identity, then one point
    modelset = load_modelset(world["models"], run, "hierarchical", tax)
    plan = dict(taxonomy_json=tax.to_json(), prior_category_id=tax.category_ids[0],
                prior_share=0.1,
                params=(("top_branches", 0), ("blend_weight", 0.5)), aggregate="log_mean",
                tta_flip=False, top_n=tax.n_l3, threads=0)  # top_n: every leaf's probability
    images = read_images(spark, world["data"], "val")
    fit = ScoringPlan(models=calibrate.modelset_for_calibration(modelset), **plan)
    stats = (by_product(images, 2).mapInPandas(calibrate.calibration_partitions(fit, grid),
                                               calibrate.STATS_DDL).collect())
    hits = np.sum([r.hits for r in stats], axis=0)
    nlls = np.sum([r.nll for r in stats], axis=0)
    assert sum(r.products for r in stats) > 5
    for g, (t, w, v) in enumerate(grid):
        point = {"temperature": t, "w": w, "v": v}
        scored = ScoringPlan(models=replace(modelset, calibration=point), **plan)
        rows = score(images, {"hierarchical": scored}, 2).toPandas()
        rows = rows[~rows["fallback"]]
        assert len(rows) == sum(r.products for r in stats)
        truth = [dict(zip(ids, probs))[true_id] for ids, probs, true_id in
                 zip(rows["top_category_id"], rows["top_probability"], rows["true_category_id"])]
        assert hits[g] == (rows["l3"] == rows["true_l3"]).sum(), point
        np.testing.assert_allclose(nlls[g], -np.log(np.maximum(truth, 1e-7)).sum(), rtol=1e-4,
                                   err_msg=str(point))


def test_flip_averaging_and_a_gzipped_submission(world, spark, tmp_path):
    import gzip

    from hierarchy.infer.scoring import BatchScorer

    tax = Dataset(world["data"]).taxonomy()
    models = load_modelset(world["models"], RUN, "blend", tax)
    plan = dict(models=models, taxonomy_json=tax.to_json(),
                prior_category_id=tax.category_ids[0], prior_share=0.1,
                params=(("top_branches", 2), ("blend_weight", 0.3)), aggregate="mean", top_n=5,
                threads=0)
    jpegs = read_images(spark, world["data"], "val").limit(6).toPandas()["jpeg"]
    plain = BatchScorer(ScoringPlan(tta_flip=False, **plan))
    images = plain.decode(jpegs)
    own = np.arange(len(images))  # each picture its own product
    p = plain.probs(images, own)
    tta = BatchScorer(ScoringPlan(tta_flip=True, **plan)).probs(images, own)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(tta.sum(axis=1), 1.0, atol=1e-6)
    assert not np.allclose(tta, p)  # the mirrored pictures changed something
    # blend is linear in the flat part; two-stage is not, so only the flat model's share can be
    # checked in closed form: with weight 0 blend is flat, and flat TTA is the mean
    flat_plan = dict(plan, params=(("top_branches", 2), ("blend_weight", 0.0)))
    f_plain = BatchScorer(ScoringPlan(tta_flip=False, **flat_plan))
    expected = 0.5 * (f_plain.probs(images, own)
                      + f_plain.probs([im[:, ::-1, :] for im in images], own))
    got = BatchScorer(ScoringPlan(tta_flip=True, **flat_plan)).probs(images, own)
    np.testing.assert_allclose(got, expected, atol=1e-6)

    out = tmp_path / "out"
    cfg = predict_cfg(tmp_path, tta_flip="true", submission_gzip="true")
    res = run_predict(spark, cfg, world["data"], world["models"], RUN, "test", "flat", str(out))
    assert res["submission"].endswith("submission.csv.gz") and not (out / "submission.csv").exists()
    with gzip.open(out / "submission.csv.gz", "rt") as fh:
        sub = pd.read_csv(fh)
    assert list(sub.columns) == ["_id", "category_id"] and len(sub) == world["n_test"]


def test_a_table_location_with_a_quote_a_space_and_accents_is_quoted_in_sql(world, spark,
                                                                           tmp_path):
    """The table's LOCATION is written into SQL text: a folder named like a real team's
    ("l'équipe data") used to end the statement early."""
    from hierarchy.curate.pipeline import _register
    from hierarchy.infer.tables import drop_runs, list_runs

    place = tmp_path / "l'équipe data 2026"
    pcfg = predict_cfg(tmp_path, extra=[f"catalog.location={place / 'predictions'}"])
    with pytest.raises(UsageError, match="without a backslash"):  # Hadoop's, in the config
        predict_cfg(tmp_path, extra=[f"catalog.location={tmp_path}/a\\b"])
    res = run_predict(spark, pcfg, world["data"], world["models"], RUN, "test", "flat",
                      str(tmp_path / "out"))
    assert res["table_path"].endswith("predictions") and "équipe" in res["table_path"]
    # a second write registers its partition in the existing table (another statement)
    run_predict(spark, pcfg, world["data"], world["models"], RUN, "test", "fusion",
                str(tmp_path / "out"))
    assert {r["strategy"] for r in list_runs(spark, pcfg.catalog, RUN)} == {"flat",
                                                                               "fusion"}
    assert drop_runs(spark, pcfg.catalog, RUN, "test", "flat")
    assert spark.table(res["table"]).count() == res["products"]
    # curate's tables go through the same quoting
    spark.range(3).write.parquet(str(place / "curation"))
    full = _register(spark, pcfg.catalog, "curation_q", str(place / "curation"), False)
    assert spark.table(full).count() == 3


def test_one_pass_scores_every_strategy_as_each_alone_and_each_model_once(world, spark,
                                                                          monkeypatch):
    """Evaluate scores every strategy of a run in one pass: flat, two-stage and blend share
    the flat and level-1 models and the branch models' rows. Each strategy's rows are those
    it gives scored alone, to the last digit, and each model runs once per batch."""
    from hierarchy.infer import scoring
    from hierarchy.infer.modelset import available_strategies

    tax = Dataset(world["data"]).taxonomy()
    strategies = available_strategies(world["models"], RUN)
    assert {"flat", "two-stage", "blend", "fusion"} <= set(strategies)
    plans = {s: ScoringPlan(models=load_modelset(world["models"], RUN, s, tax),
                            taxonomy_json=tax.to_json(), prior_category_id=tax.category_ids[0],
                            prior_share=0.1,
                            params=(("top_branches", 2), ("blend_weight", 0.5)),
                            aggregate="log_mean",
                            tta_flip=False, top_n=5, threads=1) for s in strategies}
    images = read_images(spark, world["data"], "test").toPandas() \
        .sort_values(["product_id", "img_idx"]).reset_index(drop=True)
    batches = [images.iloc[i:i + 16] for i in range(0, len(images), 16)]
    calls: dict = {}
    real = scoring.BatchScorer._outputs

    def counted(self, ref, x, cache, input_key):
        # a model and the pictures asked of it (a branch model serves two-stage's expanded
        # pictures and greedy's one branch per product: two sets)
        key = (ref.path, input_key[-1])
        calls[key] = calls.get(key, 0) + 1
        return real(self, ref, x, cache, input_key)

    trunk_runs: dict = {}
    real_functions = loaded._functions

    def counted_trunk(ref):
        trunk, head = real_functions(ref)
        key = loaded.trunk_key(ref)

        def run(x):
            trunk_runs[key] = trunk_runs.get(key, 0) + 1
            return trunk(x)

        return (None if trunk is None else run), head

    monkeypatch.setattr(scoring.BatchScorer, "_outputs", counted)
    monkeypatch.setattr(loaded, "_functions", counted_trunk)
    together = pd.concat(list(scoring.score_partitions(plans)(iter(batches))))
    once, trunk_once = dict(calls), dict(trunk_runs)
    assert max(once.values()) <= len(batches), once  # per batch, whatever reads them
    for s in strategies:
        calls.clear()
        alone = pd.concat(list(scoring.score_partitions({s: plans[s]})(iter(batches))))
        mine = together[together["strategy"] == s]
        pd.testing.assert_frame_equal(mine.sort_values("product_id").reset_index(drop=True),
                                      alone.sort_values("product_id").reset_index(drop=True),
                                      check_exact=True)
        assert mine["product_id"].is_unique
    flat = load_modelset(world["models"], RUN, "flat", tax).flat.path
    assert once[(flat, None)] == len(batches)  # flat, blend and others read it: once a batch
    # fusion sits on flat's trunk: its pictures' features are computed once for both
    fusion = load_modelset(world["models"], RUN, "fusion", tax).head
    assert loaded.trunk_key(fusion) == loaded.trunk_key(
        load_modelset(world["models"], RUN, "flat", tax).flat)
    assert trunk_once[loaded.trunk_key(fusion)] == len(batches), trunk_once


def test_evaluate_makes_predicts_rows_from_one_pass_with_no_second_model_run(world, spark,
                                                                           monkeypatch):
    """Evaluate scores val once: the pass sums each strategy's decision statistics and keeps
    what its rows are made of at every grid temperature; once the rules are fitted, the rows
    come from those summaries with no model run. They are the rows predict's scorer gives
    with the same rules, to the last digit (a product no picture of which decodes
    included), and the statistics are those of each batch's products scored alone."""
    from collections import namedtuple

    from hierarchy.evaluate import decisions
    from hierarchy.infer import decide, scoring
    from hierarchy.infer.modelset import available_strategies

    tax = Dataset(world["data"]).taxonomy()
    strategies = available_strategies(world["models"], RUN)
    plans = {s: ScoringPlan(models=load_modelset(world["models"], RUN, s, tax),
                            taxonomy_json=tax.to_json(), prior_category_id=tax.category_ids[0],
                            prior_share=0.1,
                            params=(("top_branches", 2), ("blend_weight", 0.5)),
                            aggregate="log_mean",
                            tta_flip=False, top_n=5, threads=1) for s in strategies}
    val = read_images(spark, world["data"], "val").toPandas()
    broken = read_images(spark, world["data"], "test").toPandas()
    broken = broken[broken["product_id"] == ALL_BAD_AT_SCORING].assign(
        category_id=tax.category_ids[0], l1=0, l2=0, l3=0)
    images = pd.concat([val, broken]).sort_values(["product_id", "img_idx"]) \
        .reset_index(drop=True)
    images["part"] = (images["product_id"] % 3 == 0).astype(int)
    batches = [images.iloc[i:i + 16].reset_index(drop=True) for i in range(0, len(images), 16)]
    dcfg = load_config(overrides=["decide.target_precision=0.6",
                                  "decide.confidence=0.8"]).decide
    grids = decisions.grids_of(dcfg)
    calls: dict = {}
    real = scoring.BatchScorer._outputs

    def counted(self, ref, x, cache, input_key):
        # a model and the pictures asked of it (a branch model serves two-stage's expanded
        # pictures and greedy's one branch per product: two sets)
        key = (ref.path, input_key[-1])
        calls[key] = calls.get(key, 0) + 1
        return real(self, ref, x, cache, input_key)

    monkeypatch.setattr(scoring.BatchScorer, "_outputs", counted)
    out = pd.concat(list(decisions.evaluation_partitions(plans, grids, dcfg.levels)(
        iter(batches))), ignore_index=True)
    assert max(calls.values()) <= len(batches), calls  # each model and pictures once a batch
    summaries, stat_rows = out[out["product_id"].notna()], out[out["product_id"].isna()]
    assert sorted(stat_rows["strategy"]) == sorted(strategies)
    # the statistics: each batch's products scored alone, as the rule fit always summed them
    expected = {s: decide.empty_stats(grids) for s in strategies}
    for pdf in scoring.whole_products(iter(batches)):  # the pass's batches: whole products
        labelled = pdf.drop_duplicates("product_id").set_index("product_id")
        for s, plan in plans.items():
            scorer = scoring.BatchScorer(plan)
            pics = scorer.decode_for_models(pdf["jpeg"])
            ok = np.array([p is not None for p in pics])
            if not ok.any():
                continue
            ids, probs, _ = scoring.score_products(scorer, [p for p in pics if p is not None],
                                                   pdf["product_id"].to_numpy(np.int64)[ok])
            decide.add_stats(expected[s], probs, labelled.loc[ids, "l3"].to_numpy(np.int64),
                             labelled.loc[ids, "part"].to_numpy(np.int64),
                             decide.Nodes.of(tax), grids, dcfg.levels)
    for r in stat_rows.itertuples():
        assert decide.flatten(expected[r.strategy]) == list(r.stats), r.strategy
    Row = namedtuple("Row", "strategy stats")
    fitted = decisions.fit_rules([Row(r.strategy, r.stats) for r in stat_rows.itertuples()],
                                 plans, dcfg, grids)
    assert any(rule.threshold is not None for rule, _ in fitted.values())
    ruled = {s: dataclasses.replace(p, models=dataclasses.replace(
        p.models, decision=fitted[s][0])) for s, p in plans.items()}
    calls.clear()
    rows = pd.concat(list(decisions.rows_from_summaries(ruled, grids)(
        iter([summaries.iloc[i:i + 50] for i in range(0, len(summaries), 50)]))))
    assert not calls  # no model ran for the rows
    scored = pd.concat(list(scoring.score_partitions(ruled)(iter(batches))))

    def norm(df):
        return df.sort_values(["strategy", "product_id"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(norm(rows), norm(scored), check_exact=True)
    assert rows["decision_level"].nunique() > 1
    assert rows[rows["product_id"] == ALL_BAD_AT_SCORING]["fallback"].all()


def test_a_nightly_predict_scores_only_new_and_changed_products(world, spark, tmp_path):
    """After a day's append to the test kind, predict scores the new and re-sent products and
    reuses the other rows; every answer is what scoring everything gives; a changed model
    makes every row stale."""
    import os

    from hierarchy.infer.incremental import scored_with
    from hierarchy.ingest.pipeline import run_ingest

    data = tmp_path / "ds"
    shutil.copytree(world["data"], data)
    out = str(tmp_path / "out")
    pcfg = predict_cfg(tmp_path)
    n = world["n_test"]
    first = run_predict(spark, pcfg, str(data), world["models"], RUN, "test", "flat", out)
    assert (first["scored"], first["reused"]) == (n, 0)
    again = run_predict(spark, pcfg, str(data), world["models"], RUN, "test", "flat", out)
    # the two products on the training prior are redone every time: the prior moves with data
    assert (again["scored"], again["reused"]) == (2, n - 2)

    docs = [bson.decode(d) for d in split_docs((world["syn"] / "test.bson").read_bytes())]
    good = [d for d in docs if d["_id"] < 990000]
    new = [{**d, "_id": d["_id"] + 5_000_000} for d in good[:5]]
    resent = [{**d, "imgs": good[-1 - i]["imgs"]} for i, d in enumerate(good[5:8])]
    day = tmp_path / "day.bson"
    day.write_bytes(b"".join(bson.encode(d) for d in new + resent + good[8:10]))
    icfg = load_config(overrides=["spark.master=local[2]", "ingest.progress=false"])
    entry = run_ingest(spark, icfg, [str(day)], str(world["syn"] / "category_names.csv"),
                       str(data), "test", append=True)
    assert (entry["append"]["added"], entry["append"]["replaced"]) == (5, 3)
    before = spark.table(first["table"]).where("split = 'test'").select(
        "product_id", "input_digest", "scored_at").toPandas().set_index("product_id")

    night = run_predict(spark, pcfg, str(data), world["models"], RUN, "test", "flat", out)
    assert (night["products"], night["scored"], night["reused"]) == (n + 5, 5 + 3 + 2, n - 5)
    table = spark.table(night["table"]).where("split = 'test' AND strategy = 'flat'") \
        .toPandas().set_index("product_id")
    assert len(table) == n + 5 and table.index.is_unique
    for d in resent:  # a re-sent product: its new pictures' digest, scored again
        assert table.loc[d["_id"], "input_digest"] != before.loc[d["_id"], "input_digest"]
    kept = [d["_id"] for d in good[10:]]
    assert (table.loc[kept, "scored_at"] == before.loc[kept, "scored_at"]).all()

    # every answer is what scoring the whole union gives
    full_cfg = predict_cfg(tmp_path, ["catalog.table=everything"])
    full = run_predict(spark, full_cfg, str(data), world["models"], RUN, "test", "flat",
                       str(tmp_path / "full"), rescore_all=True)
    assert full["scored"] == n + 5
    whole = spark.table(full["table"]).toPandas().set_index("product_id")
    assert (whole.loc[table.index, "category_id"] == table["category_id"]).all()
    np.testing.assert_allclose(whole.loc[table.index, "confidence"], table["confidence"],
                               rtol=1e-5)
    assert pd.read_csv(Path(out) / "submission.csv")["_id"].is_unique

    # a retrained model (here: its file written again) makes every row stale
    plan_key = scored_with(loaded_plan := _plan(world, data, "flat"))
    flat = Path(world["models"]) / RUN / "flat" / "model.h5"
    stat = flat.stat()
    os.utime(flat, (stat.st_atime, stat.st_mtime + 60))
    try:
        assert scored_with(loaded_plan) != plan_key
        stale = run_predict(spark, pcfg, str(data), world["models"], RUN, "test", "flat", out)
        assert (stale["scored"], stale["reused"]) == (n + 5, 0)
    finally:
        os.utime(flat, (stat.st_atime, stat.st_mtime))
    # so does a new rule (a new evaluate), or another calibration
    from hierarchy.contracts.runrecord import DecisionRule

    def key(**changes):
        return scored_with(dataclasses.replace(
            loaded_plan, models=dataclasses.replace(loaded_plan.models, **changes)))

    rule = DecisionRule(target=0.9, levels=(3, 2, 1), confidence=0.9, temperature=1.0,
                        threshold=0.5, certifier="power-start")
    keys = {key(decision=None), key(decision=rule),
            key(decision=rule.model_copy(update={"threshold": 0.6})),
            key(calibration={**loaded_plan.models.calibration, "temperature": 2.0})}
    assert len(keys) == 4


def _plan(world, data, strategy):
    tax = Dataset(str(data)).taxonomy()
    return ScoringPlan(models=load_modelset(world["models"], RUN, strategy, tax),
                       taxonomy_json=tax.to_json(), prior_category_id=1, prior_share=0.1,
                       params=(), aggregate="mean", tta_flip=False, top_n=5, threads=1)
