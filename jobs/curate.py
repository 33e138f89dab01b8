"""spark-submit entry point: `spark-submit jobs/curate.py ...` takes the same arguments
as `hierarchy curate` (see `hierarchy curate --help`), `--config FILE`
and `key=value` overrides."""

import sys

from hierarchy.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", *sys.argv[1:]]))
