"""`hierarchy <stage> ...`: the command line of every stage.

Each stage takes ``--config FILE`` (merged over conf/local.yaml) and ``section.key=value``
overrides; the configuration, and every path a command is given, is checked before Spark
starts. Exit codes (:mod:`hierarchy.errors`): 0 done, 2 the command cannot run as given
(command line, config, category table, paths), 3 the job refused (bad input, not ready,
missing model, locked); anything else is a crash with its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

from hierarchy import modelstore, storage
from hierarchy.config import load_config
from hierarchy.dataset import KINDS
from hierarchy.errors import HierarchyError, UsageError
from hierarchy.infer.modelset import AUTO, STRATEGIES, resolve_strategy

EPILOG = """\
configuration:
  Every command reads conf/local.yaml, then --config FILE on top, then any
  section.key=value overrides, e.g.  ingest.val_fraction=0.2  spark.master=local[2]

examples:
  hierarchy synth --output data/synth --products 2000 --seed 1
  hierarchy ingest --input data/synth/train.bson --categories data/synth/category_names.csv \\
      --output data/dataset
  hierarchy ingest --input data/synth/test.bson --categories data/synth/category_names.csv \\
      --output data/dataset --kind test
  hierarchy train --data data/dataset --models data/models --run-id r1 --level 1
  hierarchy train --data data/dataset --models data/models --run-id r1 --level 3 --mode branch
  hierarchy predict --data data/dataset --models data/models --run-id r1 --split test \\
      --strategy two-stage --output data/output
  hierarchy evaluate --data data/dataset --models data/models --run-id r1 --output data/output
"""


def _count(minimum: int):
    """An argparse type: an integer >= minimum (argparse turns the ValueError into exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


# which `paths:` config key stands in for a folder flag a command was not given
PATH_DEFAULTS = {
    "synth": {"output": "synth"},
    "ingest": {"output": "data"},
    "train": {"data": "data", "models": "models"},
    "predict": {"data": "data", "models": "models", "output": "output"},
    "evaluate": {"data": "data", "models": "models", "output": "output"},
    "serve": {"models": "models"},
}


def _dataset_and_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR", help="ingest output folder (default paths.data)")
    p.add_argument("--models", metavar="DIR", help="model store (default paths.models)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML merged over conf/local.yaml")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="warnings and errors only, no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, applied last")


