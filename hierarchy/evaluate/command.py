"""``hierarchy evaluate``: every strategy of a run on val, the report and the default."""

from __future__ import annotations

from hierarchy.arguments import Command, common, dataset_and_models, dry_run, with_spark
from hierarchy.contracts.settings import Settings


def _arguments(p) -> None:
    dataset_and_models(p)
    p.add_argument("--run-id", required=True, help="the trained run to evaluate")
    p.add_argument("--output", metavar="DIR", help="default paths.output")
    p.add_argument("--against", metavar="RUN_ID",
                   help="a release gate: compare with this run (evaluated on its own dataset, "
                        "maybe of an older taxonomy version): negative flip rate on val "
                        "products whose label both versions share, accuracy on changed leaves")
    dry_run(p)
    common(p)


def run(args, cfg: Settings) -> dict:
    from hierarchy.evaluate.pipeline import check_evaluate, headline, run_evaluate

    checked = check_evaluate(args.data, args.models, args.run_id, args.output, cfg.variants)
    if args.against:
        from hierarchy.evaluate.against import old_strategy

        old_strategy(args.models, args.against)  # refused before Spark starts
    if args.dry_run:
        print(f"would evaluate run {args.run_id} on val with {', '.join(checked)} into "
              f"{args.output}/evaluation/{args.run_id}")
        return {"run_id": args.run_id, "strategies": list(checked)}
    result = with_spark(cfg, "evaluate", lambda spark: run_evaluate(
        spark, cfg, args.data, args.models, args.run_id, args.output, checked, args.against))
    print(headline(result))
    print(f"report: {result['files']['report_md']}")
    return {"run_id": args.run_id, "recommended": result["recommended"],
            "accuracy_l3": {s: m.get("accuracy_l3") for s, m in
                            result["metrics"]["strategies"].items()},
            "report": result["files"]["report_md"], "phases_s": result["phases"],
            **({"negative_flip_rate": {s: m["negative_flip_rate"] for s, m in
                                       result["metrics"]["against"]["strategies"].items()}}
               if args.against else {})}


COMMANDS = (Command(
    "evaluate", help="score the val split with every strategy the run has and write the "
                     "metrics report",
    description="Accuracy at levels 1-3, top-5, hierarchical P/R/F1, per-branch accuracy, "
                "level-1 confusion and training curves, flat and two-stage side by side, into "
                "OUTPUT/evaluation/RUN_ID/ (report.json, report.md, PNGs).",
    add_arguments=_arguments, run=run,
    paths={"data": "data", "models": "models", "output": "output"}),)
