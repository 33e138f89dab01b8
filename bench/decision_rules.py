"""Decision rules side by side: coverage and realized precision per rule, per val size and per
band of train support, over many draws of val from scored products whose truth is known.

Two steps, so the models run once and the rules are compared on thousands of val draws:

  dump      scores val and test of a trained, evaluated run with every strategy it can serve
            (the evaluate pass: :func:`hierarchy.evaluate.decisions.evaluation_partitions`),
            test's truth read from synth's ``test_solution.csv`` — the pipeline never reads it;
            writes each product's best node and its probability per level at the rule's
            temperature, its truth and its leaf's train products (an .npz, a few MB).
  simulate  pools val and test (both drawn like new products when val is drawn by product,
            ``ingest.val_draw: product``), and per draw cuts a val of N products (fit and
            calibration parts at ``--share``) and tests the rest: each rule certifies a
            threshold on that val; the rest measures what it files and how right it is, per
            band of the true leaf's train products; a threshold fitted on the rest itself
            (the climbing rule's, and a leaf-only one) is the ceiling.

    python bench/decision_rules.py dump --data DS --models M --run-id R \\
        --solution SYN/test_solution.csv --output R.npz [section.key=value ...]
    python bench/decision_rules.py simulate R1.npz R2.npz ... [--strategy fusion] \\
        [--sizes 100,250,1000,5000] [--draws 200] [--target 0.95] [--confidence 0.95]

Each .npz is one training seed; the table gives each rule's mean over draws and seeds with a
95% interval over seeds x draws (the draw-to-draw spread of val is the promise's own subject),
and the share of draws whose realized precision fell under the target. The temperature is the
one evaluate fitted on the run's val (one number; stated in the output)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hierarchy.contracts import rules as declared  # noqa: E402
from hierarchy.infer import decide, rules  # noqa: E402
from hierarchy.infer.rules import Curves  # noqa: E402

LEVELS = (3, 2, 1)


# --------------------------------------------------------------------------- dump
def dump(args) -> None:
    import pandas as pd
    from pyspark.sql import functions as F

    from hierarchy.contracts.config import load_config
    from hierarchy.contracts.dataset import TEST, VAL, Dataset
    from hierarchy.contracts.modelstore import ModelStore
    from hierarchy.evaluate import decisions
    from hierarchy.evaluate.pipeline import check_evaluate
    from hierarchy.infer.pipeline import (
        grouped_split,
        scoring_plan,
        train_support,
        training_prior,
    )
    from hierarchy.spark import get_spark, stop_spark

    cfg = load_config(overrides=args.overrides)
    checked = check_evaluate(args.data, args.models, args.run_id, args.scratch, cfg.variants)
    tax = Dataset(args.data).taxonomy()
    run = ModelStore(args.models).run(args.run_id).read()
    spark = get_spark(cfg, "bench-decision-rules")
    try:
        prior = training_prior(spark, args.data)
        support = train_support(spark, args.data, tax)
        plans = {s: scoring_plan(spark, cfg, args.data, c.taxonomy,
                                 replace(c.modelset, decision=None), prior)
                 for s, c in checked.items()}
        temps = {s: (run.rule(s).temperature if run.rule(s) else 1.0) for s in plans}
        grids = decide.Grids(temperatures=tuple(sorted(set(temps.values()))))
        sol = pd.read_csv(args.solution)
        known = set(tax.category_ids)
        sol = sol[sol["category_id"].isin(known)]
        truth = spark.createDataFrame(pd.DataFrame({
            "pid": sol["_id"].astype("int64"),
            "t_cat": sol["category_id"].astype("int64"),
            "t_l3": [tax.l3_of_category(c) for c in sol["category_id"]]}))
        frames = []
        for split in (VAL, TEST):
            grouped = grouped_split(spark, args.data, split, cfg.predict.partitions,
                                    persist=False)
            if split == TEST:
                grouped = (grouped.join(truth, grouped.product_id == truth.pid, "left")
                           .withColumn("category_id", F.col("t_cat"))
                           .withColumn("l3", F.col("t_l3")).drop("pid", "t_cat", "t_l3"))
            got = (grouped.withColumn("part", F.lit(0))
                   .mapInPandas(decisions.evaluation_partitions(plans, grids, LEVELS),
                                decisions.SUMMARY_DDL)
                   .where(F.col("product_id").isNotNull() & F.col("scored"))
                   .select("strategy", "product_id", "true_l3", "node", "node_p").toPandas())
            frames.append(got.assign(test=int(split == TEST)))
    finally:
        stop_spark(spark)
    rows = pd.concat(frames).dropna(subset=["true_l3"])
    nodes = decide.Nodes.of(tax)
    out = {"support": support, "of_leaf2": nodes.of_leaf[2], "of_leaf1": nodes.of_leaf[1],
           "strategies": np.asarray(sorted(plans)),
           "recommended": np.asarray(run.recommended_strategy or ""),
           "run": np.asarray(args.run_id)}
    t_count = len(grids.temperatures)
    for s in sorted(plans):
        part = rows[rows["strategy"] == s].sort_values("product_id")
        t = grids.temperatures.index(temps[s])
        node = np.stack(part["node"].to_numpy()).reshape(len(part), t_count, 3)[:, t]
        prob = np.stack(part["node_p"].to_numpy()).reshape(len(part), t_count, 3)[:, t]
        out.update({f"{s}/node": node, f"{s}/prob": prob,
                    f"{s}/truth": part["true_l3"].to_numpy(np.int64),
                    f"{s}/test": part["test"].to_numpy(np.int8),
                    f"{s}/temperature": np.asarray(temps[s])})
    np.savez_compressed(args.output, **out)
    print(f"{args.output}: {len(rows) // len(plans)} products x {len(plans)} strategies "
          f"({', '.join(sorted(plans))}); temperatures {temps}")


# --------------------------------------------------------------------------- simulate
class Scored:
    """One strategy's products of one dump: per threshold, filed or not and right or not."""

    def __init__(self, npz, strategy: str, levels=LEVELS):
        node, prob = npz[f"{strategy}/node"], npz[f"{strategy}/prob"]
        truth = npz[f"{strategy}/truth"]
        self.temperature = float(npz[f"{strategy}/temperature"])
        of_leaf = {3: np.arange(len(npz["support"])), 2: npz["of_leaf2"], 1: npz["of_leaf1"]}
        ok = np.stack([node[:, c] == of_leaf[lv][truth] for c, lv in enumerate(decide.LEVELS)],
                      axis=1)
        self.thresholds = np.asarray(decide.THRESHOLDS)
        col = decide.filed_levels(prob, decide.level_mask(levels), self.thresholds)
        self.filed = col >= 0                                            # [N, G]
        self.right = np.take_along_axis(ok, np.maximum(col, 0), axis=1) & self.filed
        self.leaf_conf, self.leaf_ok = prob[:, 0], ok[:, 0]
        self.support = npz["support"][truth]
        self.predicted_support = npz["support"][node[:, 0]]
        # train products under the predicted level-2 node (all its leaves)
        l2_support = np.bincount(npz["of_leaf2"], weights=npz["support"],
                                 minlength=int(node[:, 1].max()) + 1)
        self.predicted_l2_support = l2_support[node[:, 1]].astype(np.int64)
        self.n = len(truth)


