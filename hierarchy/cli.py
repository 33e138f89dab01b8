"""`hierarchy <stage> ...`: the command line of every stage.

Each stage takes ``--config FILE`` (merged over conf/local.yaml) and ``section.key=value``
overrides; the configuration, and every path a command is given, is checked before Spark
starts. Exit codes (:mod:`hierarchy.contracts.errors`): 0 done, 2 the command cannot run as given
(command line, config, category table, paths), 3 the job refused (bad input, not ready,
missing model, locked); anything else is a crash with its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from typing import Dict, List, Optional

from hierarchy import joblog
from hierarchy.arguments import Command, common, count
from hierarchy.contracts import modelstore, storage
from hierarchy.contracts.config import load_config
from hierarchy.contracts.errors import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    HierarchyError,
    damaged_file,
    environment_fault,
)
from hierarchy.contracts.settings import Settings
from hierarchy.curate import command as curate_command
from hierarchy.evaluate import command as evaluate_command
from hierarchy.infer import command as infer_command
from hierarchy.ingest import command as ingest_command
from hierarchy.serve import command as serve_command
from hierarchy.synth import command as synth_command
from hierarchy.taxonomy import command as taxonomy_command
from hierarchy.train import command as train_command

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


PATH_FLAGS = ("input", "categories", "data", "models", "output")


def _fill_paths(args, cfg: Settings) -> None:
    """Folder flags a command was not given come from the config's ``paths:`` section; every
    local path becomes absolute here, on the driver: a Spark task or a Horovod worker runs in
    its executor's own working folder, where a relative path names nothing."""
    for attr, key in COMMANDS[args.stage].paths.items():
        if getattr(args, attr, None) is None:
            setattr(args, attr, getattr(cfg.paths, key))
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


def _metastore_arguments(p) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="init")
    common(actions.add_parser("init", help="create the schema (idempotent)"))


def _metastore(args, cfg: Settings) -> dict:
    from hierarchy.spark import init_metastore

    databases = init_metastore(cfg)
    print(f"metastore {cfg.catalog.metastore} ready: databases {', '.join(databases)}")
    return {"metastore": cfg.catalog.metastore, "databases": databases}


def _thriftserver_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=count(1), default=10000, help="default 10000")
    p.add_argument("--auth", choices=("NOSASL", "NONE"), default="NOSASL",
                   help="hive.server2.authentication: NOSASL (beeline ';auth=noSasl', PyHive "
                        "auth='NOSASL') or NONE (SASL PLAIN, no password check); put a "
                        "Kerberos/LDAP-secured server in front for anything shared")
    p.add_argument("--print-command", action="store_true",
                   help="print the spark-submit command instead of running it")
    common(p)


def _thriftserver(args, cfg: Settings) -> dict:
    from hierarchy.spark import thriftserver_command

    cmd = thriftserver_command(cfg, args.host, args.port, args.auth)
    if args.print_command:
        print(shlex.join(cmd))
        return {"port": args.port}
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the server is this process from here: a signal stops it


# the catalog's own commands: the shared metastore and the analysts' SQL endpoint
CATALOG_COMMANDS = (
    Command("metastore", help="create Hive's tables in a new PostgreSQL metastore",
            description="`hierarchy metastore init` creates Hive's schema in the empty "
                        "database of catalog.metastore (jdbc:postgresql://), once, before jobs "
                        "and the Thrift server share it; a no-op when it exists. `make "
                        "metastore` runs it.",
            add_arguments=_metastore_arguments, run=_metastore),
    Command("thriftserver", help="the SQL endpoint for analysts: Spark's Thrift server over "
                                 "the configured metastore",
            description="Run Spark's HiveThriftServer2 (JDBC/ODBC, beeline, PyHive) in the "
                        "foreground over catalog.metastore and catalog.warehouse, so analysts "
                        "query the predictions table while jobs write it. Needs a metastore "
                        "several processes can open (jdbc:postgresql://...), not embedded "
                        "Derby.",
            add_arguments=_thriftserver_arguments, run=_thriftserver),
)

# every command, each declared by its stage, in the order of `hierarchy --help`
_DECLARED = {c.name: c for module in (synth_command, ingest_command, train_command,
                                      infer_command, evaluate_command, curate_command,
                                      serve_command, taxonomy_command)
              for c in module.COMMANDS}
_DECLARED.update((c.name, c) for c in CATALOG_COMMANDS)
HELP_ORDER = ("synth", "ingest", "compact", "verify", "train", "predict", "evaluate", "curate",
              "review", "runs", "taxonomy", "metastore", "thriftserver", "serve")
COMMANDS: Dict[str, Command] = {name: _DECLARED[name] for name in HELP_ORDER}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hierarchy",
        description="Hierarchical two-stage product-image classification on Spark "
                    "(Cdiscount format).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for command in COMMANDS.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help,
                                             description=command.description))
    return parser


def job_summary(stage: str, status: str, exit_code: int, started: float, **facts) -> str:
    """The last line a job prints on stdout, for a scheduler's logs: one JSON object."""

    record = {"job": stage, "status": status, "exit_code": exit_code,
              "seconds": round(time.time() - started, 2), **facts}
    return json.dumps(record, default=str, sort_keys=False)


def _emit(line: str) -> None:
    sys.stdout.flush()
    print(line, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one stage; exit codes: 0 done, 2 usage, 3 refused, 1 crash (with its traceback).
    Whatever happens after the arguments parse, the last stdout line is :func:`job_summary`."""

    started = time.time()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a bad command line (2)
        if exc.code not in (0, None):
            stage = next((a for a in (argv if argv is not None else sys.argv[1:])
                          if a in COMMANDS), None)
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
        facts = COMMANDS[args.stage].run(args, cfg) or {}
    except HierarchyError as exc:  # one line a user can act on; anything else is a crash
        print(f"hierarchy {args.stage}: error: {exc}", file=sys.stderr)
        status = "usage" if exc.exit_code == EXIT_USAGE else "refused"
        _emit(job_summary(args.stage, status, exc.exit_code, started, dry_run=dry, **log,
                          error=str(exc)))
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - a full disk is the machine's, not a bug
        fault = damaged_file(exc) or environment_fault(
            exc, next((getattr(args, a) for a in ("output", "models", "data")
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
