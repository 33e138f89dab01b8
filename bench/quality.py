"""Model quality of every predict strategy at a stated compute, on a catalog hard enough to tell.

    .venv/bin/python bench/quality.py [--products N] [--test-products M] [--epochs E]
                                      [--seed S] [--workdir DIR] [--bootstrap B] [key=value ...]

Runs the real pipeline with the `hierarchy` command (as a scheduler would), on
``hierarchy synth --preset hard`` (N train products, M test products):

  ingest      train (val_fraction 0.2) and test;
  train       flat       --level 3 --mode flat, E epochs
              multi      --level 3 --mode multi, E epochs (one backbone, levels 1-3 and the
                         per-branch head: the same pictures, the same image-epochs as flat)
              two-stage  --level 1 and --level 3 --mode branch, E/2 epochs each (a branch model
                         reads its branch only, so all branches together read the split once
                         per epoch): E image-epochs in all;
  evaluate    fits the hierarchical strategy on val, scores every strategy on val, records
              the recommended one;
  predict     the test split with every strategy.

Compute is stated per strategy in image-epochs (training pictures seen by the models it needs,
counted from the manifest) and seconds of training. Test is scored against the synthetic
catalog's ``test_solution.csv`` (never seen by training or by the calibration): accuracy at
levels 1-3, top-5, hierarchical F1, and each strategy's paired difference to flat in level-3
product accuracy with a bootstrap 95% interval (products resampled, B times). Figures go to
stdout, ``DIR/quality.json`` and ``DIR/quality.png``; they depend on the machine and the seed
and are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUN_ID = "quality"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the children's start-up noise
STRATEGIES = ("flat", "multi", "hierarchical", "two-stage")


def say(text: str) -> None:
    print(text, flush=True)


def hierarchy(*args: str, conf: list) -> float:
    """Run one `hierarchy` command; returns its wall time in seconds."""
    t0 = time.perf_counter()
    # key=value overrides are one trailing positional list: the command's own go after conf
    flags = [a for a in args if a.startswith("-") or "=" not in a]
    own = [a for a in args if a not in flags]
    proc = subprocess.run([str(BIN / "hierarchy"), *flags, "-q", *conf, *own],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"hierarchy {' '.join(args)} failed ({proc.returncode}):\n"
                 f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- statistics
def product_scores(pred: dict, truth_l3: np.ndarray, taxonomy) -> dict:
    """Per product (aligned arrays): level hits, top-5 hit, hierarchical F1 (a leaf has one
    ancestor per level, so hP = hR = matching levels / 3; a level-2 node is its (l1, l2)
    path, as in hierarchy.evaluate.metrics)."""
    l1, l2 = taxonomy.l1_of_l3[truth_l3], taxonomy.l2_of_l3[truth_l3]
    hit1 = pred["l1"] == l1
    hit2 = hit1 & (pred["l2"] == l2)
    hit3 = pred["l3"] == truth_l3
    cats = np.asarray(taxonomy.category_ids)[truth_l3]
    top5 = np.array([c in row[:5] for c, row in zip(cats, pred["top"])])
    return {"l1": hit1, "l2": hit2, "l3": hit3, "top5": top5,
            "hf1": (hit1.astype(int) + hit2 + hit3) / 3.0}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, draws: int, seed: int = 0) -> tuple:
    """Mean of a - b over products and its 95% percentile interval, resampling products
    (the same resample for both sides: the comparison is paired)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(draws)
    for i in range(draws):  # one resample at a time: draws x products never held at once
        means[i] = diff[rng.integers(0, diff.size, diff.size)].mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


