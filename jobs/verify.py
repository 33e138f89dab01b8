"""spark-submit entry point: `spark-submit jobs/verify.py [--data DIR] [--kind K]` takes the same
arguments as `hierarchy verify` (see `hierarchy verify --help`)."""

import sys

from hierarchy.cli import main

if __name__ == "__main__":
    sys.exit(main(["verify", *sys.argv[1:]]))
