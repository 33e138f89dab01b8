"""spark-submit entry point: `spark-submit jobs/evaluate.py ...` takes the same arguments
as `hierarchy evaluate` (see `hierarchy evaluate --help`), `--config FILE`
and `key=value` overrides."""

import sys

from hierarchy.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