def _fill_paths(args, cfg) -> None:
    """Folder flags a command was not given come from the config's ``paths:`` section."""
    for attr, key in PATH_DEFAULTS[args.stage].items():
        if getattr(args, attr, None) is None:
            setattr(args, attr, cfg["paths"][key])


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message is logged (a notebook or a test
    harness swaps it), never to a stream that has been closed since."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """One plain format on stderr for every stage's ``logging`` messages (stdout keeps each
    command's result: its summary lines)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("hierarchy")
    root.setLevel(level)
    if not any(getattr(h, "_hierarchy", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                               "%(message)s", datefmt="%H:%M:%S"))
        handler._hierarchy = True
        root.addHandler(handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hierarchy",
        description="Hierarchical two-stage product-image classification on Spark "
                    "(Cdiscount format).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")

    p = sub.add_parser("synth", help="write a synthetic catalog in the Cdiscount format",
                       description="Write DIR/train.bson, DIR/test.bson and "
                                   "DIR/category_names.csv in the exact Cdiscount format.")
    p.add_argument("--output", metavar="DIR", help="default paths.synth")
    p.add_argument("--products", type=_count(1), help="train products (default synth.products)")
    p.add_argument("--test-products", type=_count(0),
                   help="test products (default synth.test_products)")
    p.add_argument("--seed", type=_count(0), help="random seed (default synth.seed)")
    p.add_argument("--taxonomy", help="small (4/12/40), hard (6/18/108), full (49/483/5270) "
                                      "or a category_names.csv (default: the preset's)")
    p.add_argument("--preset", choices=("fast", "hard"),
                   help="fast: learnt in seconds (the demo); hard: confusable siblings, long "
                        "tail, noisy labels, filler views, clutter (default synth.preset)")
    _common(p)

    p = sub.add_parser("ingest", help="BSON dumps -> Petastorm Parquet (images, products, "
                                      "quarantine, manifest)",
                       description="Decode Cdiscount BSON dumps in parallel with Spark into "
                                   "OUTPUT/images (Petastorm), products/, quarantine/ and "
                                   "manifest.json. Re-running replaces this kind's partitions.")
    p.add_argument("--input", required=True, action="append", metavar="FILE.bson",
                   help="a BSON dump (repeat for several files of the same kind)")
    p.add_argument("--categories", required=True, metavar="CSV",
                   help="category_names.csv")
    p.add_argument("--output", metavar="DIR", help="dataset folder (default paths.data)")
    p.add_argument("--kind", choices=KINDS, default="train",
                   help="train: labelled, split into train/val; test: the test split")
    _common(p)

    p = sub.add_parser("train", help="train the level-1, flat level-3 or per-branch models "
                                     "with Horovod",
                       description="Train a model on DATA/images into MODELS/RUN_ID/ (level1/, "
                                   "flat/, branch/<l1>/, run.json). A run interrupted after an "
                                   "epoch resumes from its last checkpoint when re-run with "
                                   "the same --run-id.")
    _dataset_and_models(p)
    p.add_argument("--level", required=True, type=int, choices=(1, 3))
    p.add_argument("--mode", choices=modelstore.MODES,
                   help="level 3 only: one flat model, one model per level-1 branch, one "
                        "multi-level model (levels 1, 2 and 3 on one backbone), or experts: "
                        "per-branch heads over the run's multi (else flat) model's trunk")
    p.add_argument("--branches", metavar="ID,...",
                   help="branch mode: only these level-1 ids (to fan branches out)")
    p.add_argument("--np", type=_count(1), help="Horovod workers (default train.np); > 1 runs "
                                          "them as Spark tasks via horovod.spark.run")
    p.add_argument("--run-id", help="model run id (default: a timestamp)")
    _common(p)

    p = sub.add_parser("predict", help="score a split with a trained run: predictions table "
                                       "(+ submission.csv for the test split)",
                       description="Score DATA's test or val split with the models of "
                                   "MODELS/RUN_ID. Writes OUTPUT/predictions (Parquet, "
                                   "registered as the catalog's predictions table; a re-run "
                                   "replaces its own run/split/strategy partition) and, for "
                                   "the test split, OUTPUT/submission.csv (_id,category_id).")
    _dataset_and_models(p)
    p.add_argument("--run-id", required=True, help="the trained run to score with")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--strategy", choices=(AUTO,) + STRATEGIES,
                   help="default predict.strategy (auto: the run's recommended strategy)")
    p.add_argument("--output", metavar="DIR", help="default paths.output")
    _common(p)

    p = sub.add_parser("evaluate", help="score the val split with every strategy the run "
                                        "has and write the metrics report",
                       description="Accuracy at levels 1-3, top-5, hierarchical P/R/F1, "
                                   "per-branch accuracy, level-1 confusion and training "
                                   "curves, flat and two-stage side by side, into "
                                   "OUTPUT/evaluation/RUN_ID/ (report.json, report.md, PNGs).")
    _dataset_and_models(p)
    p.add_argument("--run-id", required=True, help="the trained run to evaluate")
    p.add_argument("--output", metavar="DIR", help="default paths.output")
    _common(p)

    p = sub.add_parser("serve", help="the run's classifier over HTTP, with a page to try it",
                       description="Load MODELS/RUN_ID's models once and answer POST "
                                   "/v1/classify (multipart pictures of one product, or a "
                                   "JSON batch) with predict's own combination; GET / is a "
                                   "page to try it, /docs the OpenAPI. Ctrl-C stops it.")
    p.add_argument("--models", metavar="DIR", help="model store (default paths.models)")
    p.add_argument("--run-id", required=True, help="the trained run to serve")
    p.add_argument("--strategy", choices=(AUTO,) + STRATEGIES,
                   help="default serve.strategy (auto: the run's recommended strategy)")
    p.add_argument("--host", help="default serve.host")
    p.add_argument("--port", type=_count(0), help="default serve.port")
    _common(p)
    return parser


def _synth(args, cfg) -> int:
    from hierarchy.synth import generate

    scfg = cfg["synth"]
    stats = generate(
        args.output,
        products=args.products if args.products is not None else scfg["products"],
        seed=args.seed if args.seed is not None else scfg["seed"],
        taxonomy=args.taxonomy or scfg["taxonomy"] or None,
        preset=args.preset or scfg["preset"],
        test_products=(args.test_products if args.test_products is not None
                       else scfg["test_products"]),
        workers=scfg["workers"] or None,
        progress=bool(cfg["ingest"]["progress"]),
    )
    print(json.dumps(stats, indent=2, default=str))
    return 0


