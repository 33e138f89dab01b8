"""Training input pipeline throughput against a bare JPEG decode loop, on the same pictures.

    .venv/bin/python bench/input_pipeline.py [--products N] [--image-size S] [--batch B]
                                             [--seconds T] [--rounds R] [--workdir DIR]

Generates a synthetic catalog (3000 products by default, reused while the settings stay the
same) and ingests it under bench/results/input_pipeline/, then, side by side in one process:

  baseline   the split's JPEG bytes read into memory with pyarrow first, then a Python loop of
             tf.io.decode_jpeg over them, one picture at a time: what one core decodes;
  pipeline   hierarchy.train.data.make_dataset (training=True: Petastorm read, shuffle, decode,
             augmentation, batching, prefetch; and training=False: decode + resize only),
             iterated for about T seconds after a warm-up batch.

Both are also given per core (images/s divided by the cores TensorFlow may use). Figures go to
stdout and bench/results/input_pipeline.json; they depend on the machine and are never asserted.

The ratio compares figures taken one after the other: on a machine whose load changes (other
jobs on the same cores) it swings with that load. --rounds R alternates the bare loop and each
pipeline in R slices of T/R seconds and gives the median of the R ratios, each to the loop run
just before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

import pyarrow.parquet as pq  # noqa: E402
import tensorflow as tf  # noqa: E402

from hierarchy.train import data as tdata  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "input_pipeline.json"


def say(text: str) -> None:
    print(text, flush=True)


def prepare(workdir: Path, products: int, seed: int) -> str:
    """Generate + ingest once; reuse while the settings are the same."""
    stamp = workdir / "settings.json"
    wanted = {"products": products, "seed": seed, "taxonomy": "small"}
    data = workdir / "dataset"
    if stamp.exists() and json.loads(stamp.read_text()) == wanted \
            and (data / "manifest.json").exists():
        say(f"[data] reusing {data}")
        return str(data)
    from hierarchy.contracts.config import load_config
    from hierarchy.ingest.pipeline import run_ingest
    from hierarchy.spark import get_spark, stop_spark
    from hierarchy.synth import generate

    stamp.unlink(missing_ok=True)
    t0 = time.perf_counter()
    generate(str(workdir / "synth"), products=products, seed=seed, taxonomy="small",
             test_products=0, progress=False)
    cfg = load_config(overrides=["ingest.progress=false", "ingest.split_mb=4"])
    spark = get_spark(cfg, "bench-input")
    try:
        run_ingest(spark, cfg, [str(workdir / "synth" / "train.bson")],
                   str(workdir / "synth" / "category_names.csv"), str(data), "train")
    finally:
        stop_spark(spark)
    stamp.write_text(json.dumps(wanted) + "\n")
    say(f"[data] generated and ingested {products} products in {time.perf_counter() - t0:.1f} s")
    return str(data)


def decode_loop(jpegs: list, seconds: float) -> tuple:
    """(pictures, seconds) of the bare loop: tf.io.decode_jpeg over ``jpegs``, one at a time,
    whole passes for about ``seconds``."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for jpeg in jpegs:
            tf.io.decode_jpeg(jpeg, channels=3)
        n += len(jpegs)
    return n, time.perf_counter() - t0


def load_jpegs(data: str) -> list:
    jpegs = pq.read_table(f"{data}/images/split=train", columns=["jpeg"]).column(0).to_pylist()
    for jpeg in jpegs[:20]:  # warm-up
        tf.io.decode_jpeg(jpeg, channels=3)
    return jpegs


def bench_baseline(data: str, seconds: float) -> dict:
    jpegs = load_jpegs(data)
    n, elapsed = decode_loop(jpegs, seconds)
    return {"images": n, "seconds": round(elapsed, 3), "images_per_s": n / elapsed,
            "distinct_pictures": len(jpegs)}


def pipeline_loop(it, seconds: float) -> tuple:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        images, _ = next(it)
        n += int(images.shape[0])
    return n, time.perf_counter() - t0


def bench_pipeline(data: str, seconds: float, *, training: bool, image_size: int,
                   batch_size: int, reader_workers: int, rounds: int = 1, jpegs=None,
                   **options) -> dict:
    """Pipeline images/s over ``seconds``; with ``rounds`` > 1, in that many slices, each
    right after a slice of the bare loop over ``jpegs`` (figures of the same moment on a
    machine whose load changes: the ratio of each round is kept)."""
    with tdata.make_dataset(data, "train", tdata.InputOptions(
            label="l3", image_size=image_size, batch_size=batch_size, training=training,
            augment=training, reader_workers=reader_workers, repeat=True, seed=0, **options)) as ds:
        it = iter(ds)
        for _ in range(3):  # warm-up: reader threads started, tf.data autotune
            next(it)
        if rounds <= 1:
            n, elapsed = pipeline_loop(it, seconds)
            return {"images": n, "seconds": round(elapsed, 3), "images_per_s": n / elapsed}
        totals, ratios = [0, 0.0, 0, 0.0], []
        for _ in range(rounds):
            b_n, b_s = decode_loop(jpegs, seconds / rounds)
            for _ in range(5):  # what the input prefetched while the loop ran is not counted
                next(it)
            p_n, p_s = pipeline_loop(it, seconds / rounds)
            ratios.append((p_n / p_s) / (b_n / b_s))
            totals = [totals[0] + p_n, totals[1] + p_s, totals[2] + b_n, totals[3] + b_s]
    return {"images": totals[0], "seconds": round(totals[1], 3),
            "images_per_s": totals[0] / totals[1], "baseline_images_per_s": totals[2] / totals[3],
            "ratio_rounds": ratios}


