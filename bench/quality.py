"""Model quality of every predict strategy at a stated compute, on a catalog hard enough to tell.

    .venv/bin/python bench/quality.py [--products N] [--test-products M] [--epochs E]
                                      [--seed S] [--preset hard|tangled|fast] [--train-seeds 1,2,3]
                                      [--workdir DIR] [--bootstrap B]
                                      [--score-only | --reevaluate] [key=value ...]

Runs the real pipeline with the `hierarchy` command (as a scheduler would), on
``hierarchy synth --preset hard`` (N train products, M test products; ``--preset tangled``:
the same pictures with look-alike leaves in different branches, where the coarse level is the
hard one and the taxonomy cannot help a decision; ``--preset fast``: the easy catalog of the
demo and the tests, where every strategy should reach the leaf and none may lose to flat):

  ingest      train (val_fraction 0.2) and test;
  train       (one run per training seed)
              flat       --level 3 --mode flat, E epochs
              multi      --level 3 --mode multi, E-1 epochs (one backbone, levels 1-3 and a
                         per-branch head)
              hierarchical  multi, then --level 3 --mode experts: one forward pass of the
                         multi model's trunk over train (counted as a whole image-epoch, an
                         upper bound) and per-branch heads over those features: E in all
              flat+refit the control at the same compute: flat for E-1 epochs, then
                         --mode refit (its level-3 head refit on its frozen features; its
                         own run, which the next row shares)
              flat+fusion the same flat model, then --mode fusion (a product's pictures
                         weighed by a head trained on whole products): E in all
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
# the controls: flat for E-1 epochs, then a head over its frozen features for the feature
# pass (--mode refit: its own level-3 head refit; --mode fusion: a head over a product's
# pictures): the same compute as hierarchical with no hierarchy in it. Each is scored from
# its strategy's rows of the control run.
CONTROL = "flat+refit"
CONTROLS = {CONTROL: "refit", "flat+fusion": "fusion"}
ROWS = (*STRATEGIES, *CONTROLS)


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
def read_test_predictions(output: Path, run_id: str, strategy: str, ids: np.ndarray,
                          taxonomy) -> dict:
    """The predictions table's test rows of one run and strategy, aligned with ``ids``."""
    import pyarrow.dataset as pds

    table = pds.dataset(str(output.parent / "warehouse" / "predictions"),
                        partitioning="hive").to_table(
        filter=(pds.field("run_id") == run_id) & (pds.field("split") == "test")
        & (pds.field("strategy") == strategy),
        columns=["product_id", "l1", "l2", "l3", "top5", "confidence", "decision_level",
                 "decision_id", "decision_name"])
    pid = table.column("product_id").to_numpy()
    order = {int(p): i for i, p in enumerate(pid)}
    missing = [int(p) for p in ids if int(p) not in order]
    if missing:
        sys.exit(f"{run_id} {strategy}: {len(missing)} test products have no prediction")
    idx = np.array([order[int(p)] for p in ids])
    top = [[c["category_id"] for c in row] for row in table.column("top5").to_pylist()]
    col = {c: table.column(c).to_numpy(zero_copy_only=False)[idx]
           for c in ("l1", "l2", "l3", "confidence")}
    level = table.column("decision_level").to_pandas().fillna(-1).to_numpy(int)[idx]
    names = table.column("decision_name").to_pylist()
    ids_ = table.column("decision_id").to_pylist()
    return {**col, "top": [top[i] for i in idx], "decision_level": level,
            "decision_id": [ids_[i] for i in idx], "decision_name": [names[i] for i in idx]}


