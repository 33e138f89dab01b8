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

from hierarchy import joblog, modelstore, storage
from hierarchy.config import load_config
from hierarchy.curate.table import FLAGS
from hierarchy.dataset import KINDS
from hierarchy.errors import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    HierarchyError,
    UsageError,
    environment_fault,
)
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
    "curate": {"data": "data"},
    "review": {"data": "data"},
}


def _dataset_and_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR", help="ingest output folder (default paths.data)")
    p.add_argument("--models", metavar="DIR", help="model store (default paths.models)")


def _dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="check the inputs, config and models, say what would be done, and "
                        "write nothing (exit 0: it would run; 2 or 3: it would not)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML merged over conf/local.yaml")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="warnings and errors only, no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, applied last")


PATH_FLAGS = ("input", "categories", "data", "models", "output")


def _fill_paths(args, cfg) -> None:
    """Folder flags a command was not given come from the config's ``paths:`` section; every
    local path becomes absolute here, on the driver: a Spark task or a Horovod worker runs in
    its executor's own working folder, where a relative path names nothing."""
    for attr, key in PATH_DEFAULTS.get(args.stage, {}).items():
        if getattr(args, attr, None) is None:
            setattr(args, attr, cfg["paths"][key])
    for attr in PATH_FLAGS:
        value = getattr(args, attr, None)
        if isinstance(value, list):
            setattr(args, attr, [storage.absolute(v) for v in value])
        elif value:
            setattr(args, attr, storage.absolute(value))


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


def _allow_remote(p) -> None:
    p.add_argument("--allow-remote", action="store_true",
                   help="bind a --host other than loopback (refused without it: the page and "
                        "API have no login; review writes still need the printed token)")


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
    p.add_argument("--preset", choices=("fast", "hard", "tangled"),
                   help="fast: learnt in seconds (the demo); hard: confusable siblings, long "
                        "tail, noisy labels, filler views, clutter; tangled: hard, with "
                        "look-alike leaves in different branches (default synth.preset)")
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
    _dry_run(p)
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
                        "multi-level model (levels 1, 2 and 3 on one backbone); or heads over "
                        "a trained model's frozen trunk: experts (one per branch, over the "
                        "run's multi else flat model), refit (the flat model's level-3 head "
                        "refit) or fusion (a product's pictures weighed by a learned head, "
                        "over train.fusion_source)")
    p.add_argument("--branches", metavar="ID,...",
                   help="branch mode: only these level-1 ids (to fan branches out)")
    p.add_argument("--np", type=_count(1), help="Horovod workers (default train.np); > 1 runs "
                                          "them as Spark tasks via horovod.spark.run")
    p.add_argument("--run-id", help="model run id (default: a timestamp)")
    _dry_run(p)
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
    _dry_run(p)
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
    _dry_run(p)
    _common(p)

    p = sub.add_parser("curate", help="flag duplicate, near-duplicate, placeholder, blank, "
                                      "conflicting-label and leaking pictures",
                       description="Hash every picture of DATA (perceptual hash + pixel "
                                   "statistics), group exact and near duplicates without "
                                   "comparing all pairs, flag each picture and write "
                                   "DATA/curation (the catalog's curation table, replaced "
                                   "whole on a re-run), DATA/curation_report (report.md, "
                                   "contact sheets, the review queue). Review decisions "
                                   "(DATA/reviews) are folded in.")
    p.add_argument("--data", metavar="DIR", help="dataset folder (default paths.data)")
    _dry_run(p)
    _common(p)

    p = sub.add_parser("review", help="the review page of a curated dataset (HTTP)",
                       description="Serve the page that lists DATA's flagged groups with their "
                                   "pictures, products and categories; a reviewer marks a "
                                   "picture or a group keep / drop / relabel, stored in "
                                   "DATA/reviews (the reviews table) and honoured by the next "
                                   "curate and train. `hierarchy serve --data DIR` serves the "
                                   "same page beside the model API.")
    p.add_argument("--data", metavar="DIR", help="dataset folder (default paths.data)")
    p.add_argument("--host", help="default serve.host")
    p.add_argument("--port", type=_count(0), help="default serve.port")
    _allow_remote(p)
    _common(p)

    p = sub.add_parser("runs", help="list or drop runs of the predictions table",
                       description="The predictions table holds every run as partitions "
                                   "run_id/split/strategy. `list` shows them (products, "
                                   "pictures, when scored, level-3 accuracy on val); `drop` "
                                   "removes a run's partitions (or one split / strategy) from "
                                   "the catalog, then their files.")
    actions = p.add_subparsers(dest="action", required=True, metavar="list|drop")
    a = actions.add_parser("list", help="one line per run/split/strategy partition")
    a.add_argument("--run-id", help="only this run")
    a.add_argument("--json", action="store_true", help="one JSON object per partition")
    _common(a)
    a = actions.add_parser("drop", help="remove a run (or one split / strategy of it)")
    a.add_argument("--run-id", required=True, help="the run to drop")
    a.add_argument("--split", choices=("test", "val"), help="only this split")
    a.add_argument("--strategy", choices=STRATEGIES, help="only this strategy (with --split)")
    _dry_run(a)
    _common(a)

    p = sub.add_parser("metastore", help="create Hive's tables in a new PostgreSQL metastore",
                       description="`hierarchy metastore init` creates Hive's schema in the "
                                   "empty database of catalog.metastore (jdbc:postgresql://), "
                                   "once, before jobs and the Thrift server share it; a no-op "
                                   "when it exists. `make metastore` runs it.")
    actions = p.add_subparsers(dest="action", required=True, metavar="init")
    _common(actions.add_parser("init", help="create the schema (idempotent)"))

    p = sub.add_parser("thriftserver", help="the SQL endpoint for analysts: Spark's Thrift "
                                             "server over the configured metastore",
                       description="Run Spark's HiveThriftServer2 (JDBC/ODBC, beeline, PyHive) "
                                   "in the foreground over catalog.metastore and "
                                   "catalog.warehouse, so analysts query the predictions table "
                                   "while jobs write it. Needs a metastore several processes "
                                   "can open (jdbc:postgresql://...), not embedded Derby.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=_count(1), default=10000, help="default 10000")
    p.add_argument("--auth", choices=("NOSASL", "NONE"), default="NOSASL",
                   help="hive.server2.authentication: NOSASL (beeline ';auth=noSasl', PyHive "
                        "auth='NOSASL') or NONE (SASL PLAIN, no password check); put a "
                        "Kerberos/LDAP-secured server in front for anything shared")
    p.add_argument("--print-command", action="store_true",
                   help="print the spark-submit command instead of running it")
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
    p.add_argument("--data", metavar="DIR",
                   help="also serve this curated dataset's review page at /review")
    _allow_remote(p)
    _common(p)
    return parser


def _synth(args, cfg) -> dict:
    from hierarchy.synth import generate
    from hierarchy.synth.plant import Plants

    scfg = cfg["synth"]
    plants = Plants.from_config(scfg["plant"])
    if sum(plants.shares(True)) > 1:
        raise UsageError(f"synth.plant: the shares sum to {sum(plants.shares(True)):.2f}; at "
                         f"most 1 (one plant per product)")
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
        plants=plants,
    )
    print(json.dumps(stats, indent=2, default=str))
    return {"output": args.output}