def curves_of(sc: Scored, fit: np.ndarray, cal: np.ndarray) -> Curves:
    def counts(rows):
        f = sc.filed[rows].sum(axis=0)
        return f, f - sc.right[rows].sum(axis=0)

    ff, ef = counts(fit)
    fc, ec = counts(cal)
    return Curves(thresholds=sc.thresholds, filed_fit=ff, errors_fit=ef, filed_cal=fc,
                  errors_cal=ec, n_fit=int(fit.size), n_cal=int(cal.size))


def certify(sc: Scored, name: str, fit: np.ndarray, cal: np.ndarray, target: float,
            confidence: float, pred_band: np.ndarray, mondrian: bool) -> np.ndarray:
    """The threshold index each product would be filed at (-1: none certified): one for all,
    or with ``mondrian`` one per band of the predicted leaf's train products, each band
    certified on its own products at the error split evenly among the bands."""
    rule = rules.get(name)
    if not mondrian:
        j, _ = rule.select(curves_of(sc, fit, cal), target, confidence, 1.0)
        return np.full(sc.n, -1 if j is None else j)
    out = np.full(sc.n, -1)
    bands = np.unique(pred_band)
    level = 1.0 - (1.0 - confidence) / len(bands)
    for b in bands:
        j, _ = rule.select(curves_of(sc, fit[pred_band[fit] == b], cal[pred_band[cal] == b]),
                           target, level, 1.0)
        if j is not None:
            out[pred_band == b] = j
    return out


