"""spark-submit entry point: `spark-submit jobs/taxonomy.py diff --old A.csv --new B.csv
[--old-data D1 --new-data D2]` takes the same arguments as `hierarchy taxonomy` (see
`hierarchy taxonomy diff --help`)."""

import sys

from hierarchy.cli import main

if __name__ == "__main__":
    sys.exit(main(["taxonomy", *sys.argv[1:]]))