def variants(measure_options: bool):
    """(name, training, make_dataset options): the reference path, each speed-up added one by
    one (--options), and the configured defaults."""
    from hierarchy.contracts.config import load_config

    # cache_mb=0 on every side: this catalog would fit train.input_cache_mb and be read from
    # memory after one pass, which a 58 GB split never is; the bench times the streaming path
    configured = {**tdata.input_options(load_config().train), "cache_mb": 0}
    reference = {"dct_scaling": False, "input_threads": 0, "input_ram_budget_mb": 0,
                 "input_optimizations": False, "cache_mb": 0}
    steps = [("+ dct_scaling", {"dct_scaling": True}),
             ("+ input_optimizations", {"input_optimizations": True}),
             ("+ input_threads=cores", {"input_threads": os.cpu_count() or 1}),
             ("+ input_ram_budget_mb=512", {"input_ram_budget_mb": 512})]
    out = []
    for split, training in (("train", True), ("val", False)):
        if measure_options:
            options = dict(reference)
            out.append((f"{split}: reference (full decode, no options)", training,
                        dict(options)))
            for name, change in steps:
                options.update(change)
                out.append((f"{split}: {name}", training, dict(options)))
        out.append((f"{split}: configured defaults", training, dict(configured)))
    return out


def report(name: str, res: dict, options: dict, base: dict, cores: int) -> dict:
    """Ratios to the bare loop: to the loop's figure measured before the variants, or with
    --rounds the median of the rounds' ratios (each to the loop run just before)."""
    res["options"] = options
    res["per_core"] = res["images_per_s"] / cores
    rounds = sorted(res.get("ratio_rounds", ()))
    ratio = statistics.median(rounds) if rounds else res["images_per_s"] / base["images_per_s"]
    res["ratio_total_vs_baseline"] = ratio
    res["ratio_per_core_vs_baseline"] = ratio / cores
    spread = f" (rounds min {rounds[0]:.2f} max {rounds[-1]:.2f}, loop " \
             f"{res['baseline_images_per_s']:.0f} img/s)" if rounds else ""
    say(f"pipeline  {name:44s} {res['images_per_s']:7.0f} img/s "
        f"({res['per_core']:.0f}/core) = {ratio:.2f}x baseline{spread}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--image-size", type=int, default=None,
                    help="default: train.image_size of conf/local.yaml (the demo's)")
    ap.add_argument("--options", action="store_true",
                    help="also measure the reference path and each speed-up one by one")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--reader-workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="> 1: alternate the bare loop and each pipeline in this many slices "
                         "of --seconds and give the median ratio (a machine shared with "
                         "other work: both sides see the same load)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "results" / "input_pipeline")
    args = ap.parse_args(argv)
    if args.image_size is None:
        from hierarchy.contracts.config import load_config

        args.image_size = int(load_config()["train"]["image_size"])
    args.workdir.mkdir(parents=True, exist_ok=True)

    data = prepare(args.workdir, args.products, args.seed)
    manifest = json.loads(Path(data, "manifest.json").read_text())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    say(f"[setup] {manifest['splits']['train']['images']} train pictures, {cores} cores, "
        f"image_size {args.image_size}, batch {args.batch}, ~{args.seconds:.0f} s each")

    base = bench_baseline(data, args.seconds)
    say(f"baseline  bare decode_jpeg loop (1 thread)    {base['images_per_s']:9.0f} img/s")
    jpegs = load_jpegs(data) if args.rounds > 1 else None
    results = {"baseline": base, "variants": {}}
    for name, training, options in variants(args.options):
        res = bench_pipeline(data, args.seconds, training=training, image_size=args.image_size,
                             batch_size=args.batch, reader_workers=args.reader_workers,
                             rounds=args.rounds, jpegs=jpegs, **options)
        results["variants"][name] = report(name, res, options, base, cores)
    # the configured defaults (conf/local.yaml train:) are what training runs
    for split in ("train", "val"):
        res = results["variants"][f"{split}: configured defaults"]
        results[split] = res
        say(f"ratio {split} input (configured defaults) / bare decode loop: "
            f"{res['ratio_total_vs_baseline']:.2f}x")
    results["settings"] = {**vars(args), "workdir": str(args.workdir), "cores": cores,
                           "python": platform.python_version(), "tensorflow": tf.__version__,
                           "machine": platform.machine()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    say(f"[saved] {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
