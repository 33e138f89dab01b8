"""The evaluate job: score the validation split with every strategy the run's models can
serve (into the ``predictions`` table, as predict does), then compute the metrics from the
table with Spark aggregations and write the report, plots included."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from hierarchy import storage
from hierarchy.dataset import VAL, Dataset
from hierarchy.evaluate import calibrate, choice, decisions
from hierarchy.evaluate.metrics import evaluate_predictions
from hierarchy.evaluate.report import evaluation_dir, write_report
from hierarchy.infer.modelset import IDENTITY, PredictError, available_strategies
from hierarchy.infer.pipeline import check_predict, run_predict, scoring_plan
from hierarchy.modelstore import ModelStore


def check_evaluate(data: str, models: str, run_id: str, output: str) -> dict:
    """{strategy: its checked predict} of the strategies to evaluate, after every check that
    needs no Spark (paths: exit 2; no model, a model or dataset that cannot be used: exit 3)."""
    storage.require_dir(data, "--data")
    storage.require_dir(models, "--models")
    storage.require_writable_dir(output, "--output")
    strategies = available_strategies(models, run_id)
    if not strategies:
        raise PredictError(f"run {run_id} in {models}: no flat model and no level-1 + branch "
                           f"models to evaluate — train them first")
    return {strategy: check_predict(data, models, run_id, VAL, strategy, output)
            for strategy in strategies}


def run_evaluate(spark, cfg, data: str, models: str, run_id: str, output: str,
                 checked: Optional[dict] = None) -> dict:
    """``checked``: what :func:`check_evaluate` already returned for these arguments."""
    from pyspark.sql import functions as F

    checked = dict(checked or check_evaluate(data, models, run_id, output))
    strategies = list(checked)
    run = ModelStore(models).run(run_id)
    calibration = None
    if "hierarchical" in checked:
        # fitted before anything is scored, on the fit part of val only (the decisions'
        # calibration part must not have shaped the distribution it certifies)
        c = checked["hierarchical"]
        plan = scoring_plan(spark, cfg, data, c.taxonomy,
                            calibrate.modelset_for_calibration(c.modelset))
        calibration = calibrate.fit(spark, cfg, data, c.manifest, plan,
                                    where=decisions.val_part_filter(cfg["decide"]))
        run.record_evaluation(calibration=calibration)
        fitted = {k: calibration[k] for k in IDENTITY}
        checked["hierarchical"] = replace(c, modelset=replace(c.modelset, calibration=fitted))
    scored, rules, figures = {}, {}, {}
    for strategy in strategies:
        c = checked[strategy]
        # each strategy's own rule, fitted before its val rows are written so that the
        # table's decision columns are the ones predict will write on test
        plan = scoring_plan(spark, cfg, data, c.taxonomy, replace(c.modelset, decision=None))
        rule, figures[strategy] = decisions.fit(spark, cfg, data, plan)
        rules[strategy] = rule.to_dict()
        c = replace(c, modelset=replace(c.modelset, decision=rules[strategy]))
        scored[strategy] = run_predict(spark, cfg, data, models, run_id, VAL, strategy,
                                       output, checked=c)
    table = scored[strategies[0]]["table"]
    df = spark.table(table).where((F.col("run_id") == run_id) & (F.col("split") == VAL)
                                  & F.col("strategy").isin(strategies))
    metrics = evaluate_predictions(df, Dataset(data).taxonomy())
    for s, fig in figures.items():
        metrics["strategies"].setdefault(s, {})["decisions"] = fig
    scores = {s: metrics["strategies"].get(s, {}).get("accuracy_l3") for s in strategies}
    filed = {s: figures[s]["calibration"]["coverage"] for s in strategies}
    chosen = choice.choose(choice.held_out(df, cfg["decide"], strategies), filed, scores)
    metrics["recommendation"] = chosen
    recommended = chosen["recommended"]
    run.record_evaluation(recommended=recommended, scores=scores, decisions=rules,
                          recommendation=chosen)
    out_dir = evaluation_dir(output, run_id)
    files = write_report(metrics, run.histories(), out_dir, run_id)
    return {"run_id": run_id, "strategies": strategies, "metrics": metrics,
            "files": files, "output": out_dir, "table": table, "recommended": recommended,
            "calibration": calibration}


def headline(result: dict) -> str:
    lines = [f"evaluation of run {result['run_id']} on the val split -> {result['output']}"]
    for name in result["strategies"]:
        m = result["metrics"]["strategies"].get(name, {})

        def pct(key: str, m=m) -> str:
            v = m.get(key)
            return "n/a" if v is None else f"{100 * v:.1f}%"

        lines.append(f"  {name:<9} level-1 {pct('accuracy_l1')}  level-2 {pct('accuracy_l2')}"
                     f"  level-3 {pct('accuracy_l3')}  top-5 {pct('top5_accuracy')}"
                     f"  hF1 {pct('hierarchical_f1')}  ({m.get('products', 0)} products)")
    c = result.get("calibration")
    if c and c.get("products"):
        lines.append(f"  hierarchical fitted on these val products: temperature "
                     f"{c['temperature']:g}, w {c['w']:g}, v {c['v']:g} (its val figure is "
                     f"in-sample; bench/quality.py scores it on test)")
    for name in result["strategies"]:
        d = result["metrics"]["strategies"].get(name, {}).get("decisions")
        if not d:
            continue
        if d["threshold"] is None:
            lines.append(f"  {name:<9} decisions: nothing filed — {d['reason']}")
            continue
        cal = d["calibration"]
        per = ", ".join(f"L{lv} {100 * cal['per_level'][lv]['coverage']:.1f}%"
                        for lv in ("3", "2", "1") if int(lv) in d["levels"])
        prec = "n/a" if cal["precision"] is None else f"{100 * cal['precision']:.1f}%"
        lines.append(f"  {name:<9} decisions at precision {d['target']:g}: files "
                     f"{100 * cal['coverage']:.1f}% ({per}), precision {prec} on "
                     f"{cal['products']} calibration products (threshold "
                     f"{d['threshold']:.4g}, temperature {d['temperature']:g})")
    if result.get("recommended"):
        chosen = result["metrics"].get("recommendation") or {}
        why = f" — {chosen['reason']}" if chosen.get("reason") else ""
        rivals = choice.versus_text(chosen) if chosen.get("versus") else ""
        lines.append(f"  recommended strategy (predict's default): {result['recommended']}"
                     f"{why}" + (f"; {rivals}" if rivals else ""))
    return "\n".join(lines)