# ----------------------------------------------------------------------------- pipeline
def read_test_predictions(output: Path, strategy: str, ids: np.ndarray, taxonomy) -> dict:
    """The predictions table's test rows of one strategy, aligned with ``ids``."""
    import pyarrow.dataset as pds

    table = pds.dataset(str(output / "predictions"), partitioning="hive").to_table(
        filter=(pds.field("run_id") == RUN_ID) & (pds.field("split") == "test")
        & (pds.field("strategy") == strategy),
        columns=["product_id", "l1", "l2", "l3", "top5"])
    pid = table.column("product_id").to_numpy()
    order = {int(p): i for i, p in enumerate(pid)}
    missing = [int(p) for p in ids if int(p) not in order]
    if missing:
        sys.exit(f"{strategy}: {len(missing)} test products have no prediction")
    idx = np.array([order[int(p)] for p in ids])
    top = [[c["category_id"] for c in row] for row in table.column("top5").to_pylist()]
    return {"l1": table.column("l1").to_numpy()[idx], "l2": table.column("l2").to_numpy()[idx],
            "l3": table.column("l3").to_numpy()[idx], "top": [top[i] for i in idx]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--products", type=int, default=3000)
    ap.add_argument("--test-products", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "results" / "quality"))
    ap.add_argument("--score-only", action="store_true",
                    help="reuse DIR's trained, evaluated and predicted run: only score it")
    ap.add_argument("overrides", nargs="*", help="section.key=value for every command")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    if args.score_only:
        compute = json.loads((work / "compute.json").read_text())
        score(args, work, compute["compute"], compute["train_images"])
        return

    work.mkdir(parents=True, exist_ok=True)
    conf = [f"catalog.warehouse={work / 'warehouse'}",
            f"catalog.metastore={work / 'warehouse' / 'metastore_db'}",
            "ingest.progress=false", "predict.progress=false", *args.overrides]
    syn, data, models, out = work / "synth", work / "dataset", work / "models", work / "output"
    for path in (data, models, out, work / "warehouse"):
        subprocess.run(["rm", "-rf", str(path)], check=True)

    say(f"[data] hard preset: {args.products} train + {args.test_products} test products, "
        f"seed {args.seed}")
    hierarchy("synth", "--preset", "hard", "--products", str(args.products), "--test-products",
              str(args.test_products), "--seed", str(args.seed), "--output", str(syn), conf=conf)
    cats = ["--categories", str(syn / "category_names.csv"), "--output", str(data)]
    hierarchy("ingest", "--input", str(syn / "train.bson"), *cats, "ingest.val_fraction=0.2",
              conf=conf)
    hierarchy("ingest", "--input", str(syn / "test.bson"), "--kind", "test", *cats, conf=conf)
    manifest = json.loads((data / "manifest.json").read_text())
    train_images = manifest["splits"]["train"]["images"]

    run = ["--data", str(data), "--models", str(models), "--run-id", RUN_ID]
    e, half = args.epochs, max(1, args.epochs // 2)
    seconds = {
        "flat": hierarchy("train", *run, "--level", "3", "--mode", "flat",
                          f"train.epochs={e}", conf=conf),
        "multi": hierarchy("train", *run, "--level", "3", "--mode", "multi",
                           f"train.epochs={e}", conf=conf),
        "level1": hierarchy("train", *run, "--level", "1", f"train.epochs={half}", conf=conf),
        "branch": hierarchy("train", *run, "--level", "3", "--mode", "branch",
                            f"train.epochs={half}", conf=conf),
    }
    compute = {
        "flat": {"image_epochs": e * train_images, "seconds": seconds["flat"]},
        "multi": {"image_epochs": e * train_images, "seconds": seconds["multi"]},
        "hierarchical": {"image_epochs": e * train_images, "seconds": seconds["multi"]},
        "two-stage": {"image_epochs": 2 * half * train_images,
                      "seconds": seconds["level1"] + seconds["branch"]},
    }
    say(f"[train] {train_images} training pictures; flat {seconds['flat']:.0f} s, multi "
        f"{seconds['multi']:.0f} s, level-1 + branches {seconds['level1'] + seconds['branch']:.0f}"
        " s")
    (work / "compute.json").write_text(json.dumps({"compute": compute,
                                                    "train_images": train_images}))
    hierarchy("evaluate", *run, "--output", str(out), conf=conf)
    for strategy in STRATEGIES:
        hierarchy("predict", *run, "--split", "test", "--strategy", strategy, "--output",
                  str(out), conf=conf)
    score(args, work, compute, train_images)


def score(args, work: Path, compute: dict, train_images: int) -> None:
    """Score the run's test predictions against the solution file; print and save."""
    syn, data, models, out = work / "synth", work / "dataset", work / "models", work / "output"
    e = args.epochs
    sys.path.insert(0, str(ROOT))
    from hierarchy.dataset import Dataset

    taxonomy = Dataset(str(data)).taxonomy()
    solution = np.loadtxt(syn / "test_solution.csv", delimiter=",", skiprows=1, dtype=np.int64,
                          ndmin=2)
    ids = solution[:, 0]
    truth = np.array([taxonomy.l3_of_category(int(c)) for c in solution[:, 1]])
    recorded = json.loads((models / RUN_ID / "run.json").read_text())
    scores = {s: product_scores(read_test_predictions(out, s, ids, taxonomy), truth, taxonomy)
              for s in STRATEGIES}

    rows = {}
    for s in STRATEGIES:
        d = paired_bootstrap(scores[s]["l3"], scores["flat"]["l3"], args.bootstrap)
        rows[s] = {**{f"accuracy_{k}": float(np.mean(scores[s][k])) for k in ("l1", "l2", "l3")},
                   "top5_accuracy": float(np.mean(scores[s]["top5"])),
                   "hierarchical_f1": float(np.mean(scores[s]["hf1"])),
                   **compute[s],
                   "l3_diff_to_flat": d[0], "l3_diff_ci95": [d[1], d[2]],
                   "val_accuracy_l3": recorded.get("strategy_scores", {}).get(s)}
    header = (f"{'strategy':<13}{'L1':>7}{'L2':>7}{'L3':>7}{'top-5':>7}{'hF1':>7}"
              f"{'img-epochs':>12}{'train s':>9}   L3 - flat [95% CI]")
    lines = [f"test split: {len(ids)} products (hard preset, seed {args.seed}); "
             f"budget {e} epochs of {train_images} training pictures", header]
    for s, r in rows.items():
        lo, hi = r["l3_diff_ci95"]
        diff = "" if s == "flat" else \
            f"   {100 * r['l3_diff_to_flat']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        lines.append(f"{s:<13}" + "".join(f"{100 * r[k]:>7.1f}" for k in (
            "accuracy_l1", "accuracy_l2", "accuracy_l3", "top5_accuracy", "hierarchical_f1"))
            + f"{r['image_epochs']:>12,}{r['seconds']:>9.0f}{diff}")
    fitted = {k: recorded.get("calibration", {}).get(k) for k in ("temperature", "w", "v")}
    lines.append(f"recommended on val: {recorded.get('recommended_strategy')}; hierarchical "
                 f"fitted on val: {json.dumps(fitted)}")
    say("\n".join(lines))
    result = {"settings": vars(args), "train_images": train_images,
              "test_products": int(len(ids)), "strategies": rows,
              "recommended": recorded.get("recommended_strategy"),
              "calibration": recorded.get("calibration")}
    (work / "quality.json").write_text(json.dumps(result, indent=2))
    plot(rows, work / "quality.png")
    say(f"-> {work / 'quality.json'}, {work / 'quality.png'}")


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(len(names))
    for i, key in enumerate(("accuracy_l1", "accuracy_l2", "accuracy_l3")):
        ax1.bar(x + (i - 1) * 0.27, [rows[n][key] for n in names], 0.27, label=key[-2:].upper())
    ax1.set_xticks(x, names)
    ax1.set_ylim(0, 1)
    ax1.set_title("test accuracy per level")
    ax1.legend()
    diffs = [100 * rows[n]["l3_diff_to_flat"] for n in names]
    err = np.array([[100 * (rows[n]["l3_diff_to_flat"] - rows[n]["l3_diff_ci95"][0]),
                     100 * (rows[n]["l3_diff_ci95"][1] - rows[n]["l3_diff_to_flat"])]
                    for n in names]).T
    ax2.errorbar(x, diffs, yerr=err, fmt="o", capsize=4)
    ax2.axhline(0, color="grey", lw=0.8)
    ax2.set_xticks(x, names)
    ax2.set_title("level-3 points vs flat (95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
