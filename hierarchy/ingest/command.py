"""``hierarchy ingest``: BSON dumps into the dataset folder (Petastorm Parquet)."""

from __future__ import annotations

import time

from hierarchy.arguments import Command, common, dry_run
from hierarchy.contracts.dataset import KINDS
from hierarchy.contracts.settings import Settings


def _arguments(p) -> None:
    p.add_argument("--input", required=True, action="append", metavar="FILE.bson",
                   help="a BSON dump (repeat for several files of the same kind)")
    p.add_argument("--categories", required=True, metavar="CSV",
                   help="category_names.csv")
    p.add_argument("--output", metavar="DIR", help="dataset folder (default paths.data)")
    p.add_argument("--kind", choices=KINDS, default="train",
                   help="train: labelled, split into train/val; test: the test split")
    dry_run(p)
    common(p)


def run(args, cfg: Settings) -> dict:
    from hierarchy.ingest.pipeline import check_ingest, run_ingest
    from hierarchy.ingest.report import summary_lines

    checked = check_ingest(cfg, args.input, args.categories, args.output, args.kind)
    if args.dry_run:
        size = sum(f.size for f in checked.files)
        tax = checked.taxonomy
        print(f"would ingest {len(checked.files)} file(s), {size / 1e6:.1f} MB, as {args.kind} "
              f"into {args.output} (taxonomy {tax.n_l1}/{tax.n_l2}/{tax.n_l3})")
        return {"output": args.output, "kind": args.kind, "input_bytes": size}
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


COMMANDS = (Command(
    "ingest", help="BSON dumps -> Petastorm Parquet (images, products, quarantine, manifest)",
    description="Decode Cdiscount BSON dumps in parallel with Spark into OUTPUT/images "
                "(Petastorm), products/, quarantine/ and manifest.json. Re-running replaces "
                "this kind's partitions.",
    add_arguments=_arguments, run=run, paths={"output": "data"}),)