def ceiling(sc: Scored, rows: np.ndarray, target: float) -> tuple:
    """(climbing, leaf-only) shares a threshold fitted on ``rows`` themselves files at
    ``target``."""
    f = sc.filed[rows].sum(axis=0)
    ok = (f > 0) & (sc.right[rows].sum(axis=0) >= target * f)
    climb = f[ok].max() / rows.size if ok.any() else 0.0
    order = np.argsort(-sc.leaf_conf[rows])
    prec = np.cumsum(sc.leaf_ok[rows][order]) / np.arange(1, rows.size + 1)
    good = np.flatnonzero(prec >= target)
    return climb, ((good.max() + 1) / rows.size if good.size else 0.0)


def simulate(args) -> None:
    target, confidence = args.target, args.confidence
    edges = tuple(args.bands)
    grid = decide.Grids(temperatures=(1.0,), support_edges=edges)
    names = args.rules or list(declared.NAMES)
    results = {}   # (rule, share, size) -> list of (coverage, precision, per-band...)
    ceilings = {}
    dumps = [np.load(p) for p in args.dumps]
    for d, npz in enumerate(dumps):
        strategy = args.strategy or str(npz["recommended"]) or "fusion"
        sc = Scored(npz, strategy)
        band = grid.band_of(sc.support)
        pred_band = (grid.band_of(sc.predicted_support) if args.band_by == "leaf" else
                     np.searchsorted(np.asarray(args.l2_bands), sc.predicted_l2_support,
                                     side="right"))
        print(f"{args.dumps[d]}: {strategy}, {sc.n} products pooled, temperature "
              f"{sc.temperature:g}; bands {grid.support_bands()}: "
              f"{np.bincount(band, minlength=len(edges) + 1).tolist()}")
        rng = np.random.default_rng(args.seed + d)
        for size in args.sizes:
            if size >= sc.n - 200:
                continue
            for _ in range(args.draws):
                perm = rng.permutation(sc.n)
                val, rest = perm[:size], perm[size:]
                ceilings.setdefault(size, []).append(ceiling(sc, rest, target))
                u = rng.random(size)
                for share in args.shares:
                    fit, cal = val[u >= share], val[u < share]
                    for name in names:
                        for mondrian in args.mondrian:
                            key = (name + (" by band" if mondrian else ""), share, size)
                            j = certify(sc, name, fit, cal, target, confidence, pred_band,
                                        mondrian)[rest]
                            filed = np.where(j >= 0, sc.filed[rest, np.maximum(j, 0)], False)
                            right = np.where(j >= 0, sc.right[rest, np.maximum(j, 0)], False)
                            per_band = []
                            for b in range(len(edges) + 1):
                                rows = band[rest] == b
                                per_band += [filed[rows].sum(), right[rows].sum(), rows.sum()]
                            results.setdefault(key, []).append(
                                (filed.mean(),
                                 right.sum() / filed.sum() if filed.any() else np.nan, *per_band))
    report(results, ceilings, grid, target, confidence)


