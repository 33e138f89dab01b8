"""Predict speed and memory per strategy at the real taxonomy's shape (49 level-1 branches,
5270 leaves), with small models.

    .venv/bin/python bench/predict_strategies.py [--pictures N] [--repeat R] [--workdir DIR]

The tree is the official ``category_names.csv`` (../shared/data/cdiscount/, else a synthetic
tree of the same shape). Models are built untrained (small_cnn, 64 px: speed and memory do not
depend on the weights) and saved into a model store run under DIR:
  flat         one 5270-way model;
  two-stage    a 49-way level-1 model and one model per branch with two or more leaves (the
               49-branch model set the issue asks about), top-3 branches per product;
  multi        the multi-level model (levels 1-3 and the per-branch head, one backbone);
  hierarchical the experts model: the multi-level model plus 49 branch experts
               (``BranchExperts``, hidden 128) over its trunk, corrected (T, w, v) = (1, 1, 1).
Each strategy runs in its own process (so its memory is its own): load the models through
``BatchScorer`` (the code each Spark task runs), then score N pictures (synthetic 180 px
JPEGs, 2 per product) in batches of 256 through ``BatchScorer.probs``, R times. Reported per
strategy: model files on disk, resident memory after loading (VmRSS minus the process's before
loading), images/s (median), and the ratio to flat. Spark's own cost is the same for every
strategy (bench/predict_throughput.py). Figures depend on the machine; never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CATEGORIES = ROOT.parent / "shared" / "data" / "cdiscount" / "category_names.csv"
RESULTS = ROOT / "bench" / "results" / "predict_strategies.json"
STRATEGIES = ("flat", "two-stage", "multi", "hierarchical")
RUN_ID = "shape"
SIZE = 64
BATCH = 256


def say(text: str) -> None:
    print(text, flush=True)


def taxonomy():
    from hierarchy.contracts.taxonomy import Taxonomy
    from hierarchy.synth.taxonomy import SHAPES, tree_rows

    if CATEGORIES.exists():
        return Taxonomy.from_csv(str(CATEGORIES)), "official category_names.csv"
    return Taxonomy.from_rows(tree_rows(*SHAPES["full"], seed=1)), "synthetic, full shape"


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def build(models: Path) -> dict:
    """Save every model once (reused while the store exists); returns the size of each
    strategy's files in MB."""
    import tensorflow as tf

    from hierarchy.contracts import modelstore
    from hierarchy.train import heads as theads
    from hierarchy.train import models as tmodels

    tax, _ = taxonomy()
    run = modelstore.ModelStore(str(models)).run(RUN_ID)

    def save(key: str, model) -> None:
        path = Path(run.model_file(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(str(path), include_optimizer=False)
        Path(run.metrics_file(key)).write_text(json.dumps(
            {"taxonomy_fingerprint": tax.fingerprint}))

    if not Path(run.model_file(modelstore.EXPERTS)).exists():
        save(modelstore.FLAT, tmodels.build_model("small_cnn", tax.n_l3, SIZE))
        save(modelstore.LEVEL1, tmodels.build_model("small_cnn", tax.n_l1, SIZE))
        for b in range(tax.n_l1):
            if len(tax.branch(b)) > 1:
                save(modelstore.branch_key(b),
                     tmodels.build_model("small_cnn", len(tax.branch(b)), SIZE))
                tf.keras.backend.clear_session()
        multi = tmodels.build_multi_model("small_cnn", tax, SIZE)
        save(modelstore.MULTI, multi)
        save(modelstore.EXPERTS, theads.build_experts_model(multi, tax, 128))
        Path(run.run_file).write_text(json.dumps({
            "run_id": RUN_ID, "taxonomy_fingerprint": tax.fingerprint,
            "calibration": {"temperature": 1.0, "w": 1.0, "v": 1.0, "model": "experts"}}))

    def mb(keys) -> float:
        return sum(os.path.getsize(run.model_file(k)) for k in keys) / 2**20

    branches = [modelstore.branch_key(b) for b in range(tax.n_l1) if len(tax.branch(b)) > 1]
    return {"flat": mb([modelstore.FLAT]), "two-stage": mb([modelstore.LEVEL1, *branches]),
            "multi": mb([modelstore.MULTI]), "hierarchical": mb([modelstore.EXPERTS]),
            "branch_models": len(branches)}


def pictures(n: int):
    """N distinct 180 px JPEGs (noise + a gradient), two per product."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = (rng.random((180, 180, 3)) * 64 + np.linspace(0, 191, 180)[None, :, None])
        out.append(tf.io.encode_jpeg(img.astype(np.uint8)).numpy())
    return out, np.repeat(np.arange(n // 2 + 1), 2)[:n]


def one(strategy: str, models: Path, n: int, repeat: int) -> dict:
    """In a child process: load, then score; prints one JSON line."""
    from hierarchy.infer.modelset import load_modelset
    from hierarchy.infer.scoring import BatchScorer, ScoringPlan

    tax, _ = taxonomy()
    jpegs, pids = pictures(n)
    base = rss_mb()
    t0 = time.perf_counter()
    ms = load_modelset(str(models), RUN_ID, strategy, tax)
    plan = ScoringPlan(models=ms, taxonomy_json=tax.to_json(), prior_category_id=0,
                       prior_share=0.0,
                       params=(("top_branches", 3), ("blend_weight", 0.5)), aggregate="log_mean",
                       tta_flip=False, top_n=5, threads=0)
    scorer = BatchScorer(plan)  # loads every model of the strategy
    load_s = time.perf_counter() - t0
    loaded = rss_mb()
    images = scorer.decode(jpegs, scorer.min_side)
    scorer.probs(images[:BATCH], pids[:BATCH])  # warm-up: predict functions traced
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for i in range(0, n, BATCH):
            scorer.probs(images[i:i + BATCH], pids[i:i + BATCH])
        runs.append(n / (time.perf_counter() - t))
    return {"strategy": strategy, "models_loaded": len(ms.refs()), "load_s": load_s,
            "rss_models_mb": loaded - base, "rss_peak_mb": rss_mb() - base,
            "images_per_s": statistics.median(runs), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pictures", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "results" / "predict_strategies"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    models = Path(args.workdir) / "models"
    if args.one:
        print(json.dumps(one(args.one, models, args.pictures, args.repeat)), flush=True)
        return
    tax, source = taxonomy()
    say(f"[taxonomy] {tax.n_l1} level-1, {tax.n_l3} leaves ({source}); small_cnn {SIZE} px")
    sizes = build(models)
    rows = {}
    for strategy in STRATEGIES:
        proc = subprocess.run([sys.executable, __file__, "--one", strategy, "--pictures",
                               str(args.pictures), "--repeat", str(args.repeat), "--workdir",
                               args.workdir], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{strategy} failed:\n{proc.stderr[-4000:]}")
        rows[strategy] = {**json.loads(proc.stdout.strip().splitlines()[-1]),
                          "files_mb": sizes[strategy]}
    flat = rows["flat"]["images_per_s"]
    say(f"{'strategy':<13}{'models':>7}{'files MB':>10}{'RSS MB':>9}{'load s':>8}"
        f"{'img/s':>8}{'vs flat':>9}")
    for s, r in rows.items():
        r["ratio_to_flat"] = r["images_per_s"] / flat
        say(f"{s:<13}{r['models_loaded']:>7}{r['files_mb']:>10.1f}{r['rss_models_mb']:>9.0f}"
            f"{r['load_s']:>8.1f}{r['images_per_s']:>8.0f}{r['ratio_to_flat']:>8.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"taxonomy": source, "pictures": args.pictures,
                                   "branch_models": sizes["branch_models"], "rows": rows},
                                  indent=2))
    say(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