def decision_scores(pred: dict, truth_l3: np.ndarray, taxonomy) -> dict:
    """Per product: filed (at some level), right (the node is the truth or an ancestor), the
    level, and the leaf's own confidence and hit (for the leaf-only control)."""
    level = pred["decision_level"]
    right = np.zeros(len(truth_l3), dtype=bool)
    for i, (lv, t) in enumerate(zip(level, truth_l3)):
        names = taxonomy.names_of_l3(int(t))
        if lv == 3:
            right[i] = pred["decision_id"][i] == taxonomy.category_of_l3(int(t))
        elif lv == 2:
            right[i] = pred["decision_name"][i] == f"{names[0]} > {names[1]}"
        elif lv == 1:
            right[i] = pred["decision_id"][i] == int(taxonomy.l1_of_l3[int(t)])
    filed = level > 0
    wrong_leaf = pred["l3"] != truth_l3
    return {"filed": filed, "right": right & filed, "level": level,
            "conf": pred["confidence"], "leaf_hit": pred["l3"] == truth_l3,
            "wrong_leaf": wrong_leaf,
            "wrong_same_l1": wrong_leaf & (pred["l1"] == taxonomy.l1_of_l3[truth_l3]),
            "wrong_same_l2": wrong_leaf & (pred["l1"] == taxonomy.l1_of_l3[truth_l3])
            & (pred["l2"] == taxonomy.l2_of_l3[truth_l3])}


def leaf_oracle(conf: np.ndarray, hit: np.ndarray, precision: float) -> float:
    """The most a leaf-confidence threshold fitted on these very products files at
    ``precision`` (the strongest leaf-only control: it has seen the answers)."""
    order = np.argsort(-conf, kind="stable")
    prec = np.cumsum(hit[order]) / np.arange(1, len(hit) + 1)
    ok = np.flatnonzero(prec >= precision)
    return float((ok.max() + 1) / len(hit)) if ok.size else 0.0


