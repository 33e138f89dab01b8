"""What ``hierarchy curate`` costs next to ``hierarchy ingest`` on the same pictures.

    .venv/bin/python bench/curate_cost.py [--products N] [--preset P] [--workdir DIR]
                                          [--repeat R]

A synthetic catalog (fast preset, with every curation problem planted: about 1.75 pictures a
product, so the default 57,000 products are ~100,000 pictures) is ingested, then curated, each
as the command a scheduler runs (a fresh process: Spark start-up included), R times side by
side. Reported: seconds of each (min / median / max), the ratio curate / ingest, curate's own
phases, and the near-duplicate search's comparisons against all pairs of distinct hashes — the
proof that it never compares all pairs. Figures depend on the machine; nothing is asserted.

The fast preset draws a leaf's products nearly alike: near-identical products, chained within
the near-duplicate distance into a few huge groups, the grouping's worst case. ``--preset
hard`` draws them apart like real photos. The catalog is generated once per workdir: give each
preset or size its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PLANTS = ["synth.plant.duplicates=0.05", "synth.plant.near_duplicates=0.03",
          "synth.plant.relabelled=0.01", "synth.plant.placeholders=3",
          "synth.plant.placeholder_share=0.01", "synth.plant.blank=0.01"]


def run(cmd, cwd) -> tuple:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "HIERARCHY_HOME": str(cwd)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds, json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", type=int, default=57000)
    ap.add_argument("--preset", choices=("fast", "hard", "tangled"), default="fast",
                    help="synth preset; fast = near-identical products (the worst case)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir", default="data/bench/curate")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    hierarchy = str(BIN / "hierarchy")
    if not (work / "syn" / "train.bson").exists():
        run([hierarchy, "synth", "--output", "syn", "--products", str(args.products),
             "--preset", args.preset, "--test-products", "0", "--seed", "4", "-q", *PLANTS],
            work)
    common = ["-q", "spark.master=local[2]"]
    ingest_s, curate_s, phases, last = [], [], [], None
    for _ in range(args.repeat):
        # a fresh output each time: ingest over its own output finds nothing to do and would
        # time a no-op (it did in a first version of this bench)
        shutil.rmtree(work / "ds", ignore_errors=True)
        s, _ = run([hierarchy, "ingest", "--input", "syn/train.bson", "--categories",
                    "syn/category_names.csv", "--output", "ds", *common], work)
        ingest_s.append(s)
        s, _ = run([hierarchy, "curate", "--data", "ds", *common], work)
        curate_s.append(s)
        last = json.loads((work / "ds" / "curation_report" / "summary.json").read_text())
        phases.append(last["seconds"])
    mmm = lambda xs: (round(min(xs), 1), round(statistics.median(xs), 1), round(max(xs), 1))  # noqa: E731
    g, c = last["grouping"], last["counts"]
    result = {"preset": args.preset, "pictures": c["pictures"], "flagged": c["flagged"],
              "groups": c["groups"], "runs": args.repeat,
              "ingest_seconds_min_med_max": mmm(ingest_s),
              "curate_seconds_min_med_max": mmm(curate_s),
              "curate_over_ingest": round(statistics.median(curate_s) /
                                          statistics.median(ingest_s), 2),
              "curate_phases_seconds": last["seconds"], "curate_phases_seconds_all": phases,
              "distinct_hashes": g["distinct_hashes"], "comparisons": g["comparisons"],
              "all_pairs": g["all_pairs"],
              "comparisons_over_all_pairs": g["comparisons"] / max(1, g["all_pairs"]),
              "largest_bucket": g["largest_bucket"], "rounds": g["rounds"],
              "cpus": os.cpu_count()}
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "curate_cost.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
