"""``hierarchy predict`` (score a split into the predictions table and the submission) and
``hierarchy runs`` (list or drop the table's runs)."""

from __future__ import annotations

import json
from typing import List

from hierarchy.arguments import Command, common, dataset_and_models, dry_run, with_spark
from hierarchy.contracts.settings import Settings
from hierarchy.contracts.strategies import AUTO, NAMES
from hierarchy.infer.modelset import resolve_strategy

RESULT_KEYS = ("run_id", "split", "strategy", "table", "table_path", "products", "images",
               "fallback", "scored", "reused")


def _predict_arguments(p) -> None:
    dataset_and_models(p)
    p.add_argument("--run-id", required=True, help="the trained run to score with")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--strategy", metavar="NAME",
                   help=f"default predict.strategy: {AUTO} (the run's recommended strategy), "
                        f"{', '.join(NAMES)} or a name under the configuration's variants:")
    p.add_argument("--output", metavar="DIR", help="default paths.output")
    p.add_argument("--rescore-all", action="store_true",
                   help="score every product; by default a product whose row is current "
                        "(same run, strategy, rule, models and pictures) is reused as it is")
    dry_run(p)
    common(p)


def predict(args, cfg: Settings) -> dict:
    from hierarchy.infer.pipeline import check_predict, run_predict, summary

    spec = resolve_strategy(args.models, args.run_id, args.strategy or cfg.predict.strategy,
                            cfg.variants)
    strategy = spec.name
    checked = check_predict(args.data, args.models, args.run_id, args.split, spec,
                            args.output, cfg.predict.duplicate_lookup)
    if args.dry_run:
        from hierarchy.infer.tables import planned_location

        location = planned_location(cfg.catalog)
        print(f"would score split {args.split} with run {args.run_id} ({strategy}, "
              f"{len(checked.modelset.refs())} model file(s) checked) into table "
              f"{cfg.catalog.database}.{cfg.catalog.table} at {location}"
              + (f" and {args.output}/submission.csv" if args.split == "test" else ""))
        return {"run_id": args.run_id, "split": args.split, "strategy": strategy,
                "table_location": location}
    result = with_spark(cfg, "predict", lambda spark: run_predict(
        spark, cfg, args.data, args.models, args.run_id, args.split, strategy, args.output,
        checked, rescore_all=args.rescore_all))
    print(summary(result))
    return {k: result[k] for k in RESULT_KEYS if k in result} | \
        ({"submission": result["submission"]} if result.get("submission") else {})


def _runs_arguments(p) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="list|drop|relocate")
    a = actions.add_parser("list", help="one line per run/split/strategy partition")
    a.add_argument("--run-id", help="only this run")
    a.add_argument("--json", action="store_true", help="one JSON object per partition")
    common(a)
    a = actions.add_parser("drop", help="remove a run (or one split / strategy of it)")
    a.add_argument("--run-id", required=True, help="the run to drop")
    a.add_argument("--split", choices=("test", "val"), help="only this split")
    a.add_argument("--strategy", metavar="NAME",
                   help="only this strategy or variant (with --split)")
    dry_run(a)
    common(a)
    a = actions.add_parser("relocate", help="register the table where the configuration puts "
                                             "it (a data root copied or moved with its "
                                             "metastore)")
    dry_run(a)
    common(a)


def runs(args, cfg: Settings) -> dict:
    from hierarchy.infer import tables

    name = tables.table_name(cfg.catalog)

    def job(spark):
        if args.action == "list":
            return tables.list_runs(spark, cfg.catalog, args.run_id)
        if args.action == "relocate":
            return tables.relocate(spark, cfg.catalog, dry_run=args.dry_run)
        return tables.drop_runs(spark, cfg.catalog, args.run_id, args.split, args.strategy,
                                dry_run=args.dry_run)

    rows = with_spark(cfg, "runs", job)
    if args.action == "relocate":
        old, new = rows
        verb = "would register" if args.dry_run else "registered"
        print(f"{name}: {verb} at {new}" + (f" (was {old})" if old and old != new else ""))
        return {"table": name, "action": "relocate", "location": new, "was": old or None}
    if args.action == "drop":
        verb = "would drop" if args.dry_run else "dropped"
        print(f"{verb} {len(rows)} partition(s) of run {args.run_id} from {name}, "
              f"{sum(r['products'] for r in rows)} rows")
    elif args.json:
        for r in rows:
            print(json.dumps(r, default=str))
    else:
        print(format_runs(name, rows))
    return {"table": name, "action": args.action, "partitions": len(rows),
            "rows": sum(r["products"] for r in rows)}


def format_runs(name: str, rows: List[dict]) -> str:
    if not rows:
        return f"{name}: no runs"
    head = f"{'run_id':<24} {'split':<5} {'strategy':<12} {'products':>9} {'images':>9} " \
           f"{'acc L3':>7}  scored_at"
    lines = [f"{name}: {len(rows)} partition(s)", head]
    for r in rows:
        acc = "" if r["accuracy_l3"] is None else f"{100 * r['accuracy_l3']:.1f}"
        lines.append(f"{r['run_id']:<24} {r['split']:<5} {r['strategy']:<12} "
                     f"{r['products']:>9,} {r['images'] or 0:>9,} {acc:>7}  {r['scored_at']}")
    return "\n".join(lines)


COMMANDS = (
    Command("predict", help="score a split with a trained run: predictions table "
                            "(+ submission.csv for the test split)",
            description="Score DATA's test or val split with the models of MODELS/RUN_ID. "
                        "Writes OUTPUT/predictions (Parquet, registered as the catalog's "
                        "predictions table; a re-run replaces its own run/split/strategy "
                        "partition) and, for the test split, OUTPUT/submission.csv "
                        "(_id,category_id).",
            add_arguments=_predict_arguments, run=predict,
            paths={"data": "data", "models": "models", "output": "output"}),
    Command("runs", help="list or drop runs of the predictions table",
            description="The predictions table holds every run as partitions "
                        "run_id/split/strategy. `list` shows them (products, pictures, when "
                        "scored, level-3 accuracy on val); `drop` removes a run's partitions "
                        "(or one split / strategy) from the catalog, then their files.",
            add_arguments=_runs_arguments, run=runs),
)
