"""Ingest throughput against a raw read of the file and the obvious single-process decoder.

    .venv/bin/python bench/ingest_throughput.py [--products N] [--workdir DIR] [--repeat R]

On one synthetic train.bson, side by side in one run:

  raw read    the file read in 8 MiB chunks: what the disk (here: the page cache) gives;
  baseline    bson.decode_file_iter, md5 and taxonomy levels per picture, one pyarrow
              ParquetWriter with the IMAGES_FILE schema: what one Python process does;
  ingest      run_ingest on local Spark (local[*]), end to end and its decode phase alone.

Medians of the repeats are printed and saved to bench/results/ingest_throughput.json. The
figures are reported, never asserted: they depend on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import bson
import pyarrow as pa
import pyarrow.parquet as pq

from hierarchy.config import load_config
from hierarchy.ingest.pipeline import run_ingest
from hierarchy.ingest.schema import IMAGES_FILE
from hierarchy.spark import get_spark
from hierarchy.synth.catalog import generate
from hierarchy.taxonomy import Taxonomy

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "ingest_throughput.json"
CHUNK = 8 << 20
MB = 1e6  # throughputs are in decimal megabytes of input file per second


def say(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------ catalog
def prepare_catalog(workdir: Path, products: int, seed: int) -> dict:
    """Generate the catalog, or reuse the one left by an earlier run with the same settings."""
    stamp = workdir / "catalog.json"
    wanted = {"products": products, "test_products": 0, "seed": seed, "taxonomy": "small"}
    if stamp.exists() and (workdir / "train.bson").exists():
        info = json.loads(stamp.read_text())
        same_file = info["bytes"]["train.bson"] == (workdir / "train.bson").stat().st_size
        if info["settings"] == wanted and same_file:
            say(f"[catalog] reusing {workdir / 'train.bson'} ({products} products, seed {seed})")
            return info
    say(f"[catalog] generating {products} train products (seed {seed}) in {workdir}")
    stamp.unlink(missing_ok=True)  # a half-written catalog must not be reused next time
    info = generate(str(workdir), products, seed=seed, taxonomy="small", test_products=0)
    info["settings"] = wanted
    stamp.write_text(json.dumps(info, indent=2) + "\n")
    return info


# ------------------------------------------------------------------------------ raw read
def read_file(path: Path) -> int:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(view):
            total += n
    return total


def bench_raw_read(path: Path, repeat: int) -> list:
    # One untimed read first, so every timed read comes from the page cache: dropping the
    # cache needs root, and a cold first read would compare the disk with a warm ingest.
    read_file(path)
    runs = []
    for i in range(repeat):
        t0 = time.perf_counter()
        read_file(path)
        runs.append(time.perf_counter() - t0)
        say(f"[raw read] run {i + 1}/{repeat}: {runs[-1]:.3f} s")
    return runs


# ------------------------------------------------------------------------------ baseline
def sequential_ingest(path: Path, taxonomy: Taxonomy, out: Path, row_group_bytes: int) -> int:
    """The straightforward single-process conversion; returns the number of images written."""
    columns = {f.name: [] for f in IMAGES_FILE}
    buffered = images = 0

    def flush(writer: pq.ParquetWriter) -> None:
        nonlocal buffered
        if columns["jpeg"]:
            writer.write_table(pa.Table.from_pydict(columns, schema=IMAGES_FILE),
                               row_group_size=len(columns["jpeg"]))
        for values in columns.values():
            values.clear()
        buffered = 0

    # compression=None like ingest.compression=none (the default): JPEG does not compress
    with open(path, "rb") as fh, pq.ParquetWriter(out, IMAGES_FILE, compression=None) as writer:
        for doc in bson.decode_file_iter(fh):
            category_id = doc["category_id"]
            l1, l2, l3 = taxonomy.levels_of_category(category_id)
            for idx, pic in enumerate(doc["imgs"]):
                data = pic["picture"]
                row = (doc["_id"], idx, category_id, l1, l2, l3, len(data),
                       hashlib.md5(data).hexdigest(), data)
                for name, value in zip(columns, row):
                    columns[name].append(value)
                buffered += len(data)
                images += 1
                if buffered >= row_group_bytes:
                    flush(writer)
        flush(writer)
    return images


def bench_baseline(path: Path, categories: Path, workdir: Path, row_group_bytes: int,
                   repeat: int) -> tuple:
    taxonomy = Taxonomy.from_csv(str(categories))
    out = workdir / "baseline.parquet"
    runs, images = [], 0
    for i in range(repeat):
        out.unlink(missing_ok=True)
        say(f"[baseline] run {i + 1}/{repeat}: decode_file_iter -> {out.name} ...")
        t0 = time.perf_counter()
        images = sequential_ingest(path, taxonomy, out, row_group_bytes)
        runs.append(time.perf_counter() - t0)
        say(f"[baseline] run {i + 1}/{repeat}: {runs[-1]:.3f} s, {images} images")
    out.unlink(missing_ok=True)
    return runs, images


# ------------------------------------------------------------------------------ ingest
def _load_ingest_modules(_) -> int:
    import hierarchy.ingest.pipeline  # noqa: F401

    return 0


def bench_ingest(path: Path, categories: Path, workdir: Path, split_mb: float,
                 repeat: int) -> tuple:
    cfg = load_config(overrides=["spark.master=local[*]", "ingest.progress=false",
                                 f"ingest.split_mb={split_mb}"])
    say("[ingest] starting Spark (not timed) ...")
    spark = get_spark(cfg, "bench")
    sc = spark.sparkContext
    # Start the Python workers and load the ingest modules in them (~1 s each here, petastorm
    # mostly): like the JVM, paid once per session, and it would otherwise land in run 1 only.
    n = sc.defaultParallelism
    sc.parallelize(range(n), n).map(_load_ingest_modules).count()
    entries = []
    try:
        for i in range(repeat):
            out = workdir / f"ingest-out-{i}"
            shutil.rmtree(out, ignore_errors=True)
            say(f"[ingest] run {i + 1}/{repeat}: run_ingest -> {out.name} ...")
            entry = run_ingest(spark, cfg, [str(path)], str(categories), str(out), "train")
            entries.append(entry)
            t = entry["timings"]
            say(f"[ingest] run {i + 1}/{repeat}: total {t['total_s']:.3f} s (scan "
                f"{t['scan_s']:.3f}, decode {t['decode_s']:.3f}, commit {t['commit_s']:.3f}), "
                f"{entry['tasks']} tasks, {entry['counts']['images']} images")
            shutil.rmtree(out, ignore_errors=True)
        parallelism = sc.defaultParallelism
    finally:
        spark.stop()
    return entries, parallelism


# ------------------------------------------------------------------------------ report
def figures(runs: list, size: int, images: int | None) -> dict:
    median = statistics.median(runs)
    return {
        "runs_s": [round(r, 4) for r in runs],
        "median_s": round(median, 4),
        "mb_per_s": round(size / MB / median, 2),
        "images_per_s": round(images / median, 1) if images is not None else None,
    }


def print_table(rows: dict) -> None:
    say(f"\n{'measurement':<26}{'median s':>10}{'MB/s':>10}{'images/s':>11}  runs (s)")
    for name, f in rows.items():
        ips = f"{f['images_per_s']:.0f}" if f["images_per_s"] is not None else "-"
        runs = ", ".join(f"{r:.3f}" for r in f["runs_s"])
        say(f"{name:<26}{f['median_s']:>10.3f}{f['mb_per_s']:>10.1f}{ips:>11}  {runs}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--products", type=int, default=20000, help="train products (20000)")
    parser.add_argument("--seed", type=int, default=0, help="catalog seed (0)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "results" / "work")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs of each measurement (default: 3 raw read, 2 for the others)")
    args = parser.parse_args(argv)
    reads = args.repeat or 3
    runs = args.repeat or 2

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    catalog = prepare_catalog(workdir, args.products, args.seed)
    train, categories = workdir / "train.bson", workdir / "category_names.csv"
    size = train.stat().st_size
    cores = os.cpu_count() or 1
    # Several tasks per core, so one slow range does not leave the other cores idle at the end.
    split_mb = max(1.0, round(size / (1 << 20) / (4 * cores), 1))
    row_group_bytes = int(load_config().get_path("ingest.row_group_mb") * (1 << 20))
    say(f"[machine] {cores} cores, {platform.platform()}, Python {platform.python_version()}")
    say(f"[input] {train} : {size / MB:.1f} MB, {catalog['products']['train']} products, "
        f"{catalog['images']['train']} images; ingest.split_mb={split_mb}")

    say(f"[raw read] {reads} runs, 8 MiB chunks, after one untimed read (warm page cache)")
    raw_runs = bench_raw_read(train, reads)
    say(f"[baseline] {runs} runs, single process")
    base_runs, base_images = bench_baseline(train, categories, workdir, row_group_bytes, runs)
    say(f"[ingest] {runs} runs, local[*]")
    entries, parallelism = bench_ingest(train, categories, workdir, split_mb, runs)

    images = entries[-1]["counts"]["images"]
    rows = {
        "raw read (warm cache)": figures(raw_runs, size, None),
        "baseline (1 process)": figures(base_runs, size, base_images),
        "ingest end-to-end": figures([e["timings"]["total_s"] for e in entries], size, images),
        "ingest decode phase": figures([e["timings"]["decode_s"] for e in entries], size, images),
        "ingest scan phase": figures([e["timings"]["scan_s"] for e in entries], size, None),
    }
    raw, base = rows["raw read (warm cache)"], rows["baseline (1 process)"]
    total, decode = rows["ingest end-to-end"], rows["ingest decode phase"]
    ratios = {
        "ingest/baseline end-to-end": round(total["mb_per_s"] / base["mb_per_s"], 3),
        "ingest/baseline decode phase": round(decode["mb_per_s"] / base["mb_per_s"], 3),
        "ingest/raw read end-to-end": round(total["mb_per_s"] / raw["mb_per_s"], 4),
        "ingest/raw read decode phase": round(decode["mb_per_s"] / raw["mb_per_s"], 4),
        "baseline/raw read": round(base["mb_per_s"] / raw["mb_per_s"], 4),
        "ingest scan/raw read": round(rows["ingest scan phase"]["mb_per_s"] / raw["mb_per_s"], 4),
    }

    print_table(rows)
    say("")
    for name, value in ratios.items():
        say(f"{name:<30}{value:>8.3f}x")
    notes = [
        f"MB = 10^6 bytes of train.bson; images/s counts pictures written to Parquet "
        f"(baseline {base_images}, ingest {images})",
        "raw read: the file is read once untimed before the timed reads, so all raw-read "
        "figures come from the page cache (the baseline and ingest runs after it do too)",
        f"ingest: Spark session and its {parallelism} Python workers (with the ingest modules "
        "imported) started before timing (start-up not measured); end-to-end = "
        "timings.total_s (scan + decode + commit with Petastorm metadata), decode phase = "
        "timings.decode_s",
        "baseline does less than ingest: no offset scan, no train/val split, no JPEG marker "
        "check, no products/quarantine tables, one output file",
    ]
    if base_images != images:
        notes.append(f"image counts differ: baseline {base_images}, ingest {images}")
    say("")
    for note in notes:
        say(f"note: {note}")

    result = {
        "machine": {"cores": cores, "spark_parallelism": parallelism,
                    "platform": platform.platform(), "python": platform.python_version(),
                    "pyarrow": pa.__version__},
        "input": {"path": str(train), "bytes": size, "products": catalog["products"]["train"],
                  "images": catalog["images"]["train"], "seed": args.seed,
                  "taxonomy": catalog["taxonomy"]},
        "settings": {"split_mb": split_mb, "tasks": entries[-1]["tasks"],
                     "row_group_mb": row_group_bytes / (1 << 20), "chunk_bytes": CHUNK,
                     "repeat_raw_read": reads, "repeat": runs},
        "measurements": rows,
        "ratios": ratios,
        "ingest_timings": [e["timings"] for e in entries],
        "notes": notes,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    say(f"\nsaved {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
