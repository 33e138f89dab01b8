"""spark-submit entry point: `spark-submit jobs/ingest.py --input F.bson --categories C.csv
--output DIR [--kind train|test] [--config FILE] [key=value ...]` (same as `hierarchy ingest`)."""

import sys

from hierarchy.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
