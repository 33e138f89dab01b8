"""What every command of ``hierarchy`` shares: the :class:`Command` a stage registers (its
parser, what it runs, which ``paths:`` keys stand in for its folder flags) and the flags
several commands take. Each stage declares its commands in its own ``command.py``;
:mod:`hierarchy.cli` only collects them, parses, and runs one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable, Dict

from hierarchy.contracts.settings import Settings


@dataclass(frozen=True)
class Command:
    """One ``hierarchy <name>`` command: ``add_arguments(parser)`` declares its flags (the
    parser is made with ``help`` and ``description``), ``run(args, cfg)`` does the work and
    returns the facts of the job's summary line. ``paths`` maps a folder flag to the
    ``paths:`` key that stands in for it when the command is not given the flag."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, dict], dict]
    paths: Dict[str, str] = field(default_factory=dict)


def count(minimum: int):
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


def dataset_and_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR", help="ingest output folder (default paths.data)")
    p.add_argument("--models", metavar="DIR", help="model store (default paths.models)")


def dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="check the inputs, config and models, say what would be done, and "
                        "write nothing (exit 0: it would run; 2 or 3: it would not)")


def common(p: argparse.ArgumentParser) -> None:
    """The flags of every command: added last, so that the overrides come last in --help."""
    p.add_argument("--config", metavar="FILE", help="YAML merged over conf/local.yaml")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="warnings and errors only, no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, applied last")


def allow_remote(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-remote", action="store_true",
                   help="bind a --host other than loopback (refused without it: the page and "
                        "API have no login; review writes still need the printed token)")


def with_spark(cfg: Settings, stage: str, job):
    """Run ``job(spark)`` in a session named after the stage, stopped whatever happens."""
    from hierarchy.spark import get_spark, stop_spark

    spark = get_spark(cfg, stage, hold_metastore=True)
    try:
        return job(spark)
    finally:
        stop_spark(spark)