def _with_spark(cfg, stage: str, job):
    """Run ``job(spark)`` in a session named after the stage, stopped whatever happens."""
    from hierarchy.spark import get_spark, stop_spark

    spark = get_spark(cfg, stage, hold_metastore=True)
    try:
        return job(spark)
    finally:
        stop_spark(spark)


def _ingest(args, cfg) -> dict:
    from hierarchy.ingest.pipeline import check_ingest, run_ingest
    from hierarchy.ingest.report import summary_lines

    checked = check_ingest(cfg, args.input, args.categories, args.output, args.kind)
    if args.dry_run:
        size = sum(f.size for f in checked.files)
        print(f"would ingest {len(checked.files)} file(s), {size / 1e6:.1f} MB, as {args.kind} "
              f"into {args.output} (taxonomy {checked.taxonomy.n_l1}/{checked.taxonomy.n_l2}/"
              f"{checked.taxonomy.n_l3})")
        return {"output": args.output, "kind": args.kind, "input_bytes": size}
    import time

    from hierarchy.spark import get_spark, stop_spark

    t0 = time.perf_counter()
    # no Hive catalog: ingest registers no table, and opening a metastore (Derby's lock, or
    # a PostgreSQL round trip) would only add start-up time and a process to contend with
    spark = get_spark(cfg, "ingest", catalog=False)
    try:
        entry = run_ingest(spark, cfg, args.input, args.categories, args.output, args.kind,
                           checked, spark_start_s=time.perf_counter() - t0)
    finally:
        stop_spark(spark)
    print("\n".join(summary_lines(args.output, args.kind, entry)))
    c = entry["counts"]
    return {"output": args.output, "kind": args.kind, "products": c["products"],
            "images": c["images"], "bad_fraction": entry["bad_fraction"]}


