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
    p.add_argument("--append", action="store_true",
                   help="add the dump to the kind as a new snapshot: new products added, a "
                        "re-sent product replaced by its new document, an unchanged one left "
                        "as it is (README \"Nightly runs\")")
    dry_run(p)
    common(p)


def run(args, cfg: Settings) -> dict:
    from hierarchy.ingest.pipeline import check_ingest, run_ingest
    from hierarchy.ingest.report import summary_lines

    checked = check_ingest(cfg, args.input, args.categories, args.output, args.kind)
    if args.dry_run:
        size = sum(f.size for f in checked.files)
        tax = checked.taxonomy
        how = "append to" if args.append else "ingest"
        print(f"would {how} {len(checked.files)} file(s), {size / 1e6:.1f} MB, as {args.kind} "
              f"into {args.output} (taxonomy {tax.n_l1}/{tax.n_l2}/{tax.n_l3})")
        return {"output": args.output, "kind": args.kind, "input_bytes": size}
    from hierarchy.spark import get_spark, stop_spark

    t0 = time.perf_counter()
    # no Hive catalog: ingest registers no table, and opening a metastore (Derby's lock, or
    # a PostgreSQL round trip) would only add start-up time and a process to contend with
    spark = get_spark(cfg, "ingest", catalog=False)
    try:
        entry = run_ingest(spark, cfg, args.input, args.categories, args.output, args.kind,
                           checked, spark_start_s=time.perf_counter() - t0,
                           append=args.append)
    finally:
        stop_spark(spark)
    print("\n".join(summary_lines(args.output, args.kind, entry)))
    c = entry["counts"]
    out = {"output": args.output, "kind": args.kind, "products": c["products"],
           "images": c["images"], "bad_fraction": entry["bad_fraction"]}
    if "append" in entry:
        a = entry["append"]
        out.update(snapshot=a["snapshot"], added=a["added"], replaced=a["replaced"],
                   unchanged=a["unchanged"], committed=a["committed"])
    return out


def _compact_arguments(p) -> None:
    p.add_argument("--data", metavar="DIR", help="dataset folder (default paths.data)")
    p.add_argument("--kind", choices=KINDS, action="append",
                   help="only this kind (repeat for both; default every complete kind)")
    common(p)


def compact(args, cfg: Settings) -> dict:
    from hierarchy.contracts import storage
    from hierarchy.contracts.dataset import Dataset
    from hierarchy.ingest.pipeline import run_compact
    from hierarchy.spark import get_spark, stop_spark

    storage.require_dir(args.data, "--data")
    manifest = Dataset(args.data).manifest()
    # a kind whose commit was interrupted is taken too: compact finishes that commit first
    kinds = args.kind or [k for k, e in manifest.kinds.items() if e.complete or e.plan]
    if not kinds:
        Dataset(args.data).require_complete(["train"])  # the one-line "run ingest first"
    spark = get_spark(cfg, "compact", catalog=False)
    try:
        done = run_compact(spark, cfg, args.data, kinds)
    finally:
        stop_spark(spark)
    for kind, record in done.items():
        print(f"compact {kind}: " + (f"{record['compacted']} small part(s) merged into "
                                     f"{record['into']}, {record['rows']:,} rows -> snapshot "
                                     f"{record['snapshot']}" if record else
                                     "nothing to merge"))
    return {"data": args.data, "compacted": {k: (r or {}).get("compacted", 0)
                                             for k, r in done.items()}}


def verify(args, cfg: Settings) -> dict:
    from hierarchy.contracts import storage
    from hierarchy.contracts.dataset import Dataset, DatasetDamaged
    from hierarchy.ingest.pipeline import spark_digests
    from hierarchy.spark import get_spark, stop_spark

    storage.require_dir(args.data, "--data")
    dataset = Dataset(args.data)
    manifest = dataset.manifest()
    kinds = args.kind or [k for k, e in manifest.kinds.items() if e.complete]
    dataset.require_complete(kinds or ["train"])  # sizes and footers first: one line, cheap
    parts = {k: [p for ps in (manifest.kinds[k].parts or {}).values() for p in ps]
             for k in kinds}
    spark = get_spark(cfg, "verify", catalog=False)
    try:
        damaged = [line for k in kinds for line in dataset.damaged_parts(k, spark_digests(spark))]
    finally:
        stop_spark(spark)
    hashed = sum(1 for ps in parts.values() for p in ps if len(p) > 3)
    total = sum(len(ps) for ps in parts.values())
    for line in damaged:
        print(line)
    if damaged:
        raise DatasetDamaged(f"{len(damaged)} of {hashed} part(s) of {args.data} are damaged "
                             f"(each listed above); the first: {damaged[0]}")
    print(f"verify {args.data}: {hashed} part(s) of {', '.join(kinds)} read whole, every "
          f"digest as committed" + (f"; {total - hashed} committed before digests were "
                                    f"recorded (sizes and footers checked only)"
                                    if total > hashed else ""))
    return {"data": args.data, "kinds": kinds, "parts": hashed, "unrecorded": total - hashed,
            "damaged": 0}


COMMANDS = (Command(
    "ingest", help="BSON dumps -> Petastorm Parquet (images, products, quarantine, manifest)",
    description="Decode Cdiscount BSON dumps in parallel with Spark into OUTPUT/images "
                "(Petastorm), products/, quarantine/ and manifest.json. Re-running replaces "
                "this kind's partitions; --append adds the dump to the kind as its next "
                "snapshot instead (new products added, re-sent ones replaced, unchanged ones "
                "left as they are).",
    add_arguments=_arguments, run=run, paths={"output": "data"}),
    Command(
    "compact", help="merge a dataset's small parts (after many appends)",
    description="Merge the parts of DATA smaller than ingest.compact_small_mb into parts of "
                "about ingest.split_mb, as the kind's next snapshot: every row kept, picture "
                "bytes copied, never decoded. An append runs it by itself past "
                "ingest.compact_after small parts.",
    add_arguments=_compact_arguments, run=compact, paths={"data": "data"}),
    Command(
    "verify", help="read every part of a dataset whole and check its content digest",
    description="Hash every committed part of DATA (a Spark task per part) against the "
                "digest its commit recorded in manifest.json: a part damaged at the same "
                "size (a bad copy, a bad disk) that the quick checks before every job (sizes "
                "and footers) do not see. Reads the whole dataset once; exit 3 names every "
                "damaged part.",
    add_arguments=_compact_arguments, run=verify, paths={"data": "data"}),)