def _with_spark(cfg, stage: str, job):
    """Run ``job(spark)`` in a session named after the stage, stopped whatever happens."""
    from hierarchy.spark import get_spark

    spark = get_spark(cfg, stage)
    try:
        return job(spark)
    finally:
        spark.stop()


def _ingest(args, cfg) -> int:
    from hierarchy.ingest.pipeline import check_ingest, run_ingest
    from hierarchy.ingest.report import summary_lines

    checked = check_ingest(cfg, args.input, args.categories, args.output, args.kind)
    entry = _with_spark(cfg, "ingest", lambda spark: run_ingest(
        spark, cfg, args.input, args.categories, args.output, args.kind, checked))
    print("\n".join(summary_lines(args.output, args.kind, entry)))
    return 0


def _train(args, cfg) -> int:
    import time

    from hierarchy.train.launch import check_training, run_training
    from hierarchy.train.loop import summary_line

    if args.level == 1 and (args.mode or args.branches):
        raise UsageError("--mode/--branches apply to --level 3 only")
    if args.level == 3 and not args.mode:
        raise UsageError(f"--level 3 needs --mode {' or '.join(modelstore.MODES)}")
    if args.branches and args.mode != "branch":
        raise UsageError("--branches needs --mode branch")
    try:
        branches = [int(b) for b in args.branches.split(",")] if args.branches else None
    except ValueError:
        raise UsageError(f"--branches {args.branches!r}: expected level-1 ids like 0,3,7") \
            from None
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S")
    manifest = check_training(cfg, args.data, args.models, args.level, args.mode, branches,
                              run_id)
    spark = {}

    def spark_factory():
        from hierarchy.spark import get_spark

        spark.setdefault("s", get_spark(cfg, "train"))
        return spark["s"]

    try:
        results = run_training(cfg, args.data, args.models, run_id, args.level, args.mode,
                               branches, args.np, spark_factory, manifest)
    finally:
        if "s" in spark:
            spark["s"].stop()
    if os.environ.get("HOROVOD_RANK", "0") == "0":  # under horovodrun: one summary, rank 0's
        print(f"run {run_id} -> {args.models}/{run_id}")
        for key, result in results.items():
            print("  " + summary_line(key, result))
    return 0


def _predict(args, cfg) -> int:
    from hierarchy.infer.pipeline import check_predict, run_predict, summary

    strategy = resolve_strategy(args.models, args.run_id,
                                args.strategy or cfg["predict"]["strategy"])
    checked = check_predict(args.data, args.models, args.run_id, args.split, strategy,
                            args.output)
    result = _with_spark(cfg, "predict", lambda spark: run_predict(
        spark, cfg, args.data, args.models, args.run_id, args.split, strategy, args.output,
        checked))
    print(summary(result))
    return 0


def _evaluate(args, cfg) -> int:
    from hierarchy.evaluate.pipeline import check_evaluate, headline, run_evaluate

    checked = check_evaluate(args.data, args.models, args.run_id, args.output)
    result = _with_spark(cfg, "evaluate", lambda spark: run_evaluate(
        spark, cfg, args.data, args.models, args.run_id, args.output, checked))
    print(headline(result))
    print(f"report: {result['files']['report_md']}")
    return 0


def _serve(args, cfg) -> int:
    from hierarchy.serve.app import serve

    storage.require_dir(args.models, "--models")
    return serve(cfg, args.models, args.run_id, args.strategy, args.host, args.port)


STAGES = {"synth": _synth, "ingest": _ingest, "train": _train, "predict": _predict,
          "evaluate": _evaluate, "serve": _serve}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    try:
        overrides = list(args.overrides)
        if args.quiet:
            overrides = ["ingest.progress=false", "predict.progress=false", *overrides]
        cfg = load_config(args.config, overrides)
        _fill_paths(args, cfg)
        return STAGES[args.stage](args, cfg)
    except HierarchyError as exc:  # one line a user can act on; anything else is a crash
        print(f"hierarchy {args.stage}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