def _train(args, cfg) -> dict:
    import time

    from hierarchy.train.launch import check_training, plan, run_training
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
    if args.dry_run:
        specs, skipped = plan(cfg, args.data, args.models, run_id, args.level, args.mode,
                              branches, manifest)
        keys = [s.key for s in specs]
        print(f"would train {len(keys)} model(s) of run {run_id} into {args.models}: "
              f"{', '.join(keys) or 'none'}" + (f" ({len(skipped)} branch(es) without a "
                                              f"model)" if skipped else ""))
        return {"run_id": run_id, "models": keys}
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
            from hierarchy.spark import stop_spark

            stop_spark(spark["s"])
    if os.environ.get("HOROVOD_RANK", "0") == "0":  # under horovodrun: one summary, rank 0's
        print(f"run {run_id} -> {args.models}/{run_id}")
        for key, result in results.items():
            print("  " + summary_line(key, result))
    return {"run_id": run_id, "models": {k: r.get("status", "trained")
                                         for k, r in results.items()}}


def _predict(args, cfg) -> dict:
    from hierarchy.infer.pipeline import check_predict, run_predict, summary

    strategy = resolve_strategy(args.models, args.run_id,
                                args.strategy or cfg["predict"]["strategy"])
    checked = check_predict(args.data, args.models, args.run_id, args.split, strategy,
                            args.output, bool(cfg["predict"]["duplicate_lookup"]))
    if args.dry_run:
        print(f"would score split {args.split} with run {args.run_id} ({strategy}, "
              f"{len(checked.modelset.refs())} model file(s) checked) into table "
              f"{cfg['catalog']['database']}.{cfg['catalog']['table']}"
              + (f" and {args.output}/submission.csv" if args.split == "test" else ""))
        return {"run_id": args.run_id, "split": args.split, "strategy": strategy}
    result = _with_spark(cfg, "predict", lambda spark: run_predict(
        spark, cfg, args.data, args.models, args.run_id, args.split, strategy, args.output,
        checked))
    print(summary(result))
    return {k: result[k] for k in ("run_id", "split", "strategy", "table", "table_path",
                                   "products", "images", "fallback") if k in result} | \
        ({"submission": result["submission"]} if result.get("submission") else {})


def _evaluate(args, cfg) -> dict:
    from hierarchy.evaluate.pipeline import check_evaluate, headline, run_evaluate

    checked = check_evaluate(args.data, args.models, args.run_id, args.output)
    if args.dry_run:
        print(f"would evaluate run {args.run_id} on val with {', '.join(checked)} into "
              f"{args.output}/evaluation/{args.run_id}")
        return {"run_id": args.run_id, "strategies": list(checked)}
    result = _with_spark(cfg, "evaluate", lambda spark: run_evaluate(
        spark, cfg, args.data, args.models, args.run_id, args.output, checked))
    print(headline(result))
    print(f"report: {result['files']['report_md']}")
    return {"run_id": args.run_id, "recommended": result["recommended"],
            "accuracy_l3": {s: m.get("accuracy_l3") for s, m in
                            result["metrics"]["strategies"].items()},
            "report": result["files"]["report_md"], "phases_s": result["phases"]}


def _runs(args, cfg) -> dict:
    from hierarchy.infer import tables

    name = tables.table_name(cfg["catalog"])

    def job(spark):
        if args.action == "list":
            return tables.list_runs(spark, cfg["catalog"], args.run_id)
        return tables.drop_runs(spark, cfg["catalog"], args.run_id, args.split, args.strategy,
                                dry_run=args.dry_run)

    rows = _with_spark(cfg, "runs", job)
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


def _metastore(args, cfg) -> dict:
    from hierarchy.spark import init_metastore

    databases = init_metastore(cfg)
    print(f"metastore {cfg['catalog']['metastore']} ready: databases {', '.join(databases)}")
    return {"metastore": cfg["catalog"]["metastore"], "databases": databases}


def _thriftserver(args, cfg) -> dict:
    import shlex

    from hierarchy.spark import thriftserver_command

    cmd = thriftserver_command(cfg, args.host, args.port, args.auth)
    if args.print_command:
        print(shlex.join(cmd))
        return {"port": args.port}
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the server is this process from here: a signal stops it


def _serve(args, cfg) -> dict:
    from hierarchy.serve.app import serve

    storage.require_dir(args.models, "--models")
    if args.data:
        from hierarchy.serve.review import require_curated

        require_curated(args.data)
    serve(cfg, args.models, args.run_id, args.strategy, args.host, args.port, data=args.data,
          allow_remote=args.allow_remote)
    return {"run_id": args.run_id}


