"""``hierarchy train``: one run's models, with Horovod."""

from __future__ import annotations

import os
import time

from hierarchy.arguments import Command, common, count, dataset_and_models, dry_run
from hierarchy.contracts import modelstore
from hierarchy.contracts.errors import UsageError
from hierarchy.contracts.settings import Settings


def _arguments(p) -> None:
    dataset_and_models(p)
    p.add_argument("--level", required=True, type=int, choices=(1, 3))
    p.add_argument("--mode", choices=modelstore.MODES,
                   help="level 3 only: one flat model, one model per level-1 branch, one "
                        "multi-level model (levels 1, 2 and 3 on one backbone); or heads over "
                        "a trained model's frozen trunk: experts (one per branch, over the "
                        "run's multi else flat model), refit (the flat model's level-3 head "
                        "refit) or fusion (a product's pictures weighed by a learned head, "
                        "over train.fusion_source)")
    p.add_argument("--branches", metavar="ID,...",
                   help="branch mode: only these level-1 ids (to fan branches out)")
    p.add_argument("--np", type=count(1), help="Horovod workers (default train.np); > 1 runs "
                                         "them as Spark tasks via horovod.spark.run")
    p.add_argument("--run-id", help="model run id (default: a timestamp)")
    p.add_argument("--from-run", metavar="RUN_ID",
                   help="make this run from another one, whose dataset may have another "
                        "taxonomy version: refit and fusion sit the head on its frozen trunk "
                        "(its flat model, or train.fusion_source; the head's rows carried by "
                        "leaf id, new leaves start from their siblings'); level 1 and branch "
                        "take over its models whose outputs the change left alone and train "
                        "only the branches it touched")
    dry_run(p)
    common(p)


def _branches(args):
    """The --level/--mode/--branches combination checked; the branch ids, or None."""
    if args.level == 1 and (args.mode or args.branches):
        raise UsageError("--mode/--branches apply to --level 3 only")
    if args.level == 3 and not args.mode:
        raise UsageError(f"--level 3 needs --mode {' or '.join(modelstore.MODES)}")
    if args.branches and args.mode != "branch":
        raise UsageError("--branches needs --mode branch")
    try:
        return [int(b) for b in args.branches.split(",")] if args.branches else None
    except ValueError:
        raise UsageError(f"--branches {args.branches!r}: expected level-1 ids like 0,3,7") \
            from None


def _dry_run(args, cfg: Settings, run_id, branches, manifest) -> dict:
    from hierarchy.train.launch import plan

    specs, skipped, reused = plan(cfg, args.data, args.models, run_id, args.level, args.mode,
                                  branches, manifest, args.from_run)
    keys = [s.key for s in specs]
    print(f"would train {len(keys)} model(s) of run {run_id} into {args.models}: "
          f"{', '.join(keys) or 'none'}" + (f" ({len(skipped)} branch(es) without a "
                                          f"model)" if skipped else "") +
          (f"; would reuse {len(reused)} of run {args.from_run}: {', '.join(reused)}"
           if reused else ""))
    return {"run_id": run_id, "models": keys, "reused": list(reused)}


def run(args, cfg: Settings) -> dict:
    from hierarchy.train.launch import check_training, run_training
    from hierarchy.train.loop import summary_line

    branches = _branches(args)
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S")
    manifest = check_training(cfg, args.data, args.models, args.level, args.mode, branches,
                              run_id, args.from_run)
    if args.dry_run:
        return _dry_run(args, cfg, run_id, branches, manifest)
    spark = {}

    def spark_factory():  # a session only when a launcher needs one (--np > 1)
        from hierarchy.spark import get_spark

        spark.setdefault("s", get_spark(cfg, "train"))
        return spark["s"]

    try:
        results = run_training(cfg, args.data, args.models, run_id, args.level, args.mode,
                               branches, args.np, spark_factory, manifest, args.from_run)
    finally:
        if "s" in spark:
            from hierarchy.spark import stop_spark

            stop_spark(spark["s"])
    if os.environ.get("HOROVOD_RANK", "0") == "0":  # under horovodrun: one summary, rank 0's
        print(f"run {run_id} -> {args.models}/{run_id}")
        for key, result in results.items():
            print("  " + summary_line(key, result))
    def status(r: dict) -> str:
        return r.get("status") or ("reused" if r.get("reused_from") else "trained")

    return {"run_id": run_id, "models": {k: status(r) for k, r in results.items()}}


COMMANDS = (Command(
    "train", help="train the level-1, flat level-3 or per-branch models with Horovod",
    description="Train a model on DATA/images into MODELS/RUN_ID/ (level1/, flat/, "
                "branch/<l1>/, run.json). A run interrupted after an epoch resumes from its "
                "last checkpoint when re-run with the same --run-id.",
    add_arguments=_arguments, run=run, paths={"data": "data", "models": "models"}),)
