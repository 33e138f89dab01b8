"""spark-submit entry point: `spark-submit jobs/train.py --data DIR --models DIR --level 1|3
[--mode flat|branch] [--branches ID,...] [--np N] [--run-id ID] [--config FILE] [key=value ...]`
(same as `hierarchy train`; with --np > 1 the workers run as tasks of this Spark application)."""

import sys

from hierarchy.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
