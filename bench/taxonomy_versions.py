"""A taxonomy change: the update over the old run's trunk against a full retrain, side by side.

    .venv/bin/python bench/taxonomy_versions.py [--products N] [--test-products M]
        [--epochs E] [--preset hard|fast] [--seed S] [--train-seeds 1,2,3] [--splits K]
        [--merges K] [--new-products P] [--workdir DIR] [key=value ...]

Runs the real pipeline with the `hierarchy` command on a change the project never trained on:
``hierarchy synth`` writes one catalog (N train + M test products, catalog seed S), and
:func:`hierarchy.synth.versions.evolve` makes two versions of it (v1; v2 with K leaves split,
K pairs merged, the leaves of a new level-2 node with P training products each, the v1
products relabelled). Both are ingested (val 20% of train). Then, per training seed:

  v1       flat for E epochs + --mode refit, on v1 (the run in production before the change)
  update   --mode refit --from-run v1, on v2: v1's trunk frozen, one forward pass over v2's
           train and val, a head over v2's leaves (what `hierarchy train --from-run` does)
  full     flat for E epochs + --mode refit, on v2 (the retrain the update replaces)

and the v2 test split is scored with each run's refit strategy (v1's on the v1 test split).
Test is scored against the generator's solution relabelled under each version: level-3
accuracy on every v2 test product and on those of the changed leaves (split, merged, added),
the negative flip rate (test products whose label both versions share, right under v1 and
wrong under the new run) and each side's training wall time and image-epochs. Means over the
training seeds with a 95% t-interval, and the paired difference update - full per seed.
Figures go to stdout and ``DIR/taxonomy_versions.json``; they depend on the machine and the
seeds, and are never asserted.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import hierarchy, say  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def interval(values) -> str:
    """mean [95% t-interval over seeds]."""
    x = np.asarray(values, float)
    if len(x) < 2:
        return f"{x.mean():.1f}"
    half = T95.get(len(x) - 1, 1.96) * x.std(ddof=1) / np.sqrt(len(x))
    return f"{x.mean():.1f} [{x.mean() - half:.1f}, {x.mean() + half:.1f}]"


def read_csv(path: Path) -> dict:
    with open(path) as fh:
        return {int(r["_id"]): int(r["category_id"]) for r in csv.DictReader(fh)}


def prepare(args, work: Path, conf: list) -> dict:
    """The catalog, its two versions, both ingested; returns the changes and image counts."""
    from hierarchy.synth.versions import evolve

    for path in ("truth", "versions", "v1", "v2", "models", "output", "warehouse"):
        subprocess.run(["rm", "-rf", str(work / path)], check=True)
    say(f"[data] {args.preset} preset: {args.products} train + {args.test_products} test "
        f"products, catalog seed {args.seed}")
    hierarchy("synth", "--preset", args.preset, "--products", str(args.products),
              "--test-products", str(args.test_products), "--seed", str(args.seed),
              "--output", str(work / "truth"), conf=conf)
    changes = evolve(str(work / "truth"), str(work / "versions"), seed=args.seed,
                     splits=args.splits, merges=args.merges, new_products=args.new_products)
    images = {}
    for v in ("v1", "v2"):
        src = work / "versions" / v
        cats = ["--categories", str(src / "category_names.csv"), "--output", str(work / v)]
        hierarchy("ingest", "--input", str(src / "train.bson"), *cats,
                  "ingest.val_fraction=0.2", conf=conf)
        hierarchy("ingest", "--input", str(src / "test.bson"), "--kind", "test", *cats,
                  conf=conf)
        splits = json.loads((work / v / "manifest.json").read_text())["splits"]
        images[v] = {s: splits[s]["images"] for s in ("train", "val")}
    say(f"[versions] split {changes['split']}, merged {changes['merged']}, added under a new "
        f"level-2 node {changes['added_under_new_node']} ({args.new_products} products each)")
    return {"changes": changes, "images": images}


def train(work: Path, conf: list, version: str, run_id: str, epochs: int,
          from_run: str = "") -> dict:
    """flat + refit (or refit --from-run); wall seconds of each command."""
    run = ["--data", str(work / version), "--models", str(work / "models"), "--run-id", run_id]
    took = {}
    if not from_run:
        took["flat"] = hierarchy("train", *run, "--level", "3", "--mode", "flat",
                                 f"train.epochs={epochs}", conf=conf)
    extra = ["--from-run", from_run] if from_run else []
    took["refit"] = hierarchy("train", *run, "--level", "3", "--mode", "refit", *extra,
                              conf=conf)
    return took


def predict(work: Path, conf: list, version: str, run_id: str) -> dict:
    out = work / "output" / run_id
    hierarchy("predict", "--data", str(work / version), "--models", str(work / "models"),
              "--run-id", run_id, "--split", "test", "--strategy", "refit", "--output",
              str(out), conf=conf)
    return read_csv(out / "submission.csv")


def one_seed(args, work: Path, conf: list, seed: int) -> dict:
    conf = [*conf, f"train.seed={seed}"]
    v1, upd, full = f"v1-{seed}", f"update-{seed}", f"full-{seed}"
    took = {"v1": train(work, conf, "v1", v1, args.epochs),
            "update": train(work, conf, "v2", upd, args.epochs, from_run=v1),
            "full": train(work, conf, "v2", full, args.epochs)}
    preds = {"v1": predict(work, conf, "v1", v1), "update": predict(work, conf, "v2", upd),
             "full": predict(work, conf, "v2", full)}
    say(f"[seed {seed}] update {sum(took['update'].values()):.0f} s, full retrain "
        f"{sum(took['full'].values()):.0f} s")
    return {"seconds": took, "predictions": preds}


def submissions(work: Path, seed: str) -> dict:
    """The three test submissions of a training seed, as predict left them."""
    return {k: read_csv(work / "output" / f"{k}-{seed}" / "submission.csv")
            for k in ("v1", "update", "full")}


def figures(work: Path, changes: dict, run: dict, hits: dict) -> dict:
    """Per side: level-3 accuracy on v2 test, on the changed leaves' products, negative flip
    rate against v1 (percent); each product's hits are added to ``hits`` (for the bootstrap
    over products)."""
    truth = {v: read_csv(work / "versions" / v / "test_solution.csv") for v in ("v1", "v2")}
    changed = {int(c) for ids in changes["split"].values() for c in ids}
    changed |= {int(m) for m in changes["merged"]} | set(changes["added_under_new_node"])
    ids = np.array(sorted(truth["v2"]))
    t2 = np.array([truth["v2"][p] for p in ids])
    t1 = np.array([truth["v1"].get(p, -1) for p in ids])
    pred = {k: np.array([run["predictions"][k].get(p, -1) for p in ids])
            for k in ("update", "full")}
    p1 = np.array([run["predictions"]["v1"].get(p, -2) for p in ids])
    same = t1 == t2
    old_right = same & (p1 == t1)
    on_changed = np.isin(t2, sorted(changed))
    kinds = {"split": [int(c) for ids in changes["split"].values() for c in ids],
             "merged": [int(m) for m in changes["merged"]],
             "added": list(changes["added_under_new_node"])}
    out = {}
    for k, p in pred.items():
        out[k] = {"accuracy": 100 * (p == t2).mean(),
                  "changed_accuracy": 100 * (p[on_changed] == t2[on_changed]).mean(),
                  **{f"{kind}_accuracy": 100 * (p[np.isin(t2, c)] == t2[np.isin(t2, c)]).mean()
                     for kind, c in kinds.items()},
                  "negative_flip_rate": 100 * (old_right & (p != t2)).sum() / same.sum(),
                  "seconds": sum(run["seconds"][k].values())}
        hits.setdefault(k, []).append(p == t2)
    hits["changed"] = on_changed
    out["products"] = {"test": int(len(ids)), "changed": int(on_changed.sum()),
                       "same_label": int(same.sum()),
                       **{kind: int(np.isin(t2, c).sum()) for kind, c in kinds.items()}}
    return out


def by_products(hits: dict, draws: int) -> dict:
    """update - full in points, each product's hits averaged over the seeds, with a paired
    bootstrap 95% interval over products: overall and on the changed leaves."""
    from quality import paired_bootstrap

    upd, full = (np.mean(hits[k], axis=0) for k in ("update", "full"))
    on = hits["changed"]
    return {"accuracy": [100 * x for x in paired_bootstrap(upd, full, draws)],
            "changed_accuracy": [100 * x for x in paired_bootstrap(upd[on], full[on], draws)]}


def report(args, prepared: dict, per_seed: dict, hits: dict) -> dict:
    seeds = sorted(per_seed)
    rows = {k: {m: [per_seed[s][k][m] for s in seeds] for m in
                ("accuracy", "changed_accuracy", "negative_flip_rate", "seconds")}
            for k in ("update", "full")}
    img = prepared["images"]["v2"]
    epochs = {"update": img["train"] + img["val"],  # the feature pass: one forward pass
              "full": args.epochs * img["train"] + img["train"] + img["val"]}
    n = per_seed[seeds[0]]["products"]
    say(f"\nv2 test: {n['test']} products, {n['changed']} of changed leaves, "
        f"{n['same_label']} whose label both versions share; seeds {', '.join(seeds)}")
    say(f"{'side':<8} {'L3 accuracy':>20} {'changed leaves':>20} {'negative flips':>18} "
        f"{'train s':>18} {'image-epochs':>13}")
    for k in ("update", "full"):
        r = rows[k]
        say(f"{k:<8} {interval(r['accuracy']):>20} {interval(r['changed_accuracy']):>20} "
            f"{interval(r['negative_flip_rate']):>18} {interval(r['seconds']):>18} "
            f"{epochs[k]:>13,}")
    diff = {m: [a - b for a, b in zip(rows["update"][m], rows["full"][m])]
            for m in ("accuracy", "changed_accuracy", "negative_flip_rate")}
    ratio = [a / b for a, b in zip(rows["update"]["seconds"], rows["full"]["seconds"])]
    say(f"update - full, points [95% CI over seeds]: L3 {interval(diff['accuracy'])}, changed "
        f"leaves {interval(diff['changed_accuracy'])}, negative flips "
        f"{interval(diff['negative_flip_rate'])}")
    say(f"update / full training wall time: {interval([100 * r for r in ratio])} %")
    for kind in ("split", "merged", "added"):
        say(f"  {kind} leaves ({n[kind]} test products): update "
            f"{interval([per_seed[s]['update'][f'{kind}_accuracy'] for s in seeds])}, full "
            f"{interval([per_seed[s]['full'][f'{kind}_accuracy'] for s in seeds])}")
    b = by_products(hits, args.bootstrap)
    say("update - full, points, products resampled (each product's hits averaged over the "
        "seeds): " + ", ".join(f"{name} {d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]" for name, d in
                              (("L3", b["accuracy"]), ("changed leaves",
                                                       b["changed_accuracy"]))))
    return {"rows": rows, "difference": diff, "wall_ratio": ratio, "image_epochs": epochs,
            "products": n, "bootstrap": b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--products", type=int, default=3000)
    ap.add_argument("--test-products", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=4, help="the flat model's (the recipe's)")
    ap.add_argument("--preset", choices=("hard", "fast"), default="hard")
    ap.add_argument("--seed", type=int, default=11, help="of the catalog and its change")
    ap.add_argument("--train-seeds", type=lambda v: [int(x) for x in v.split(",")],
                    default=[1, 2, 3])
    ap.add_argument("--splits", type=int, default=2)
    ap.add_argument("--merges", type=int, default=1)
    ap.add_argument("--new-products", type=int, default=8)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "results" / "taxonomy_versions"))
    ap.add_argument("--score-only", action="store_true",
                    help="score DIR's runs again from their submissions (no training)")
    ap.add_argument("overrides", nargs="*", help="section.key=value for every command")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    conf = [f"paths.root={work}", "ingest.progress=false", "predict.progress=false",
            *args.overrides]
    per_seed, hits = {}, {}
    if args.score_only:
        saved = json.loads((work / "taxonomy_versions.json").read_text())
        prepared = {k: saved[k] for k in ("changes", "images")}
        for seed, got in saved["per_seed"].items():
            run = {"seconds": {k: {"all": got[k]["seconds"]} for k in ("update", "full")},
                   "predictions": submissions(work, seed)}
            per_seed[seed] = figures(work, prepared["changes"], run, hits)
    else:
        prepared = prepare(args, work, conf)
        for seed in args.train_seeds:
            run = one_seed(args, work, conf, seed)
            per_seed[str(seed)] = figures(work, prepared["changes"], run, hits)
    summary = report(args, prepared, per_seed, hits)
    (work / "taxonomy_versions.json").write_text(json.dumps(
        {"args": vars(args), **prepared, "per_seed": per_seed, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
