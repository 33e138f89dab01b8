"""spark-submit entry point: `spark-submit jobs/predict.py ...` takes the same arguments as
`hierarchy predict` (see `hierarchy predict --help`), `--config FILE` and `key=value` overrides."""

import sys

from hierarchy.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
