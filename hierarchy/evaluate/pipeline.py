"""The evaluate job: score the validation split with every strategy the run's models can
serve (into the ``predictions`` table, as predict does), then compute the metrics from the
table with Spark aggregations and write the report, plots included."""

from __future__ import annotations

from typing import Optional

from hierarchy import storage
from hierarchy.dataset import VAL, Dataset
from hierarchy.evaluate.metrics import evaluate_predictions
from hierarchy.evaluate.report import evaluation_dir, write_report
from hierarchy.infer.modelset import PredictError, available_strategies
from hierarchy.infer.pipeline import check_predict, run_predict
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

    checked = checked or check_evaluate(data, models, run_id, output)
    strategies = list(checked)
    scored = {}
    for strategy in strategies:
        scored[strategy] = run_predict(spark, cfg, data, models, run_id, VAL, strategy,
                                       output, checked=checked[strategy])
    table = scored[strategies[0]]["table"]
    df = spark.table(table).where((F.col("run_id") == run_id) & (F.col("split") == VAL)
                                  & F.col("strategy").isin(strategies))
    metrics = evaluate_predictions(df, Dataset(data).taxonomy())
    out_dir = evaluation_dir(output, run_id)
    files = write_report(metrics, ModelStore(models).run(run_id).histories(), out_dir, run_id)
    return {"run_id": run_id, "strategies": strategies, "metrics": metrics,
            "files": files, "output": out_dir, "table": table}


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
    return "\n".join(lines)
