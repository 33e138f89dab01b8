"""The evaluate job: score the validation split with every strategy the run's models can
serve (into the ``predictions`` table, as predict does), then compute the metrics from the
table with Spark aggregations and write the report, plots included."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Mapping, Optional

from hierarchy.contracts import storage
from hierarchy.contracts.dataset import VAL, Dataset
from hierarchy.contracts.modelstore import ModelStore
from hierarchy.contracts.settings import Settings
from hierarchy.contracts.strategies import Spec, spec_of
from hierarchy.evaluate import against as against_
from hierarchy.evaluate import calibrate, choice, decisions
from hierarchy.evaluate.metrics import evaluate_predictions
from hierarchy.evaluate.report import evaluation_dir, write_report
from hierarchy.infer import strategies
from hierarchy.infer.modelset import IDENTITY, ScoringRefused, available_strategies
from hierarchy.infer.pipeline import (
    check_predict,
    grouped_split,
    run_scoring,
    scoring_plan,
    train_support,
    training_prior,
)

log = logging.getLogger(__name__)


def check_evaluate(data: str, models: str, run_id: str, output: str,
                   variants: Mapping[str, Mapping] = {}) -> dict:  # noqa: B006 - read only
    """{name: its checked predict} of the strategies to evaluate (every declared one the run
    can serve, then each configured variant of those), after every check that needs no Spark
    (paths: exit 2; no model, a model or dataset that cannot be used: exit 3)."""
    storage.require_dir(data, "--data")
    storage.require_dir(models, "--models")
    storage.require_writable_dir(output, "--output")
    _same_version(data, models, run_id)
    available = available_strategies(models, run_id)
    if not available:
        raise ScoringRefused(f"run {run_id} in {models}: no flat model and no level-1 + branch "
                           f"models to evaluate — train them first")
    specs = [Spec(name, name) for name in available] + [
        spec for spec in (spec_of(name, variants) for name in sorted(variants))
        if spec.strategy in available]
    return {spec.name: check_predict(data, models, run_id, VAL, spec, output)
            for spec in specs}


def _same_version(data: str, models: str, run_id: str) -> None:
    """Evaluate fits the run's decision rules and records them in its run.json: only on a
    dataset of the run's own taxonomy version, or the rules a run's predict applies would have
    been certified on another tree."""
    run = ModelStore(models).run(run_id)
    version = run.read().taxonomy_fingerprint if run.exists() else None
    have = Dataset(data).taxonomy().fingerprint
    if version not in (None, have):
        raise ScoringRefused(
            f"run {run_id} is of taxonomy version {version[:19]}, {data} of {have[:19]}: "
            f"evaluate a run on a dataset of its own version; for this one, make a run of it "
            f"with `hierarchy train --level 3 --mode refit --from-run {run_id} --run-id NEW`")


def _corrected(checked: dict) -> Optional[str]:
    """The strategy whose correction evaluate fits before scoring (hierarchical), if any."""
    return next((s for s, c in checked.items()
                 if strategies.get(c.modelset.spec.strategy).fits_correction), None)


class _Phases:
    """Each phase's wall seconds, logged as it ends (where an evaluate's time goes)."""

    def __init__(self):
        self.seconds: dict = {}
        self._t = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 2)
        self._t = now
        log.info("evaluate: %s %.1f s", name, self.seconds[name])


def run_evaluate(spark, cfg: Settings, data: str, models: str, run_id: str, output: str,
                 checked: Optional[dict] = None, against: Optional[str] = None) -> dict:
    """``checked``: what :func:`check_evaluate` already returned for these arguments;
    ``against``: a run of an older taxonomy version to gate this one on
    (:mod:`hierarchy.evaluate.against`).
    Two scoring passes over val whatever the number of strategies: the hierarchical
    correction (on the fit part only), then every strategy's decision rule and the summaries
    its table rows are made of; each model runs once per picture in each."""
    from pyspark.sql import functions as F

    phases = _Phases()
    old_strategy = against_.old_strategy(models, against) if against else None
    checked = dict(checked or check_evaluate(data, models, run_id, output, cfg.variants))
    strategies = list(checked)
    run = ModelStore(models).run(run_id)
    prior = training_prior(spark, data)
    # read twice only when the hierarchical correction is fitted first
    grouped = grouped_split(spark, data, VAL, cfg.predict.partitions,
                            persist=_corrected(checked) is not None)
    try:
        calibration, checked, figures, rules, table = _passes(spark, cfg, data, models, run,
                                                              checked, output, prior, grouped,
                                                              phases)
    finally:
        grouped.unpersist()
    df = spark.table(table).where((F.col("run_id") == run_id) & (F.col("split") == VAL)
                                  & F.col("strategy").isin(strategies))
    taxonomy = Dataset(data).taxonomy()
    metrics = evaluate_predictions(df, taxonomy)
    if against:
        metrics["against"] = against_.compare(
            spark, table, run_id, strategies, against, old_strategy,
            ModelStore(models).run(against).taxonomy(), taxonomy)
    for s, fig in figures.items():
        metrics["strategies"].setdefault(s, {})["decisions"] = fig
    scores = {s: metrics["strategies"].get(s, {}).get("accuracy_l3") for s in strategies}
    filed = {s: figures[s]["calibration"]["coverage"] for s in strategies}
    chosen = choice.choose(choice.held_out(df, cfg.decide, strategies), filed, scores)
    metrics["recommendation"] = chosen
    recommended = chosen["recommended"]
    # a variant is a name of its own (one that sets no parameter included)
    variants = {s: c.modelset.spec.record() for s, c in checked.items()
                if c.modelset.spec.name != c.modelset.spec.strategy}
    run.record_evaluation(recommended=recommended, scores=scores, decisions=rules,
                          recommendation=chosen, variants=variants)
    phases.done("metrics and choice")
    out_dir = evaluation_dir(output, run_id)
    files = write_report(metrics, run.histories(), out_dir, run_id)
    phases.done("report")
    return {"run_id": run_id, "strategies": strategies, "metrics": metrics,
            "files": files, "output": out_dir, "table": table, "recommended": recommended,
            "calibration": calibration, "phases": phases.seconds}


def _passes(spark, cfg: Settings, data: str, models: str, run, checked: dict, output: str,
            prior: tuple, grouped, phases: _Phases) -> tuple:
    """The passes over val; (calibration, checked with the rules, figures, rules, table
    name)."""
    calibration, corrected = None, _corrected(checked)
    if corrected is not None:
        calibration, checked[corrected] = _calibrate(spark, cfg, data, run, checked[corrected],
                                                     prior, grouped)
        phases.done("hierarchical calibration")
    # each strategy's own rule, fitted on one scoring pass that also keeps what val's table
    # rows are made of, so that the rows take the rules with no second model pass and their
    # decision columns are the ones predict will write on test
    plans = {s: scoring_plan(spark, cfg, data, c.taxonomy, replace(c.modelset, decision=None),
                             prior) for s, c in checked.items()}
    first = next(iter(checked.values()))
    if first.manifest.val_draw() == "category":
        log.warning("decisions: val of %s was drawn keeping each category's first product in "
                    "train (ingest.val_draw: category, or an ingest from before the choice), "
                    "so it never holds a single-product category: the promise covers only "
                    "products of categories with several. Re-ingest with ingest.val_draw: "
                    "product for a val drawn like new products (README, Decisions)", data)
    support = train_support(spark, data, first.taxonomy)
    summaries, fitted_rules = decisions.score_and_fit(spark, cfg, plans, grouped, support)
    try:
        rules = {s: rule for s, (rule, _) in fitted_rules.items()}
        figures = {s: fig for s, (_, fig) in fitted_rules.items()}
        phases.done("decision rules")
        checked = {s: replace(c, modelset=replace(c.modelset, decision=rules[s]))
                   for s, c in checked.items()}
        ruled = {s: replace(plans[s], models=checked[s].modelset) for s in checked}
        rows = decisions.table_rows(summaries, ruled, decisions.grids_of(cfg.decide))
        scored = run_scoring(spark, cfg, data, models, run.run_id, VAL, checked, output,
                             prior, scored=rows)
    finally:
        summaries.unpersist()
    phases.done("table rows")
    return calibration, checked, figures, rules, next(iter(scored.values()))["table"]


def _calibrate(spark, cfg: Settings, data: str, run, checked, prior: tuple, grouped):
    """The hierarchical strategy's correction, fitted before anything is scored, on the fit
    part of val only (the decisions' calibration part must not have shaped the distribution
    it certifies); (the fit as run.json records it, ``checked`` with it applied)."""
    plan = scoring_plan(spark, cfg, data, checked.taxonomy,
                        calibrate.modelset_for_calibration(checked.modelset), prior)
    calibration = calibrate.fit(spark, cfg, data, checked.manifest, plan,
                                where=decisions.val_part_filter(cfg.decide),
                                grouped=grouped)
    run.record_evaluation(calibration=calibration)
    fitted = {k: calibration[k] for k in IDENTITY}
    return calibration, replace(checked, modelset=replace(checked.modelset, calibration=fitted))


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