def _curate(args, cfg) -> dict:
    from hierarchy.curate.pipeline import check_curate, run_curate

    splits = check_curate(cfg, args.data)
    if args.dry_run:
        print(f"would curate {', '.join(f'{s} ({n} pictures)' for s, n in splits.items())} of "
              f"{args.data} into {args.data}/curation")
        return {"data": args.data, "pictures": sum(splits.values())}
    summary = _with_spark(cfg, "curate", lambda spark: run_curate(spark, cfg, args.data))
    c = summary["counts"]
    g = summary["grouping"]
    print(f"curated {c['pictures']} pictures of {args.data}: {c['flagged']} flagged "
          f"({', '.join(f'{f} {c[f]}' for f in FLAGS)}); {c['groups']} groups")
    print(f"near duplicates: {g['comparisons']} comparisons of {g['all_pairs']} possible pairs "
          f"({g['tables']} band tables, largest bucket {g['largest_bucket']})")
    print(f"report: {summary['report']}")
    return {"data": args.data, "pictures": c["pictures"], "flagged": c["flagged"],
            "comparisons": g["comparisons"], "all_pairs": g["all_pairs"]}


def _review(args, cfg) -> dict:
    from hierarchy.serve.review import review_server

    review_server(cfg, args.data, args.host, args.port, allow_remote=args.allow_remote)
    return {"data": args.data}


STAGES = {"synth": _synth, "ingest": _ingest, "train": _train, "predict": _predict,
          "evaluate": _evaluate, "runs": _runs, "metastore": _metastore,
          "thriftserver": _thriftserver,
          "serve": _serve, "curate": _curate, "review": _review}


def job_summary(stage: str, status: str, exit_code: int, started: float, **facts) -> str:
    """The last line a job prints on stdout, for a scheduler's logs: one JSON object."""
    import time

    record = {"job": stage, "status": status, "exit_code": exit_code,
              "seconds": round(time.time() - started, 2), **facts}
    return json.dumps(record, default=str, sort_keys=False)


def _emit(line: str) -> None:
    sys.stdout.flush()
    print(line, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one stage; exit codes: 0 done, 2 usage, 3 refused, 1 crash (with its traceback).
    Whatever happens after the arguments parse, the last stdout line is :func:`job_summary`."""
    import time

    started = time.time()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a bad command line (2)
        if exc.code not in (0, None):
            stage = next((a for a in (argv if argv is not None else sys.argv[1:])
                          if a in STAGES), None)
            _emit(job_summary(stage or "hierarchy", "usage", EXIT_USAGE, started,
                              error="bad command line (see the usage message above)"))
        raise
    setup_logging(args.quiet, args.verbose)
    dry = bool(getattr(args, "dry_run", False))
    log: dict = {}  # the job's log file, once the configuration names its folder
    try:
        if getattr(args, "run_id", None) is not None:
            modelstore.check_run_id(args.run_id)
        overrides = list(args.overrides)
        if args.quiet:
            overrides = ["ingest.progress=false", "predict.progress=false", *overrides]
        cfg = load_config(args.config, overrides)
        path = joblog.start(cfg, args.stage, args.verbose)
        if path:
            log["log"] = path
        _fill_paths(args, cfg)
        facts = STAGES[args.stage](args, cfg) or {}
    except HierarchyError as exc:  # one line a user can act on; anything else is a crash
        print(f"hierarchy {args.stage}: error: {exc}", file=sys.stderr)
        status = "usage" if exc.exit_code == EXIT_USAGE else "refused"
        _emit(job_summary(args.stage, status, exc.exit_code, started, dry_run=dry, **log,
                          error=str(exc)))
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - a full disk is the machine's, not a bug
        fault = environment_fault(exc, next((getattr(args, a) for a in ("output", "models",
                                                                        "data")
                                            if getattr(args, a, None)), None))
        if fault is None:
            _emit(job_summary(args.stage, "crash", 1, started, dry_run=dry, **log,
                              error=f"{type(exc).__name__}: {exc}"))
            raise
        logging.getLogger("hierarchy").debug("%s failed", args.stage, exc_info=True)
        print(f"hierarchy {args.stage}: error: {fault}", file=sys.stderr)
        _emit(job_summary(args.stage, "refused", EXIT_REFUSED, started, dry_run=dry, **log,
                          error=fault))
        return EXIT_REFUSED
    except BaseException as exc:
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
        _emit(job_summary(args.stage, "crash", code, started, dry_run=dry, **log,
                          error=f"{type(exc).__name__}: {exc}"))
        raise
    _emit(job_summary(args.stage, "dry-run" if dry else "done", EXIT_OK, started, **facts,
                      **log))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
