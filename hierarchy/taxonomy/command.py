"""``hierarchy taxonomy diff``: what changed between two versions of the category tree."""

from __future__ import annotations

from hierarchy.arguments import Command, common, with_spark
from hierarchy.contracts.errors import UsageError
from hierarchy.contracts.settings import Settings


def _arguments(p) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="diff")
    a = actions.add_parser("diff", help="one JSON object: leaves added, removed, renamed, "
                                        "moved; with both datasets, split and merged")
    a.add_argument("--old", required=True, metavar="TABLE",
                   help="the old version: a category_names.csv or a taxonomy.json")
    a.add_argument("--new", required=True, metavar="TABLE", help="the new version, likewise")
    a.add_argument("--old-data", metavar="DIR", help="a dataset ingested under the old version")
    a.add_argument("--new-data", metavar="DIR", help="a dataset ingested under the new "
                                                     "version: with --old-data, the leaves "
                                                     "split and merged, from the products in "
                                                     "both")
    common(a)


def run(args, cfg: Settings) -> dict:
    from hierarchy.taxonomy.diff import check_data, diff, read_version

    if (args.old_data is None) != (args.new_data is None):
        raise UsageError("--old-data and --new-data go together: split and merged leaves are "
                         "read from the products both datasets hold")
    old, new = read_version(args.old, "--old"), read_version(args.new, "--new")
    if args.old_data is None:
        got = diff(old, new)
    else:
        check_data(args.old_data, "--old-data", old, "--old")
        check_data(args.new_data, "--new-data", new, "--new")
        got = with_spark(cfg, "taxonomy", lambda spark: diff(
            old, new, spark, args.old_data, args.new_data, cfg.taxonomy.min_share))
    # the job's summary line, stdout's one JSON object, is the diff itself
    return {"action": "diff", **got}


COMMANDS = (Command(
    "taxonomy", help="compare two versions of the category tree",
    description="`diff` prints one JSON object on stdout (the job's summary line): the "
                "leaves (category ids) added, removed, renamed (same id, other name) and "
                "moved (same id, other parent) between --old and --new; with a dataset of "
                "each version, also split (old id -> the new ids its products now carry) and "
                "merged (new id -> the old ids its products came from).",
    add_arguments=_arguments, run=run),)
