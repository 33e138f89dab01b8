"""The analyst notebook, executed headless by papermill over a small predictions table.

The table lives in its own Derby metastore, registered by a separate Python process: Derby lets
one JVM at a time open a database, and both the test session's Spark and the notebook kernel's
Spark are other JVMs. The fixture ``predictions_catalog`` builds everything the notebook reads;
replace its body with real pipeline output (synth -> ingest -> train -> evaluate) and the
expectations, computed from the rows it returns, still hold.

Run as a script (``python tests/test_notebook.py ROWS.jsonl OUTPUT OVERRIDE...``) it registers
the rows as the predictions table: that is the subprocess the fixture starts.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "analyst.ipynb"

pytestmark = pytest.mark.spark

# The predictions table of the issue-4 contract, in column order (partitions last)
SCHEMA = (
    "product_id BIGINT, category_id BIGINT, category_level1 STRING, category_level2 STRING, "
    "category_level3 STRING, l1 INT, l2 INT, l3 INT, confidence DOUBLE, "
    "top5 ARRAY<STRUCT<category_id: BIGINT, probability: DOUBLE>>, level1_id INT, "
    "level1_name STRING, level1_probability DOUBLE, image_count INT, bad_image_count INT, "
    "fallback BOOLEAN, true_category_id BIGINT, true_l1 INT, true_l2 INT, true_l3 INT, "
    "scored_at TIMESTAMP, run_id STRING, split STRING, strategy STRING"
)
PARTITIONS = ("run_id", "split", "strategy")

# A tiny tree: (category_id, level 1, level 2, level 3); ids as the Taxonomy numbers them
# (level 3 by category_id, levels 1 and 2 by name). "glue" repeats under two parents.
LEAVES = [
    (1000010, "ART", "ART paint", "brushes"),
    (1000020, "ART", "ART paint", "canvas"),
    (1000030, "ART", "ART craft", "glue"),
    (1000040, "BOOKS", "BOOKS novel", "crime"),
    (1000050, "BOOKS", "BOOKS novel", "romance"),
    (1000060, "BOOKS", "BOOKS kids", "glue"),
    (1000070, "TOYS", "TOYS outdoor", "balls"),
    (1000080, "TOYS", "TOYS board", "chess"),
]
L1_NAMES = sorted({leaf[1] for leaf in LEAVES})
L2_NAMES = sorted({leaf[2] for leaf in LEAVES})
# per branch: products, leaf right, level 1 right (the rest go to another branch)
PLAN = {"ART": (8, 7, 8), "BOOKS": (8, 5, 7), "TOYS": (8, 3, 6)}
LOW_N = 6


@dataclass
class Catalog:
    """What the notebook is pointed at, and the rows the table holds (a pandas DataFrame)."""

    overrides: List[str]
    data: Path
    evaluation_dir: Path
    rows: object


def _path(category_id: int) -> dict:
    i = [leaf[0] for leaf in LEAVES].index(category_id)
    cid, n1, n2, n3 = LEAVES[i]
    return {"category_id": cid, "category_level1": n1, "category_level2": n2,
            "category_level3": n3, "l1": L1_NAMES.index(n1), "l2": L2_NAMES.index(n2), "l3": i}


def _row(pid, predicted, confidence, truth, run_id, split, strategy, scored_at, images=1,
         fallback=False) -> dict:
    p = _path(predicted)
    others = [leaf[0] for leaf in LEAVES if leaf[0] != predicted][:4]
    rest = round((1 - confidence) / len(others), 6)
    t = _path(truth) if truth else None
    return {
        "product_id": pid, **p, "confidence": confidence,
        "top5": [{"category_id": predicted, "probability": confidence}]
        + [{"category_id": c, "probability": rest} for c in others],
        "level1_id": p["l1"], "level1_name": p["category_level1"],
        "level1_probability": min(1.0, confidence + 0.1),
        "image_count": images, "bad_image_count": 0, "fallback": fallback,
        "true_category_id": t and t["category_id"], "true_l1": t and t["l1"],
        "true_l2": t and t["l2"], "true_l3": t and t["l3"],
        "scored_at": scored_at, "run_id": run_id, "split": split, "strategy": strategy,
    }


def fake_predictions():
    """Rows of two runs: r1 (older, val, two-stage), r2 (latest: val with flat and two-stage,
    test with two-stage). r2's two-stage val accuracy per branch follows PLAN; its lowest
    confidence product is a fallback without pictures."""
    import pandas as pd

    by_l1 = {n: [leaf[0] for leaf in LEAVES if leaf[1] == n] for n in L1_NAMES}
    old, new = "2024-05-01T09:00:00", "2024-05-02T10:30:00"
    rows, pid = [], 0
    for b, name in enumerate(L1_NAMES):
        n, leaf_ok, l1_ok = PLAN[name]
        own, other = by_l1[name], by_l1[L1_NAMES[(b + 1) % len(L1_NAMES)]]
        for i in range(n):
            pid += 1
            truth = own[i % len(own)]
            if i < leaf_ok:
                predicted, conf = truth, 0.55 + 0.05 * i
            elif i < l1_ok:
                predicted, conf = own[(i + 1) % len(own)], 0.30 + 0.01 * pid
            else:
                predicted, conf = other[i % len(other)], 0.10 + 0.01 * pid
            fallback = pid == 24  # the last TOYS product: no picture, scored from the prior
            rows.append(_row(pid, predicted, 0.05 if fallback else round(conf, 4), truth, "r2",
                             "val", "two-stage", new, 0 if fallback else 1 + pid % 2, fallback))
            rows.append(_row(pid, truth, 0.9, truth, "r2", "val", "flat", new))
            if pid <= 4:
                rows.append(_row(pid, truth, 0.7, truth, "r1", "val", "two-stage", old))
    for k in range(6):
        rows.append(_row(101 + k, LEAVES[k][0], 0.5, None, "r2", "test", "two-stage", new))
    df = pd.DataFrame(rows)
    for column in ("true_category_id", "true_l1", "true_l2", "true_l3"):
        df[column] = df[column].astype("Int64")  # null on the test split, integers in JSON
    return df


def _jpeg(seed: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (48, 48), ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    ImageDraw.Draw(img).rectangle([8, 8, 8 + seed % 30, 40], fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_images(rows, root: Path) -> None:
    """``<root>/images``: the ingest layout (Parquet partitioned by split), one real JPEG per
    scored image of every product, and a few train products the notebook must not read."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    scored = rows[rows["strategy"] == "two-stage"].drop_duplicates(["product_id", "split"])
    records = [(int(r.product_id), k, r.true_category_id, r.split)
               for r in scored.itertuples() for k in range(int(r.image_count))]
    records += [(900 + k, 0, LEAVES[k][0], "train") for k in range(3)]
    table = pa.table({
        "product_id": pa.array([r[0] for r in records], pa.int64()),
        "img_idx": pa.array([r[1] for r in records], pa.int32()),
        "category_id": pa.array([None if pd.isna(r[2]) else int(r[2]) for r in records],
                                pa.int64()),
        "split": pa.array([r[3] for r in records], pa.string()),
        "jpeg": pa.array([_jpeg(r[0] * 3 + r[1]) for r in records], pa.binary()),
    })
    pq.write_to_dataset(table, str(root / "images"), partition_cols=["split"])


