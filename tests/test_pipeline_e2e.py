"""The whole pipeline through the exact command shapes a scheduler uses, then the analyst
notebook on its output: synth -> spark-submit ingest -> train (Horovod on Spark for level 1)
-> spark-submit predict -> evaluate -> notebook.

The test dump carries the ids of Kaggle's sample submission when the official sample is
present, so the submission's header and id column can be compared with it byte for byte."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import bson
import pytest
from conftest import REAL
from corrupt import split_docs

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SAMPLE = REAL / "sample_submission_head1000.csv"

pytestmark = pytest.mark.spark


def run(*cmd, cwd, conf):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    proc = subprocess.run([*cmd, *conf], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def sample_ids():
    if not SAMPLE.exists():
        return None
    with open(SAMPLE) as fh:
        return [int(row["_id"]) for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    conf = [f"catalog.warehouse={root / 'wh'}", f"catalog.metastore={root / 'wh' / 'ms'}",
            "spark.master=local[2]", "ingest.progress=false", "predict.progress=false",
            "train.image_size=48", "train.epochs=2", "train.batch_size=16",
            "train.warmup_epochs=0", "train.reader_workers=1", "train.shuffle_buffer=256"]
    spark_submit = [str(BIN / "spark-submit"), "--master", "local[2]"]
    run("hierarchy", "synth", "--output", "syn", "--products", "240", "--seed", "9",
        "--test-products", "30", cwd=root, conf=[])
    ids = sample_ids()
    if ids:  # the sample submission's ids, with synthetic pictures
        docs = [bson.decode(d) for d in split_docs((root / "syn" / "test.bson").read_bytes())]
        (root / "syn" / "test.bson").write_bytes(b"".join(
            bson.encode({"_id": pid, "imgs": docs[i % len(docs)]["imgs"]})
            for i, pid in enumerate(ids)))
    cats = ["--categories", "syn/category_names.csv", "--output", "ds"]
    run(*spark_submit, str(ROOT / "jobs" / "ingest.py"), "--input", "syn/train.bson", *cats,
        cwd=root, conf=conf)
    run("hierarchy", "ingest", "--input", "syn/test.bson", "--kind", "test", *cats, cwd=root,
        conf=conf)
    models = ["--data", "ds", "--models", "models", "--run-id", "e2e"]
    out = {"level1": run(*spark_submit, str(ROOT / "jobs" / "train.py"), *models, "--level",
                         "1", "--np", "2", cwd=root, conf=conf)}
    run("hierarchy", "train", *models, "--level", "3", "--mode", "flat", cwd=root, conf=conf)
    run("hierarchy", "train", *models, "--level", "3", "--mode", "branch", cwd=root, conf=conf)
    run("hierarchy", "train", *models, "--level", "3", "--mode", "multi", cwd=root, conf=conf)
    out["experts"] = run("hierarchy", "train", *models, "--level", "3", "--mode", "experts",
                         "train.expert_epochs=3", cwd=root, conf=conf)
    out["predict"] = run(*spark_submit, str(ROOT / "jobs" / "predict.py"), *models, "--split",
                         "test", "--strategy", "two-stage", "--output", "out", cwd=root,
                         conf=conf)
    out["evaluate"] = run(str(BIN / "hierarchy"), "evaluate", *models, "--output", "out",
                          cwd=root, conf=conf)
    # no --strategy: the one evaluate recommended
    out["predict_auto"] = run("hierarchy", "predict", *models, "--split", "val", "--output",
                              "out", cwd=root, conf=conf)
    return {"root": root, "conf": conf, "ids": ids, "stdout": out}


def test_submission_matches_the_kaggle_format(pipeline):
    sub = (pipeline["root"] / "out" / "submission.csv").read_text().splitlines()
    assert sub[0] == "_id,category_id"
    got = [int(line.split(",")[0]) for line in sub[1:]]
    if pipeline["ids"] is None:
        pytest.skip(f"{SAMPLE} absent: only the header and row count were checked")
    assert got == pipeline["ids"]  # exactly the sample's id column, in its order
    assert "submission: out/submission.csv" in pipeline["stdout"]["predict"]


def test_an_analyst_queries_the_table_by_its_plain_name(pipeline):
    query = ("from hierarchy.config import load_config; from hierarchy.spark import get_spark; "
             "import sys; s = get_spark(load_config(overrides=sys.argv[1:])); "
             "print('ROWS', s.sql(\"SELECT count(*) FROM predictions WHERE run_id = 'e2e' "
             "AND split = 'test'\").first()[0]); s.stop()")
    out = run(sys.executable, "-c", query, cwd=pipeline["root"], conf=pipeline["conf"])
    n_test = len((pipeline["root"] / "out" / "submission.csv").read_text().splitlines()) - 1
    assert f"ROWS {n_test}" in out


def test_level1_trained_on_two_workers_under_spark_submit(pipeline):
    run_json = json.loads((pipeline["root"] / "models" / "e2e" / "run.json").read_text())
    assert run_json["models"]["level1"]["size"] == 2
    assert "level1: val accuracy" in pipeline["stdout"]["level1"]


def test_evaluation_report_and_notebook_on_the_pipeline_output(pipeline, tmp_path):
    from hierarchy.notebook import execute

    root = pipeline["root"]
    assert "two-stage" in pipeline["stdout"]["evaluate"]
    report = json.loads((root / "out" / "evaluation" / "e2e" / "report.json").read_text())
    assert set(report["strategies"]) == {"flat", "two-stage", "blend", "multi", "hierarchical"}
    executed = execute(ROOT / "notebooks" / "analyst.ipynb", tmp_path / "run.ipynb",
                       {"overrides": pipeline["conf"], "run_id": "e2e", "split": "val",
                        "evaluation_dir": str(root / "out" / "evaluation" / "e2e"),
                        "data": str(root / "ds")}, cwd=str(root))
    nb = json.loads(Path(executed).read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    pngs = sum("image/png" in o.get("data", {}) for o in outputs)
    assert pngs >= 4, f"{pngs} figures"


def test_evaluate_fits_the_hierarchical_strategy_and_predict_defaults_to_its_pick(pipeline):
    run = json.loads((pipeline["root"] / "models" / "e2e" / "run.json").read_text())
    c = run["calibration"]
    assert c["products"] > 0 and c["temperature"] > 0
    # the run has branch experts over the multi-level trunk: hierarchical reads them
    assert c["model"] == "experts" and "experts" in run["models"]
    assert "experts: trained (val accuracy within the true group" in pipeline["stdout"]["experts"]
    # fitted on val accuracy: never below the multi-level model's own level 3 there
    assert c["val_accuracy_l3"] >= c["val_accuracy_l3_uncorrected"]
    scores = run["strategy_scores"]
    assert set(scores) == {"flat", "two-stage", "blend", "multi", "hierarchical"}
    best = run["recommended_strategy"]
    assert scores[best] == max(scores.values())
    assert scores["hierarchical"] == pytest.approx(c["val_accuracy_l3"])
    assert f"recommended strategy (predict's default): {best}" in pipeline["stdout"]["evaluate"]
    assert f"strategy={best})" in pipeline["stdout"]["predict_auto"]
