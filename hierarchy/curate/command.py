"""``hierarchy curate``: flag duplicate, placeholder, blank, conflicting and leaking
pictures into the curation table and its report."""

from __future__ import annotations

from hierarchy.arguments import Command, common, dry_run, with_spark
from hierarchy.contracts.curation import FLAGS
from hierarchy.contracts.settings import Settings


def _arguments(p) -> None:
    p.add_argument("--data", metavar="DIR", help="dataset folder (default paths.data)")
    p.add_argument("--rehash", action="store_true",
                   help="decode and hash every picture; by default a picture an earlier curate "
                        "hashed (same MD5, same hash algorithm and version) is not decoded again")
    dry_run(p)
    common(p)


def run(args, cfg: Settings) -> dict:
    from hierarchy.curate.pipeline import check_curate, run_curate

    splits = check_curate(cfg, args.data)
    if args.dry_run:
        print(f"would curate {', '.join(f'{s} ({n} pictures)' for s, n in splits.items())} of "
              f"{args.data} into {args.data}/curation")
        return {"data": args.data, "pictures": sum(splits.values())}
    summary = with_spark(cfg, "curate", lambda spark: run_curate(spark, cfg, args.data,
                                                                 rehash=args.rehash))
    c = summary["counts"]
    g = summary["grouping"]
    print(f"curated {c['pictures']} pictures of {args.data}: {c['flagged']} flagged "
          f"({', '.join(f'{f} {c[f]}' for f in FLAGS)}); {c['groups']} groups")
    print(f"near duplicates: {g['comparisons']} comparisons of {g['all_pairs']} possible pairs "
          f"({g['tables']} band tables, largest bucket {g['largest_bucket']})")
    h = summary["hashing"]
    print(f"hashing: {h['decoded']} picture(s) decoded, {h['reused']} hashed before")
    print(f"report: {summary['report']}")
    return {"data": args.data, "pictures": c["pictures"], "flagged": c["flagged"],
            "comparisons": g["comparisons"], "all_pairs": g["all_pairs"],
            "decoded": h["decoded"], "reused": h["reused"]}


COMMANDS = (Command(
    "curate", help="flag duplicate, near-duplicate, placeholder, blank, conflicting-label and "
                   "leaking pictures",
    description="Hash every picture of DATA (perceptual hash + pixel statistics), group exact "
                "and near duplicates without comparing all pairs, flag each picture and write "
                "DATA/curation (the catalog's curation table, replaced whole on a re-run), "
                "DATA/curation_report (report.md, contact sheets, the review queue). Review "
                "decisions (DATA/reviews) are folded in.",
    add_arguments=_arguments, run=run, paths={"data": "data"}),)
