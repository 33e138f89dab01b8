"""hierarchy.evaluate: metrics of a hand-made predictions table checked against values worked
out by hand, then the report files."""

import datetime as dt
import json

import pytest

from hierarchy.contracts.modelstore import ModelStore
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.evaluate.metrics import evaluate_predictions
from hierarchy.evaluate.report import write_report

pytestmark = pytest.mark.spark

# level-1 ids by name: A=0 B=1 C=2 D=3; level-2 by name: A1=0 A2=1 B1=2 C1=3 ("A1" also sits
# under D, as a few level-2 names do in the real table); level-3 by category_id:
# 10->0 11->1 12->2 20->3 21->4 30->5 40->6
TAXONOMY = Taxonomy.from_rows([
    (10, "A", "A1", "a1x"), (11, "A", "A1", "a1y"), (12, "A", "A2", "a2x"),
    (20, "B", "B1", "b1x"), (21, "B", "B1", "b1y"), (30, "C", "C1", "c1x"),
    (40, "D", "A1", "d1x"),
])

# product -> true category; product 7 has no label (counted, left out)
TRUTH = {1: 10, 2: 11, 3: 12, 4: 20, 5: 21, 6: 30, 7: None}

# strategy -> product -> (predicted category, top-k category ids best first, fallback)
PREDICTIONS = {
    "flat": {
        1: (10, [10, 11], False),                # all levels right            |P∩T| = 3
        2: (10, [10, 12, 20, 21, 30, 11], False),  # leaf wrong; truth 6th: no top-5  2
        3: (11, [11, 10], False),                # level 2 wrong, not in top-5        1
        4: (20, [20], False),                    # right                              3
        5: (30, [30, 21], False),                # level 1 wrong, in top-5            0
        6: (30, [30], True),                     # right, from the training prior    3
        7: (20, [20], False),                    # unlabeled
    },
    "two-stage": {
        1: (11, [11, 10], False),                # leaf wrong, in top-5               2
        2: (11, [11], False),                    #                                    3
        3: (12, [12], False),                    #                                    3
        4: (21, [21, 20], False),                # leaf wrong, in top-5               2
        5: (21, [21], False),                    #                                    3
        6: (20, [20, 21], False),                # level 1 wrong, not in top-5        0
    },
}

EXPECTED = {
    "flat": {
        "products": 6, "excluded_unlabeled": 1, "fallback": 1,
        "accuracy_l1": 5 / 6, "accuracy_l2": 4 / 6, "accuracy_l3": 3 / 6,
        "top5_accuracy": 4 / 6, "hierarchical": 12 / 18,
        # (l1, name, products, accuracy_l3, accuracy_l1)
        "per_branch": [(0, "A", 3, 1 / 3, 1.0), (1, "B", 2, 1 / 2, 1 / 2), (2, "C", 1, 1.0, 1.0)],
        "confusion": [[1, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 1, 0], [0, 0, 0, 0]],
    },
    "two-stage": {
        "products": 6, "excluded_unlabeled": 0, "fallback": 0,
        "accuracy_l1": 5 / 6, "accuracy_l2": 5 / 6, "accuracy_l3": 3 / 6,
        "top5_accuracy": 5 / 6, "hierarchical": 13 / 18,
        "per_branch": [(0, "A", 3, 2 / 3, 1.0), (1, "B", 2, 1 / 2, 1.0), (2, "C", 1, 0.0, 0.0)],
        "confusion": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]],
    },
}

SCHEMA = (
    "product_id long, category_id long, category_level1 string, category_level2 string, "
    "category_level3 string, l1 int, l2 int, l3 int, confidence double, "
    "top5 array<struct<category_id: long, probability: double>>, level1_id int, "
    "level1_name string, level1_probability double, image_count int, bad_image_count int, "
    "fallback boolean, true_category_id long, true_l1 int, true_l2 int, true_l3 int, "
    "scored_at timestamp, run_id string, split string, strategy string"
)


def prediction_row(product_id, strategy, predicted, topk, fallback, truth):
    l1, l2, l3 = TAXONOMY.levels_of_category(predicted)
    names = TAXONOMY.names_of_l3(l3)
    true = TAXONOMY.levels_of_category(truth) if truth is not None else (None, None, None)
    top = [(c, 1.0 / (i + 2)) for i, c in enumerate(topk)]
    return (product_id, predicted, *names, l1, l2, l3, top[0][1], top, l1, names[0], 0.9,
            0 if fallback else 2, 0, fallback, truth, *true,
            dt.datetime(2024, 1, 1, 12, 0), "r1", "val", strategy)


