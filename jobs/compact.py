"""spark-submit entry point: `spark-submit jobs/compact.py [--data DIR] [--kind K]` takes the same
arguments as `hierarchy compact` (see `hierarchy compact --help`)."""

import sys

from hierarchy.cli import main

if __name__ == "__main__":
    sys.exit(main(["compact", *sys.argv[1:]]))