def write_report(rows, folder: Path) -> None:
    """A report.json of the shape ``hierarchy evaluate`` writes (only what the notebook reads
    plus a list the notebook must leave out)."""
    folder.mkdir(parents=True, exist_ok=True)
    val = rows[(rows["run_id"] == "r2") & (rows["split"] == "val")]
    strategies = {}
    for s, part in val.groupby("strategy"):
        strategies[s] = {
            "products": len(part),
            "accuracy_l1": float((part["l1"] == part["true_l1"]).mean()),
            "accuracy_l3": float((part["category_id"] == part["true_category_id"]).mean()),
            "per_branch": [{"l1": 0, "name": "ART", "products": 8}],
            "confusion_l1": {"labels": L1_NAMES, "matrix": [[1.0, 0, 0]] * 3},
        }
    doc = {"run_id": "r2", "split": "val", "generated_at": "2024-05-02T11:00:00+00:00",
           "strategies": strategies, "strategy_order": ["flat", "two-stage"],
           "excluded_unlabeled": 0, "taxonomy": {"fingerprint": "sha256:test", "level1": 3},
           "files": {}}
    (folder / "report.json").write_text(json.dumps(doc, indent=2))


@pytest.fixture(scope="module")
def predictions_catalog(tmp_path_factory) -> Catalog:
    """The predictions table registered in a fresh Derby metastore, the images dataset and an
    evaluation report, all under one temporary folder."""
    tmp = tmp_path_factory.mktemp("analyst")
    overrides = [f"catalog.metastore={tmp / 'metastore_db'}", f"catalog.warehouse={tmp / 'wh'}",
                 "spark.master=local[1]", "spark.driver_memory=1g"]
    rows = fake_predictions()
    rows_file = tmp / "rows.jsonl"
    rows_file.write_text(rows.to_json(orient="records", lines=True, force_ascii=False))
    r = subprocess.run([sys.executable, __file__, str(rows_file), str(tmp / "output" /
                        "predictions"), *overrides], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"registering the table failed:\n{r.stdout[-3000:]}{r.stderr[-5000:]}"
    write_images(rows, tmp / "dataset")
    write_report(rows, tmp / "output" / "evaluation" / "r2")
    return Catalog(overrides, tmp / "dataset", tmp / "output" / "evaluation" / "r2", rows)


# ------------------------------------------------------------------ reading the executed notebook
def _cell(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"one cell tagged {tag!r} expected"
    return cells[0]


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


def _pngs(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def expected_choice(rows, split="val"):
    """The notebook's defaults: the latest run scored on ``split``, two-stage if it has it."""
    on = rows[rows["split"] == split]
    run_id = on.sort_values("scored_at", kind="stable").iloc[-1]["run_id"]
    strategies = sorted(on[on["run_id"] == run_id]["strategy"].unique())
    return run_id, "two-stage" if "two-stage" in strategies else strategies[0]


def expected_branches(part):
    """Per true level-1 branch: (name, products, acc_l1, acc_l2, acc_leaf)."""
    names = dict(zip(part["l1"], part["category_level1"]))
    out = {}
    for l1, g in part[part["true_category_id"].notna()].groupby("true_l1"):
        out[int(l1)] = (names.get(l1, f"l1={int(l1)}"), len(g), (g["l1"] == g["true_l1"]).mean(),
                        (g["l2"] == g["true_l2"]).mean(),
                        (g["category_id"] == g["true_category_id"]).mean())
    return out


def test_kernel_runs_this_interpreter(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from hierarchy.notebook import execute

    params = new_code_cell("x = 0", metadata={"tags": ["parameters"]})
    nb = new_notebook(cells=[params, new_code_cell("import sys\nprint(sys.executable, x)")],
                      metadata={"kernelspec": {"name": "python3", "language": "python",
                                               "display_name": "Python 3"}})
    nbformat.write(nb, tmp_path / "probe.ipynb")
    out = execute(str(tmp_path / "probe.ipynb"), str(tmp_path / "probe.out.ipynb"), {"x": 7},
                  timeout=60)
    printed = nbformat.read(out, as_version=4).cells[-1].outputs[0]["text"]
    assert printed.strip() == f"{sys.executable} 7"


def test_committed_notebook_is_clean():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs"
    params = _cell(nb, "parameters").source
    for name in ("overrides", "config", "run_id", "split", "strategy", "evaluation_dir", "data",
                 "low_confidence_n"):
        assert re.search(rf"^{name} = ", params, re.M), name


def test_analyst_notebook(predictions_catalog, tmp_path):
    import nbformat

    from hierarchy.notebook import execute

    cat = predictions_catalog
    out = execute(str(NOTEBOOK), str(tmp_path / "analyst.out.ipynb"),
                  {"overrides": cat.overrides, "evaluation_dir": str(cat.evaluation_dir),
                   "data": str(cat.data), "low_confidence_n": LOW_N},
                  cwd=str(tmp_path), timeout=300)
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors

    rows = cat.rows
    run_id, strategy = expected_choice(rows)
    part = rows[(rows["run_id"] == run_id) & (rows["split"] == "val")
                & (rows["strategy"] == strategy)]

    runs = _text(_cell(nb, "runs"))
    for (r, s, st), g in rows.groupby(["run_id", "split", "strategy"]):
        assert re.search(rf"\b{r}\s+{s}\s+{st}\s+{len(g)}\s", runs), (r, s, st, runs)
    assert f"run {run_id} | split val | strategy {strategy} " in _text(_cell(nb, "selection"))

    for tag in ("distribution", "confidence", "branch-accuracy", "gallery"):
        assert _pngs(_cell(nb, tag)) == 1, tag

    branch = _text(_cell(nb, "branch-accuracy"))
    n = len(part)
    leaf = (part["category_id"] == part["true_category_id"]).mean()
    level1 = (part["l1"] == part["true_l1"]).mean()
    assert f"{n} labelled products, accuracy level 1 {level1:.3f}" in branch
    assert f"leaf {leaf:.3f}" in branch
    lines = branch.splitlines()
    for l1, (name, products, acc1, acc2, acc3) in expected_branches(part).items():
        line = next(ln for ln in lines if re.search(rf"^\d+\s+{l1}\s+{re.escape(name)}\s", ln))
        got = line.split()[3:7]
        assert int(got[0]) == products
        assert [float(v) for v in got[1:]] == pytest.approx([acc1, acc2, acc3], abs=5e-4), line

    report = _text(_cell(nb, "report"))
    assert "accuracy_l3" in report and "two-stage" in report
    assert "confusion_l1" not in report and "per_branch" not in report  # lists stay out
    assert "taxonomy.fingerprint" in report

    low = part.sort_values(["confidence", "product_id"]).head(LOW_N)
    table = _text(_cell(nb, "low-confidence"))
    ids = [int(m) for m in re.findall(r"^\d+\s+(\d+)\s", table, re.M)]
    assert ids == [int(p) for p in low["product_id"]]
    with_pictures = int((low["image_count"] > 0).sum())
    gallery = _text(_cell(nb, "gallery"))
    assert f"{int(low['image_count'].sum())} pictures of {with_pictures} of the {LOW_N} " \
           "products" in gallery
    assert "undecodable" not in gallery


# ------------------------------------------------------------------ the registering subprocess
def register(rows_file: str, output: str, overrides: List[str]) -> None:
    """Write the rows as the predictions table (Parquet partitioned by run_id/split/strategy
    at ``output``) and register it in the metastore of ``overrides``."""
    from hierarchy.contracts.config import load_config
    from hierarchy.spark import get_spark

    cfg = load_config(overrides=overrides)
    spark = get_spark(cfg, "test-notebook-table")
    name = f"{cfg.catalog.database}.{cfg.catalog.table}"
    df = spark.read.schema(SCHEMA).option("mode", "FAILFAST").json(rows_file)
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {cfg.catalog.database}")
    (df.write.mode("overwrite").partitionBy(*PARTITIONS).option("path", output)
     .saveAsTable(name))
    got = [(f.name, f.dataType.simpleString()) for f in spark.table(name).schema]
    want = [(f.name, f.dataType.simpleString()) for f in df.schema]
    assert got == want, f"registered schema {got} differs from the contract {want}"
    count = spark.table(name).count()
    assert count == sum(1 for _ in open(rows_file)), count
    spark.stop()


if __name__ == "__main__":
    register(sys.argv[1], sys.argv[2], sys.argv[3:])
    print(f"registered at {dt.datetime.now().isoformat(timespec='seconds')}")