def predictions_df(spark, predictions=PREDICTIONS, truth=TRUTH):
    rows = [prediction_row(p, s, pred, top, fb, truth[p])
            for s, by_product in predictions.items()
            for p, (pred, top, fb) in by_product.items()]
    return spark.createDataFrame(rows, schema=SCHEMA)


@pytest.fixture(scope="module")
def metrics(spark):
    return evaluate_predictions(predictions_df(spark), TAXONOMY)


def test_schema_is_the_contract(spark):
    df = predictions_df(spark)
    assert df.columns[:3] == ["product_id", "category_id", "category_level1"]
    assert df.columns[-3:] == ["run_id", "split", "strategy"]
    assert len(df.columns) == 24


def test_strategies_in_report_order(metrics):
    assert list(metrics["strategies"]) == ["flat", "two-stage"]
    assert metrics["strategy_order"] == ["flat", "two-stage"]
    assert metrics["excluded_unlabeled"] == 1
    assert metrics["taxonomy"] == {"fingerprint": TAXONOMY.fingerprint, "level1": 4,
                                   "level2": 4, "level3": 7}


@pytest.mark.parametrize("strategy", ["flat", "two-stage"])
def test_headline_metrics_match_hand_computed(metrics, strategy):
    got, want = metrics["strategies"][strategy], EXPECTED[strategy]
    for key in ("products", "excluded_unlabeled", "fallback"):
        assert got[key] == want[key], key
    for key in ("accuracy_l1", "accuracy_l2", "accuracy_l3", "top5_accuracy"):
        assert got[key] == pytest.approx(want[key]), key
    # fixed-depth tree: |P| = |T| = 3 for every product, so hP = hR = hF1
    for key in ("hierarchical_precision", "hierarchical_recall", "hierarchical_f1"):
        assert got[key] == pytest.approx(want["hierarchical"]), key


@pytest.mark.parametrize("strategy", ["flat", "two-stage"])
def test_per_branch(metrics, strategy):
    got = [(b["l1"], b["name"], b["products"], b["accuracy_l3"], b["accuracy_l1"])
           for b in metrics["strategies"][strategy]["per_branch"]]
    want = EXPECTED[strategy]["per_branch"]
    assert [g[:3] for g in got] == [w[:3] for w in want]  # branch D has no product: absent
    for g, w in zip(got, want):
        assert g[3:] == pytest.approx(w[3:])


@pytest.mark.parametrize("strategy", ["flat", "two-stage"])
def test_confusion_rows_normalized(metrics, strategy):
    conf = metrics["strategies"][strategy]["confusion_l1"]
    assert conf["labels"] == ["A", "B", "C", "D"]
    matrix = conf["matrix"]
    for got, want in zip(matrix, EXPECTED[strategy]["confusion"]):
        assert got == pytest.approx(want)
    assert [sum(r) for r in matrix] == pytest.approx([1, 1, 1, 0])


def test_level2_node_is_its_path(spark):
    """Category 40 (D > A1) for a true 10 (A > A1): the level-2 id (name-keyed) matches, so
    accuracy L2 counts it, but the tree node D>A1 is not A>A1: no hierarchical credit."""
    df = predictions_df(spark, {"blend": {1: (40, [40], False)}}, {1: 10})
    m = evaluate_predictions(df, TAXONOMY)["strategies"]["blend"]
    assert (m["accuracy_l1"], m["accuracy_l2"], m["accuracy_l3"]) == (0.0, 1.0, 0.0)
    assert m["hierarchical_f1"] == 0.0
    assert m["confusion_l1"]["matrix"][0] == [0.0, 0.0, 0.0, 1.0]


def test_only_unlabeled_products(spark):
    df = predictions_df(spark, {"flat": {7: (20, [20], True)}}, {7: None})
    m = evaluate_predictions(df, TAXONOMY)["strategies"]["flat"]
    assert (m["products"], m["excluded_unlabeled"], m["fallback"]) == (0, 1, 0)
    assert m["accuracy_l3"] is None and m["hierarchical_f1"] is None
    assert m["per_branch"] == []


