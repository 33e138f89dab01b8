"""Ingest throughput against the obvious single-process loop, on a 1 GB dump of real pictures.

    .venv/bin/python bench/ingest_throughput.py [--source real|synthetic] [--mb 1000]
                                                [--repeat 3] [--workdir DIR]

On one dump (default: the official sample's documents repeated to 1 GB with fresh ids,
bench/real_dump.py), page cache warm, side by side in one run:

  baseline    bson.decode_file_iter, md5 and taxonomy levels per picture, one pyarrow
              ParquetWriter with the IMAGES_FILE schema: what one Python process does;
  ingest      `hierarchy ingest` in a fresh process per run (local[*]): the wall time with
              Python and Spark start-up, the job's own total, and its phases from the manifest
              (spark start, scan, worker start, decode, duplicates, metadata, commit);
  reference   one run with ingest.raw_decoder=false (bson.decode of every document);
  no CDS      one run with spark.cds_archive='' (hierarchy/spark_cds.py off).

Ratios are MB/s over the baseline's MB/s; the fixed cost (wall - scan - decode) is reported and
extrapolated to the 58 GB dump. Saved to bench/results/ingest_throughput.json; figures depend
on the machine and are never asserted.
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

from hierarchy.contracts.config import load_config
from hierarchy.contracts.schema import IMAGES_FILE
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.synth.catalog import generate

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
def bench_cli(path: Path, categories: Path, workdir: Path, repeat: int,
              overrides=()) -> list:
    """`hierarchy ingest` as a user runs it, in a fresh process each time: wall time from the
    command to its exit (Python and Spark start-up included), plus the manifest's phases."""
    import subprocess

    runs = []
    for i in range(repeat):
        out = workdir / f"cli-out-{i}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [str(Path(sys.executable).with_name("hierarchy")), "ingest", "--input", str(path),
               "--categories", str(categories), "--output", str(out), "ingest.progress=false",
               "spark.master=local[*]", *overrides]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        entry = json.loads((out / "manifest.json").read_text())["kinds"]["train"]
        runs.append({"wall_s": wall, "timings": entry["timings"],
                     "images": entry["counts"]["images"]})
        t = entry["timings"]
        say(f"[cli{' ' + ' '.join(overrides) if overrides else ''}] run {i + 1}/{repeat}: wall "
            f"{wall:.2f} s = spark start {t.get('spark_start_s', 0):.2f} + job "
            f"{t['total_s']:.2f} (scan {t['scan_s']:.2f}, wait for workers "
            f"{t['worker_wait_s']:.2f}, decode {t['decode_s']:.2f}, dup "
            f"{t['duplicates_s']:.2f}, metadata {t['metadata_s']:.2f}, commit "
            f"{t['commit_s']:.2f}) + rest")
        shutil.rmtree(out, ignore_errors=True)
    return runs


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
    parser.add_argument("--source", choices=("real", "synthetic"), default="real",
                        help="real: the official sample's documents repeated to --mb "
                             "(bench/real_dump.py); synthetic: a generated catalog")
    parser.add_argument("--mb", type=float, default=1000.0, help="real dump size, 10^6 B")
    parser.add_argument("--products", type=int, default=20000,
                        help="synthetic train products (20000)")
    parser.add_argument("--seed", type=int, default=0, help="catalog seed (0)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "results" / "work")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement (3)")
    args = parser.parse_args(argv)
    runs = args.repeat

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.source == "real":
        sys.path.insert(0, str(ROOT / "bench"))
        from real_dump import SAMPLE, write_dump

        train = workdir / "real.bson"
        info = write_dump(train, args.mb)
        categories = SAMPLE.with_name("category_names.csv")
        described = (f"{info['products']} products (official sample x {info['copies']}, "
                     f"{info['pictures']} pictures, each copy's bytes its own)")
    else:
        catalog = prepare_catalog(workdir, args.products, args.seed)
        train, categories = workdir / "train.bson", workdir / "category_names.csv"
        described = f"{catalog['products']['train']} products, {catalog['images']['train']} images"
    size = train.stat().st_size
    cores = os.cpu_count() or 1
    row_group_bytes = int(load_config().ingest.row_group_mb * (1 << 20))
    say(f"[machine] {cores} cores, {platform.platform()}, Python {platform.python_version()}")
    say(f"[input] {train} : {size / MB:.1f} MB, {described}")

    read_file(train)  # page cache warm for every side
    say(f"[baseline] {runs} runs, single process: decode_file_iter + md5 + ParquetWriter")
    base_runs, base_images = bench_baseline(train, categories, workdir, row_group_bytes, runs)
    say(f"[ingest] {runs} runs of `hierarchy ingest` (fresh process, local[*])")
    cli = bench_cli(train, categories, workdir, runs)
    say("[ingest] 1 run with ingest.raw_decoder=false (the reference decode)")
    ref = bench_cli(train, categories, workdir, 1, ["ingest.raw_decoder=false"])
    say("[ingest] 1 run with spark.cds_archive='' (the driver JVM loads every class itself)")
    no_cds = bench_cli(train, categories, workdir, 1, ["spark.cds_archive="])

    images = cli[-1]["images"]
    t = [r["timings"] for r in cli]
    rows = {
        "baseline (1 process)": figures(base_runs, size, base_images),
        "ingest wall (incl. start)": figures([r["wall_s"] for r in cli], size, images),
        "ingest job (total_s)": figures([x["total_s"] for x in t], size, images),
        "ingest decode phase": figures([x["decode_s"] for x in t], size, images),
        "reference decoder job": figures([r["timings"]["total_s"] for r in ref], size, images),
        "reference decode phase": figures([r["timings"]["decode_s"] for r in ref], size, images),
        "wall without CDS archive": figures([r["wall_s"] for r in no_cds], size, images),
        "job without CDS archive": figures([r["timings"]["total_s"] for r in no_cds], size,
                                           images),
    }
    base = rows["baseline (1 process)"]["mb_per_s"]
    ratios = {
        "ingest wall (with Spark start) / sequential loop":
            rows["ingest wall (incl. start)"]["mb_per_s"] / base,
        "ingest job end-to-end / sequential loop": rows["ingest job (total_s)"]["mb_per_s"] / base,
        "ingest decode phase / sequential loop": rows["ingest decode phase"]["mb_per_s"] / base,
        "reference decoder, decode phase / sequential loop":
            rows["reference decode phase"]["mb_per_s"] / base,
        "ingest wall without the CDS archive / sequential loop":
            rows["wall without CDS archive"]["mb_per_s"] / base,
    }
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    phases = {k: statistics.median(x[k] for x in t) for k in
              ("spark_start_s", "scan_s", "worker_warmup_s", "worker_wait_s", "worker_start_s",
               "decode_s",
               "duplicates_s", "metadata_s", "commit_s", "total_s")}
    phases["wall_s"] = statistics.median(r["wall_s"] for r in cli)
    phases["tasks_cpu_s"] = {k: statistics.median(x["tasks_s"][k] for x in t)
                             for k in ("read", "decode", "write")}
    fixed = phases["wall_s"] - phases["decode_s"] - phases["scan_s"]  # start, workers, commit

    print_table(rows)
    say("\nphases (median s): " + ", ".join(
        f"{k} {v:.2f}" for k, v in phases.items() if not isinstance(v, dict))
        + "; task CPU " + ", ".join(f"{k} {v:.2f}" for k, v in phases["tasks_cpu_s"].items()))
    for name, value in ratios.items():
        say(f"ratio {name}: {value:.2f}x")
    per_gb = {"scan_s": phases["scan_s"] / size * 1e9, "decode_s": phases["decode_s"] / size * 1e9}
    at_58 = fixed + 58 * (per_gb["scan_s"] + per_gb["decode_s"])
    say(f"fixed cost (wall - scan - decode): {fixed:.2f} s; at 58 GB on the same 2 cores: "
        f"~{at_58 / 60:.1f} min, of which the fixed cost is {fixed / at_58:.2%}")

    result = {
        "machine": {"cores": cores, "platform": platform.platform(),
                    "python": platform.python_version(), "pyarrow": pa.__version__},
        "input": {"path": str(train), "bytes": size, "source": args.source,
                  "described": described},
        "settings": {"repeat": runs, "row_group_mb": row_group_bytes / (1 << 20)},
        "measurements": rows, "ratios": ratios, "phases": phases,
        "fixed_s": round(fixed, 3), "extrapolated_58gb_s": round(at_58, 1),
        "cli_runs": cli, "reference_runs": ref, "no_cds_runs": no_cds,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    say(f"\nsaved {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