def bootstrap(values, draws: int, stat, seed: int = 0) -> tuple:
    """``stat`` of the products and its 95% percentile interval, products resampled."""
    rng = np.random.default_rng(seed)
    n = len(values[0])
    got = [stat(*[v[idx] for v in values]) for idx in
           (rng.integers(0, n, n) for _ in range(draws))]
    lo, hi = np.nanpercentile(got, [2.5, 97.5])
    return float(stat(*values)), float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--products", type=int, default=3000)
    ap.add_argument("--test-products", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=11, help="of the synthetic catalog")
    ap.add_argument("--preset", choices=("hard", "tangled", "fast"), default="hard")
    ap.add_argument("--train-seeds", type=lambda v: [int(x) for x in v.split(",")],
                    default=[1, 2, 3], help="one run per training seed (comma-separated)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "results" / "quality"))
    ap.add_argument("--score-only", action="store_true",
                    help="reuse DIR's trained, evaluated and predicted run: only score it")
    ap.add_argument("--reevaluate", action="store_true",
                    help="reuse DIR's trained models: evaluate and predict again (after a "
                         "change to the decision rule or the choice of strategy), then score")
    ap.add_argument("overrides", nargs="*", help="section.key=value for every command")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    conf = [f"paths.root={work}",
            "ingest.progress=false", "predict.progress=false", *args.overrides]
    if args.score_only or args.reevaluate:
        compute = json.loads((work / "compute.json").read_text())
        for seed in compute["compute"] if args.reevaluate else ():
            evaluate_and_predict(conf, work / "dataset", work / "models", work / "output", seed)
        score(args, work, compute["compute"], compute["train_images"])
        return

    work.mkdir(parents=True, exist_ok=True)
    syn, data, models, out = work / "synth", work / "dataset", work / "models", work / "output"
    for path in (data, models, out, work / "warehouse"):
        subprocess.run(["rm", "-rf", str(path)], check=True)

    say(f"[data] {args.preset} preset: {args.products} train + {args.test_products} test products, "
        f"seed {args.seed}")
    hierarchy("synth", "--preset", args.preset, "--products", str(args.products), "--test-products",
              str(args.test_products), "--seed", str(args.seed), "--output", str(syn), conf=conf)
    cats = ["--categories", str(syn / "category_names.csv"), "--output", str(data)]
    hierarchy("ingest", "--input", str(syn / "train.bson"), *cats, "ingest.val_fraction=0.2",
              conf=conf)
    hierarchy("ingest", "--input", str(syn / "test.bson"), "--kind", "test", *cats, conf=conf)
    manifest = json.loads((data / "manifest.json").read_text())
    train_images = manifest["splits"]["train"]["images"]

    runs = {}
    for seed in args.train_seeds:
        runs[str(seed)] = train_and_predict(args, conf, data, models, out, train_images, seed)
    (work / "compute.json").write_text(json.dumps({"compute": runs,
                                                    "train_images": train_images}))
    score(args, work, runs, train_images)


def run_id_of(seed) -> str:
    return f"{RUN_ID}-{seed}"


def control_id_of(seed) -> str:
    return f"{RUN_ID}-{seed}-refit"


def test_rows(out: Path, seed: str, row: str, ids, taxonomy) -> dict:
    if row in CONTROLS:
        return read_test_predictions(out, control_id_of(seed), CONTROLS[row], ids, taxonomy)
    return read_test_predictions(out, run_id_of(seed), row, ids, taxonomy)


def train_and_predict(args, conf, data, models, out, train_images: int, seed: int) -> dict:
    """Train every model of one run (training seed ``seed``), evaluate it, predict test with
    every strategy; returns each strategy's compute."""
    run = ["--data", str(data), "--models", str(models), "--run-id", run_id_of(seed)]
    conf = [*conf, f"train.seed={seed}"]
    e, half = args.epochs, max(1, args.epochs // 2)
    seconds = {
        "flat": hierarchy("train", *run, "--level", "3", "--mode", "flat",
                          f"train.epochs={e}", conf=conf),
        # the experts' feature pass is one (forward-only) pass over train: counted as a whole
        # image-epoch, so the multi-level model gets one epoch less than flat
        "multi": hierarchy("train", *run, "--level", "3", "--mode", "multi",
                           f"train.epochs={max(1, e - 1)}", conf=conf),
        "experts": hierarchy("train", *run, "--level", "3", "--mode", "experts", conf=conf),
        "level1": hierarchy("train", *run, "--level", "1", f"train.epochs={half}", conf=conf),
        "branch": hierarchy("train", *run, "--level", "3", "--mode", "branch",
                            f"train.epochs={half}", conf=conf),
    }
    compute = {
        "flat": {"image_epochs": e * train_images, "seconds": seconds["flat"]},
        "multi": {"image_epochs": max(1, e - 1) * train_images, "seconds": seconds["multi"]},
        "hierarchical": {"image_epochs": (max(1, e - 1) + 1) * train_images,
                         "seconds": seconds["multi"] + seconds["experts"]},
        "two-stage": {"image_epochs": 2 * half * train_images,
                      "seconds": seconds["level1"] + seconds["branch"]},
    }
    control = ["--data", str(data), "--models", str(models), "--run-id", control_id_of(seed)]
    base = hierarchy("train", *control, "--level", "3", "--mode", "flat",
                     f"train.epochs={max(1, e - 1)}", conf=conf)
    for row, mode in CONTROLS.items():
        compute[row] = {"image_epochs": compute["hierarchical"]["image_epochs"],
                        "seconds": base + hierarchy("train", *control, "--level", "3",
                                                    "--mode", mode, conf=conf)}
    seconds["control"] = compute[CONTROL]["seconds"]
    say(f"[train seed {seed}] {train_images} training pictures; flat {seconds['flat']:.0f} s, "
        f"multi {seconds['multi']:.0f} s + experts {seconds['experts']:.0f} s, level-1 + "
        f"branches {seconds['level1'] + seconds['branch']:.0f} s")
    evaluate_and_predict(conf, data, models, out, seed)
    return compute


def evaluate_and_predict(conf, data, models, out, seed) -> None:
    """Evaluate both runs of a training seed (each fits its rules and records its default)
    and predict the test split with every strategy."""
    conf = [*conf, f"train.seed={seed}"]
    for run_id, strategies in ((run_id_of(seed), STRATEGIES),
                               (control_id_of(seed), tuple(CONTROLS.values()))):
        run = ["--data", str(data), "--models", str(models), "--run-id", run_id]
        hierarchy("evaluate", *run, "--output", str(out), conf=conf)
        for strategy in strategies:
            hierarchy("predict", *run, "--split", "test", "--strategy", strategy, "--output",
                      str(out), conf=conf)


def score(args, work: Path, runs: dict, train_images: int) -> None:
    """Score every run's test predictions against the solution file; print and save.

    Per strategy: the mean over training seeds of each product's hits, so the interval
    (products resampled, paired with flat) is about the test products; the spread between
    seeds is printed beside it (``per seed``)."""
    syn, data, models, out = work / "synth", work / "dataset", work / "models", work / "output"
    e = args.epochs
    sys.path.insert(0, str(ROOT))
    from hierarchy.contracts.dataset import Dataset

    taxonomy = Dataset(str(data)).taxonomy()
    solution = np.loadtxt(syn / "test_solution.csv", delimiter=",", skiprows=1, dtype=np.int64,
                          ndmin=2)
    ids = solution[:, 0]
    truth = np.array([taxonomy.l3_of_category(int(c)) for c in solution[:, 1]])
    seeds = list(runs)
    recorded = {seed: json.loads((models / run_id_of(seed) / "run.json").read_text())
                for seed in seeds}
    per_seed = {seed: {s: product_scores(test_rows(out, seed, s, ids, taxonomy), truth, taxonomy)
                       for s in ROWS} for seed in seeds}
    scores = {s: {k: np.mean([per_seed[seed][s][k] for seed in seeds], axis=0)
                  for k in ("l1", "l2", "l3", "top5", "hf1")} for s in ROWS}

    rows = {}
    for s in ROWS:
        d = paired_bootstrap(scores[s]["l3"], scores["flat"]["l3"], args.bootstrap)
        rows[s] = {**{f"accuracy_{k}": float(np.mean(scores[s][k])) for k in ("l1", "l2", "l3")},
                   "top5_accuracy": float(np.mean(scores[s]["top5"])),
                   "hierarchical_f1": float(np.mean(scores[s]["hf1"])),
                   "image_epochs": runs[seeds[0]][s]["image_epochs"],
                   "seconds": float(np.mean([runs[seed][s]["seconds"] for seed in seeds])),
                   "l3_diff_to_flat": d[0], "l3_diff_ci95": [d[1], d[2]],
                   "l3_diff_per_seed": {seed: float(np.mean(per_seed[seed][s]["l3"]) -
                                                    np.mean(per_seed[seed]["flat"]["l3"]))
                                        for seed in seeds},
                   "accuracy_l3_per_seed": {seed: float(np.mean(per_seed[seed][s]["l3"]))
                                            for seed in seeds},
                   "val_accuracy_l3": {seed: recorded[seed].get("strategy_scores", {}).get(s)
                                       for seed in seeds} if s not in CONTROLS else None}
    header = (f"{'strategy':<13}{'L1':>7}{'L2':>7}{'L3':>7}{'top-5':>7}{'hF1':>7}"
              f"{'img-epochs':>12}{'train s':>9}   L3 - flat [95% CI]  per seed")
    lines = [f"test split: {len(ids)} products ({args.preset} preset, catalog seed {args.seed}); "
             f"budget {e} epochs of {train_images} training pictures; training seeds "
             f"{', '.join(seeds)} (figures are means over them)", header]
    for s, r in rows.items():
        lo, hi = r["l3_diff_ci95"]
        diff = "" if s == "flat" else \
            f"   {100 * r['l3_diff_to_flat']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" + \
            "  " + " ".join(f"{100 * v:+.1f}" for v in r["l3_diff_per_seed"].values())
        lines.append(f"{s:<13}" + "".join(f"{100 * r[k]:>7.1f}" for k in (
            "accuracy_l1", "accuracy_l2", "accuracy_l3", "top5_accuracy", "hierarchical_f1"))
            + f"{r['image_epochs']:>12,}{r['seconds']:>9.0f}{diff}")
    ctl = paired_bootstrap(scores["hierarchical"]["l3"], scores[CONTROL]["l3"], args.bootstrap)
    lines.append(f"hierarchical - {CONTROL} (what the split into branch experts adds over the "
                 f"same head training): {100 * ctl[0]:+.1f} [{100 * ctl[1]:+.1f}, "
                 f"{100 * ctl[2]:+.1f}]")
    fus = paired_bootstrap(scores["flat+fusion"]["l3"], scores[CONTROL]["l3"], args.bootstrap)
    lines.append(f"flat+fusion - {CONTROL} (what weighing a product's pictures adds over the "
                 f"same head per picture): {100 * fus[0]:+.1f} [{100 * fus[1]:+.1f}, "
                 f"{100 * fus[2]:+.1f}]")
    recipe = recipe_row(args, work, seeds, per_seed, scores)
    lines.append(recipe["line"])
    for seed in seeds:
        fitted = {k: recorded[seed].get("calibration", {}).get(k)
                  for k in ("model", "temperature", "w", "v")}
        control = json.loads((models / control_id_of(seed) / "run.json").read_text())
        lines.append(f"seed {seed}: recommended on val: "
                     f"{recorded[seed].get('recommended_strategy')} (control run: "
                     f"{control.get('recommended_strategy')}); hierarchical fitted on val:"
                     f" {json.dumps(fitted)}")
    decisions, dlines = decision_table(args, out, seeds, ids, truth, taxonomy, recorded)
    lines += dlines
    say("\n".join(lines))
    result = {"settings": vars(args), "train_images": train_images, "decisions": decisions,
              "test_products": int(len(ids)), "strategies": rows,
              "hierarchical_minus_control": {"l3": ctl[0], "ci95": [ctl[1], ctl[2]]},
              "fusion_minus_refit": {"l3": fus[0], "ci95": [fus[1], fus[2]]},
              "recipe": {k: v for k, v in recipe.items() if k != "line"},
              "recommended": {seed: recorded[seed].get("recommended_strategy")
                              for seed in seeds},
              "calibration": {seed: recorded[seed].get("calibration") for seed in seeds}}
    (work / "quality.json").write_text(json.dumps(result, indent=2))
    plot(rows, work / "quality.png")
    say(f"-> {work / 'quality.json'}, {work / 'quality.png'}")


def recipe_row(args, work: Path, seeds: list, per_seed: dict, scores: dict) -> dict:
    """The README's recipe (flat, then refit and fusion over it: the control run) with the
    strategy its evaluate recommended, per seed, against the best simple control at the same
    compute (flat, flat+refit): the recipe must do at least as well."""
    rows = {CONTROLS[r]: r for r in CONTROLS}
    picked, hits = {}, []
    for seed in seeds:
        run = json.loads((work / "models" / control_id_of(seed) / "run.json").read_text())
        name = run.get("recommended_strategy")
        row = rows.get(name)  # the control run's own flat (E-1 epochs) is not scored on test
        picked[seed] = name
        if row is not None:
            hits.append(per_seed[seed][row]["l3"])
    if len(hits) != len(seeds):
        return {"picked": picked, "line": f"recipe: recommended {picked} (not all scored)"}
    mean = np.mean(hits, axis=0)
    # the simple controls at (about) the same compute: flat alone and flat + a refit head
    best = max(("flat", CONTROL), key=lambda r: float(np.mean(scores[r]["l3"])))
    d = paired_bootstrap(mean, scores[best]["l3"], args.bootstrap)
    return {"picked": picked, "accuracy_l3": float(mean.mean()), "best_control": best,
            "minus_best_control": {"l3": d[0], "ci95": [d[1], d[2]]},
            "line": f"recipe (flat + refit + fusion, evaluate's pick per seed: "
                    f"{', '.join(f'{k}: {v}' for k, v in picked.items())}): L3 "
                    f"{100 * mean.mean():.1f}, minus the best control ({best}) "
                    f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"}


def decision_table(args, out: Path, seeds: list, ids, truth, taxonomy, recorded: dict):
    """The decisions of every strategy on test, pooled over the training seeds (each seed's
    products are one more draw; intervals resample products within the pool): realized
    precision, coverage per level, the leaf-only control fitted on test itself at the same
    precision, mistake severity; against flat's own leaves summed up the tree (the ``flat``
    row: the same rule over the flat distribution)."""
    per = {s: [decision_scores(test_rows(out, seed, s, ids, taxonomy), truth, taxonomy)
               for seed in seeds] for s in ROWS}
    pooled = {s: {k: np.concatenate([d[k] for d in per[s]]) for k in per[s][0]} for s in ROWS}
    target = None
    for seed in seeds:
        for rule in (recorded[seed].get("decisions") or {}).values():
            target = rule.get("target", target)
    out_rows, lines = {}, ["", f"decisions on test (target precision {target}; pooled over "
                              f"training seeds {', '.join(seeds)}; 95% bootstrap intervals)",
                           f"{'strategy':<13}{'filed':>20}{'precision':>20}{'leaf':>7}"
                           f"{'L2':>7}{'L1':>7}{'leaf-only*':>11}{'filed - leaf-only*':>22}"
                           f"{'wrong in L2/L1':>16}"]
    for s in ROWS:
        d = pooled[s]
        if not (d["level"] >= 0).any():
            lines.append(f"{s:<13} no decision rule in the table")
            continue
        cov = bootstrap([d["filed"]], args.bootstrap, lambda f: f.mean())
        prec = bootstrap([d["filed"], d["right"]], args.bootstrap,
                         lambda f, r: r.sum() / f.sum() if f.sum() else np.nan)
        realized = prec[0] if not np.isnan(prec[0]) else 1.0
        oracle = leaf_oracle(d["conf"], d["leaf_hit"], realized)
        gain = bootstrap([d["filed"], d["conf"], d["leaf_hit"]], args.bootstrap,
                         lambda f, c, h, at=realized: f.mean() - leaf_oracle(c, h, at))
        per_level = {lv: float(np.mean(d["level"] == lv)) for lv in (3, 2, 1)}
        wrong = d["wrong_leaf"].sum()
        sev = {"same_level2": float(d["wrong_same_l2"].sum() / wrong) if wrong else None,
               "same_level1": float(d["wrong_same_l1"].sum() / wrong) if wrong else None}
        out_rows[s] = {"coverage": cov, "precision": prec, "per_level": per_level,
                       "leaf_only_oracle": oracle, "coverage_minus_leaf_only": gain,
                       "severity": sev}
        f = lambda x: f"{100 * x[0]:.1f} [{100 * x[1]:.1f}, {100 * x[2]:.1f}]"  # noqa: E731
        lines.append(f"{s:<13}{f(cov):>20}{f(prec):>20}" + "".join(
            f"{100 * per_level[lv]:>7.1f}" for lv in (3, 2, 1)) + f"{100 * oracle:>11.1f}"
            f"{f(gain):>22}{100 * (sev['same_level2'] or 0):>8.0f}/"
            f"{100 * (sev['same_level1'] or 0):.0f}")
    lines.append("* leaf-only: the most a leaf-confidence threshold fitted on test itself "
                 "files at the strategy's realized precision")
    return out_rows, lines


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
