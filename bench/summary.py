"""Every headline figure of the last `make bench` in one place, and their spread over runs.

    .venv/bin/python bench/summary.py            # print this run's figures, append to history
    .venv/bin/python bench/summary.py --table    # min / median / max over history.jsonl

Reads the JSON each bench script saved under bench/results/. Reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HISTORY = RESULTS / "history.jsonl"


SOURCES = {"ingest": "ingest_throughput", "input": "input_pipeline", "gpu_train": "gpu_train",
           "taxonomy full": "taxonomy_scale", "evaluate": "evaluate_cost",
           "curate": "curate_cost", "shared trunk": "shared_trunk"}


def _load(name: str):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _stamp(figure: str) -> float:
    """When the JSON a figure comes from was written: a bench that did not run again since
    the last summary is not counted twice in the spread."""
    path = RESULTS / f"{SOURCES[figure.split(':')[0]]}.json"
    return path.stat().st_mtime if path.exists() else 0.0


def figures() -> dict:
    out = {}
    ingest = _load("ingest_throughput")
    if ingest:
        for key, value in ingest["ratios"].items():
            out[f"ingest: {key} (x)"] = value
        out["ingest: fixed cost, s"] = ingest.get("fixed_s")
    inputs = _load("input_pipeline")
    if inputs and "train" in inputs:
        for split in ("train", "val"):
            out[f"input: {split} path / bare decode loop (x)"] = round(
                inputs[split]["ratio_total_vs_baseline"], 3)
    gpu = _load("gpu_train")
    if gpu:
        for r in gpu["results"]:
            out[f"gpu_train: petastorm / in-memory, {r['model']} {r['image_size']}px (x)"] = \
                r["ratio"]
    scale = _load("taxonomy_scale")
    if scale:
        out["taxonomy full: level-1 model, s"] = round(scale["level1"]["seconds"], 1)
        out["taxonomy full: flat model, s"] = round(scale["flat"]["seconds"], 1)
        b = scale["branches"]["seconds"]
        out[f"taxonomy full: {b['n']} branch models, total s"] = round(b["total"], 1)
        out["taxonomy full: branch model, median s"] = round(b["median"], 2)
        overhead = scale["branches"].get("overhead", {})
        if "median" in overhead:  # seconds beyond level 1's rate x the branch's pictures
            out["taxonomy full: per-branch overhead (median), s"] = round(overhead["median"], 2)
        if "rss_growth_per_model" in scale["branches"]:
            out["taxonomy full: training RSS growth per branch model, MB"] = round(
                scale["branches"]["rss_growth_per_model"] / 1e6, 1)
        if scale["predict"]["worker_peak_rss"]:  # 0: no worker was found to read
            out["taxonomy full: scoring worker peak RSS, MB"] = round(
                scale["predict"]["worker_peak_rss"] / 1e6)
    evaluate = _load("evaluate_cost")
    if evaluate and "ratio" in evaluate:
        out["evaluate: every strategy / one predict, same split (x)"] = round(
            evaluate["ratio"], 3)
    trunk = _load("shared_trunk")
    if trunk and trunk.get("identical"):
        a = trunk["args"]
        out[f"shared trunk: flat + refit + fusion, one trunk pass / three, {a['backbone']} "
            f"{a['size']}px (x)"] = round(trunk["ratio"], 3)
    curate = _load("curate_cost")
    if curate:
        out[f"curate: curate / ingest, {curate['preset']} preset (x)"] = \
            curate["curate_over_ingest"]
    return {k: v for k, v in out.items() if v is not None}


def table() -> int:
    runs = [json.loads(line) for line in HISTORY.read_text().splitlines() if line.strip()] \
        if HISTORY.exists() else []
    keys = sorted({k for r in runs for k in r["figures"]})
    print(f"{len(runs)} summaries in {HISTORY}\n")
    print("| figure | runs | min | median | max |\n|---|---|---|---|---|")
    for key in keys:
        seen = {}  # one value per run of the bench that made it
        for r in runs:
            if key in r["figures"]:
                seen[r.get("stamps", {}).get(key, r["time"])] = r["figures"][key]
        values = list(seen.values())
        print(f"| {key} | {len(values)} | {min(values):g} | {statistics.median(values):g} | "
              f"{max(values):g} |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args(argv)
    if args.table:
        return table()
    current = figures()
    print("\nthis run's figures:")
    for key, value in current.items():
        print(f"  {key:70s} {value:g}")
    with open(HISTORY, "a") as fh:
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "figures": current,
                             "stamps": {k: _stamp(k) for k in current}}) + "\n")
    print(f"appended to {HISTORY.relative_to(RESULTS.parent.parent)}; --table for the spread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
