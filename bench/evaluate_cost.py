"""Evaluate's wall time against one predict of one strategy on the same split, side by side.

    .venv/bin/python bench/evaluate_cost.py [--products N] [--repeat R] [--workdir DIR]
                                            [--before SRC]

A synthetic catalog (``--preset``, fast by default, ``--products`` products, 30 % of them in val) is
ingested and a run with every model is trained once (small_cnn, 48 px, 2 epochs: level 1,
flat, the branches, multi, experts, refit, fusion). Then, R times and alternating so that the
host's drift hits both sides alike, each as a user runs it (a fresh ``hierarchy`` process,
Spark started and stopped):
  evaluate  every strategy the run can serve (7), the hierarchical calibration, each
            strategy's decision rule, the table and the report;
  predict   --split val --strategy flat, the baseline: one strategy's scoring of the same
            pictures into the same table.
  before    with ``--before SRC`` (a checkout of an older commit, e.g. a ``git worktree``):
            the same evaluate with that code (``PYTHONPATH=SRC``), for a before/after.
Each evaluate starts from a copy of the trained run, so no run has its rules already.
Printed: min / median / max wall of each side and the ratio of the medians, with the
pictures scored. Figures depend on the machine; never asserted.
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

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results" / "evaluate_cost.json"
RUN_ID = "bench"
TRAIN = ["train.backbone=small_cnn", "train.image_size=48", "train.epochs=2",
         "train.batch_size=16", "train.warmup_epochs=0", "train.reader_workers=1",
         "train.shuffle_buffer=256", "train.expert_epochs=2", "train.fusion_epochs=2"]
MODES = (("1", None), ("3", "flat"), ("3", "branch"), ("3", "multi"), ("3", "experts"),
         ("3", "refit"), ("3", "fusion"))


def say(text: str) -> None:
    print(text, flush=True)


def hierarchy(*args: str, conf=(), src: str = "") -> float:
    """Run one ``hierarchy`` command as a user would (with the code in ``src`` when given);
    its wall seconds."""
    env = {**os.environ, "PYTHONPATH": src} if src else None
    t0 = time.perf_counter()
    # run from the tree too: Spark starts its Python workers with `python -m`, which puts the
    # working directory first on their path, so from another checkout the executors would
    # import that checkout's hierarchy whatever PYTHONPATH says
    done = subprocess.run([str(BIN / "hierarchy"), *args, "-q", *conf], capture_output=True,
                          text=True, env=env, cwd=src or None)
    if done.returncode:
        raise SystemExit(f"hierarchy {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def build(work: Path, products: int, conf: list, preset: str) -> None:
    """The catalog and a trained run with every model (skipped when already there)."""
    if (work / "models.trained" / RUN_ID / "fusion" / "model.h5").exists():
        say(f"reusing the trained run in {work}")
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    hierarchy("synth", "--output", str(work / "syn"), "--products", str(products),
              "--test-products", "0", "--seed", "9", "--preset", preset)
    hierarchy("ingest", "--input", str(work / "syn" / "train.bson"), "--categories",
              str(work / "syn" / "category_names.csv"), "--output", str(work / "ds"),
              conf=[*conf, "ingest.val_fraction=0.3"])
    for level, mode in MODES:
        say(f"training level {level}{' ' + mode if mode else ''}")
        hierarchy("train", "--data", str(work / "ds"), "--models", str(work / "models.trained"),
                  "--run-id", RUN_ID, "--level", level, *(["--mode", mode] if mode else []),
                  conf=[*conf, *TRAIN])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", type=int, default=600)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/bench-evaluate")
    ap.add_argument("--preset", default="fast", choices=("fast", "hard", "tangled"),
                    help="the catalog: fast (decisions mostly at the leaf) or hard (spread "
                         "over the levels and review)")
    ap.add_argument("--before", default="", help="a checkout of older code to compare with")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()  # the commands may run from another checkout
    conf = ["spark.master=local[2]", f"catalog.warehouse={work / 'wh'}",
            f"catalog.metastore={work / 'wh' / 'ms'}"]
    build(work, args.products, conf, args.preset)
    manifest = json.loads((work / "ds" / "manifest.json").read_text())
    val = manifest["splits"]["val"]
    common = ["--data", str(work / "ds"), "--run-id", RUN_ID]
    walls = {"evaluate": [], "predict": [], **({"before": []} if args.before else {})}
    for r in range(args.repeat):
        for side, src in (("before", args.before), ("evaluate", "")):
            if side not in walls:
                continue
            models = work / "models"
            shutil.rmtree(models, ignore_errors=True)
            shutil.copytree(work / "models.trained", models)
            walls[side].append(hierarchy("evaluate", *common, "--models", str(models),
                                         "--output", str(work / "out"), conf=conf, src=src))
        walls["predict"].append(hierarchy("predict", *common, "--models", str(models),
                                          "--split", "val", "--strategy", "flat", "--output",
                                          str(work / "out"), conf=conf))
        say(f"run {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in walls.items()))
    med = {k: statistics.median(v) for k, v in walls.items()}
    say(f"\nval: {val['products']} products, {val['images']} pictures; {args.repeat} runs, "
        f"alternating")
    for k, v in walls.items():
        say(f"  {k:<9} wall s  min {min(v):.1f}  median {med[k]:.1f}  max {max(v):.1f}")
    ratio = med["evaluate"] / med["predict"]
    say(f"  evaluate (7 strategies) / predict (1 strategy): {ratio:.2f}x (target <= 1.5x)")
    if args.before:
        say(f"  evaluate before / after: {med['before'] / med['evaluate']:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"val": val, "walls": walls, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