def test_wrong_taxonomy_is_refused(spark):
    small = Taxonomy.from_rows([(10, "A", "A1", "a1x"), (20, "B", "B1", "b1x")])
    with pytest.raises(ValueError, match="level-1"):
        evaluate_predictions(predictions_df(spark), small)


HISTORY = {"loss": [2.0, 1.5, 1.2], "accuracy": [0.2, 0.4, 0.5],
           "val_loss": [2.1, 1.7, 1.6], "val_accuracy": [0.15, 0.3, 0.35],
           "val_top5": [0.5, 0.6, 0.7]}


def test_load_histories(tmp_path):
    run = tmp_path / "r1"
    for key in ("level1", "branch/10", "branch/2"):
        (run / key).mkdir(parents=True)
        (run / key / "history.json").write_text(json.dumps(HISTORY))
    (run / "flat").mkdir()  # a model folder without history yet
    (run / "branch" / "5").mkdir()
    got = ModelStore(str(tmp_path)).run("r1").histories()
    assert list(got) == ["level1", "branch/2", "branch/10"]
    assert got["level1"] == HISTORY
    assert ModelStore(str(tmp_path)).run("missing").histories() == {}


def test_write_report(metrics, tmp_path):
    histories = {"level1": HISTORY, "flat": {k: v[:2] for k, v in HISTORY.items()}}
    out = tmp_path / "evaluation" / "r1"
    files = write_report(metrics, histories, str(out), "r1")
    assert set(files) == {"report_json", "report_md", "confusion_l1_flat",
                          "confusion_l1_two-stage", "training_curves"}
    for name in ("confusion_l1_flat.png", "confusion_l1_two-stage.png", "training_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    doc = json.loads((out / "report.json").read_text())
    assert doc["run_id"] == "r1"
    assert doc["strategies"]["flat"]["accuracy_l3"] == pytest.approx(0.5)
    assert doc["training"]["level1"]["epochs"] == 3
    md = (out / "report.md").read_text()
    assert "| metric | flat | two-stage |" in md
    assert "| accuracy L1 | 0.8333 | 0.8333 |" in md
    assert "| accuracy L2 | 0.6667 | 0.8333 |" in md
    assert "| hierarchical F1 | 0.6667 | 0.7222 |" in md
    assert "| 0 | A | 3 | 0.3333 | 0.6667 |" in md  # per-branch: same counts, one column
    for name in ("confusion_l1_flat.png", "confusion_l1_two-stage.png", "training_curves.png"):
        assert f"]({name})" in md
    assert not list(out.glob("*.tmp*"))


def test_write_report_without_history_or_predictions(tmp_path):
    empty = {"strategies": {}, "strategy_order": [], "excluded_unlabeled": 0}
    files = write_report(empty, {}, str(tmp_path), "r0")
    assert (tmp_path / "training_curves.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "No validation predictions" in md and "No training history" in md
    assert set(files) == {"report_json", "report_md", "training_curves"}


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_write_report_on_a_non_local_filesystem(metrics, scheme, tmp_path, monkeypatch):
    """The report goes wherever --output points (as on hdfs:// with the cluster config), never
    to a local folder named after the scheme."""
    from hierarchy.contracts import storage

    monkeypatch.chdir(tmp_path)
    base = f"memory://reports-{tmp_path.name}" if scheme == "memory" else \
        f"file://{tmp_path}/out"
    out = storage.join(base, "evaluation", "r1")
    files = write_report(metrics, {"level1": HISTORY}, out, "r1")
    assert files["report_json"] == f"{out}/report.json"
    assert storage.read_json(files["report_json"])["strategies"]["flat"]["accuracy_l3"] == \
        pytest.approx(0.5)
    assert "| accuracy L1 | 0.8333 | 0.8333 |" in storage.read_text(files["report_md"])
    for key in ("confusion_l1_flat", "training_curves"):
        assert storage.read_bytes(files[key])[:8] == b"\x89PNG\r\n\x1a\n"
    names = [name for name, _, _ in storage.list_dir(out)]
    assert not [n for n in names if ".tmp" in n]
    assert not (tmp_path / f"{scheme}:").exists()
    if scheme == "file":
        assert (tmp_path / "out" / "evaluation" / "r1" / "report.md").is_file()