def _ci(x: np.ndarray) -> str:
    x = x[np.isfinite(x)]
    if not x.size:
        return "n/a"
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size) if x.size > 1 else 0.0
    return f"{100 * x.mean():.1f} ± {100 * half:.1f}"


def report(results: dict, ceilings: dict, grid, target: float, confidence: float) -> None:
    print(f"\ntarget {target:g}, confidence {confidence:g}; mean over draws [95% CI of the "
          f"mean]; 'under' = share of draws whose realized precision < target")
    print("| rule | cal share | val | filed % | precision % | under | ceiling climb % "
          "| ceiling leaf % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, share, size), got in sorted(results.items(), key=lambda kv: (kv[0][2],
                                                                             kv[0][0],
                                                                             kv[0][1])):
        a = np.asarray(got, dtype=float)
        ceil = np.asarray(ceilings[size])
        under = np.nanmean(np.where(np.isfinite(a[:, 1]), a[:, 1] < target, False))
        print(f"| {name} | {share:g} | {size} | {_ci(a[:, 0])} | {_ci(a[:, 1])} | "
              f"{100 * under:.1f}% | {100 * ceil[:, 0].mean():.1f} | "
              f"{100 * ceil[:, 1].mean():.1f} |")
    print("\nper band of the true leaf's train products (summed over draws): filed % at "
          "precision %")
    bands = grid.support_bands()
    print("| rule | cal share | val | " + " | ".join(bands) + " |")
    print("|---|---:|---:|" + "---:|" * len(bands))
    for (name, share, size), got in sorted(results.items(), key=lambda kv: (kv[0][2],
                                                                             kv[0][0],
                                                                             kv[0][1])):
        a = np.asarray(got, dtype=float)[:, 2:].reshape(len(got), len(bands), 3).sum(axis=0)
        cells = [f"{100 * f / n:.0f} at {100 * r / f:.1f}" if f else f"0 of {int(n)}"
                 for f, r, n in a]
        print(f"| {name} | {share:g} | {size} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--data", required=True)
    d.add_argument("--models", required=True)
    d.add_argument("--run-id", required=True)
    d.add_argument("--solution", required=True)
    d.add_argument("--output", required=True)
    d.add_argument("--scratch", default="/tmp/bench-decision-rules")
    d.add_argument("overrides", nargs="*")
    s = sub.add_parser("simulate")
    s.add_argument("dumps", nargs="+")
    s.add_argument("--strategy", default="")
    s.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")],
                   default=[100, 250, 1000, 5000])
    s.add_argument("--shares", type=lambda v: [float(x) for x in v.split(",")],
                   default=[0.5])
    s.add_argument("--rules", type=lambda v: v.split(","), default=None)
    s.add_argument("--bands", type=lambda v: [int(x) for x in v.split(",")],
                   default=[1, 2, 5])
    s.add_argument("--mondrian", type=lambda v: [x == "on" for x in v.split(",")],
                   default=[False, True],
                   help="off,on: one threshold, and one per band of the predicted leaf's "
                        "train products")
    s.add_argument("--band-by", choices=("leaf", "level2"), default="leaf",
                   help="what a band of the by-band rules is: the predicted leaf's train "
                        "products (--bands), or its level-2 node's (--l2-bands)")
    s.add_argument("--l2-bands", type=lambda v: [int(x) for x in v.split(",")],
                   default=[10, 40])
    s.add_argument("--draws", type=int, default=200)
    s.add_argument("--target", type=float, default=0.95)
    s.add_argument("--confidence", type=float, default=0.95)
    s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.step == "dump":
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
        dump(args)
    else:
        simulate(args)


if __name__ == "__main__":
    main()
