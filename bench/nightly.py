"""What a night costs: ``ingest --append`` + ``predict`` + ``curate`` after a day's dump, against
day 0's full ``ingest`` + ``predict`` + ``curate`` of the same catalog, side by side.

    .venv/bin/python bench/nightly.py [--test-products 6000] [--products 1500]
                                      [--delta 1 --delta 6 --delta 20] [--workdir DIR]

A synthetic catalog (fast preset) is generated once: its train dump is ingested and a flat
model trained on it for one epoch (``--backbone``, ``--image-size``: what a picture costs to
score; the night does not train). Then, for each delta d (a
share of the test products), from the same train-only dataset:

day 0   ``ingest --kind test`` (whole), ``predict --split test --strategy flat``, ``curate``;
day 1   a day's dump of d% of the test products' count, five sixths new products (pictures
        never seen) and one sixth re-sent with other pictures: ``ingest --kind test
        --append``, ``predict`` (incremental, the default), ``curate`` (hashes reused);
check   ``predict --rescore-all`` into another table: every product's leaf must equal the
        incremental table's, and the table must hold exactly one row per product.

Each command runs as a scheduler runs it (a fresh process, Spark start-up included) and is
timed wall-clock. Printed: each command's seconds, the night's total against day 0's (the
ratio), the rows and the check. ``--delta 6`` with 6,000 test products is the issue's
scenario (300 new + 60 re-sent). Nothing is asserted; figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
RUN = "night"


def run(cmd, cwd) -> tuple:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable, "HIERARCHY_HOME": str(cwd)}
    cmd = [*cmd[:2], "-q", *cmd[2:]]  # before the overrides: argparse takes them as one list
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds, json.loads(proc.stdout.strip().splitlines()[-1])


def day_dump(test: list, pool: list, out: Path, share: float) -> dict:
    import bson

    n = max(6, round(len(test) * share))
    resent, new = n // 6, n - n // 6
    fresh = pool[:new]
    changed = [{**d, "imgs": pool[new + i]["imgs"]} for i, d in enumerate(test[:resent])]
    out.write_bytes(b"".join(bson.encode(d) for d in fresh + changed))
    return {"new": len(fresh), "resent": len(changed)}


def leaves(work: Path, table: str) -> dict:
    """{product_id: category_id} of the table's run/test/flat partition, read from its files."""
    import pyarrow.dataset as pds

    folder = next((work / "warehouse").rglob(f"{table}/run_id={RUN}/split=test/strategy=flat"))
    t = pds.dataset(str(folder)).to_table(columns=["product_id", "category_id"]).to_pylist()
    ids = [r["product_id"] for r in t]
    if len(ids) != len(set(ids)):
        sys.exit(f"{table}: {len(ids) - len(set(ids))} duplicated product rows")
    return {r["product_id"]: r["category_id"] for r in t}


def main() -> None:
    import bson

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", type=int, default=1500, help="train products")
    ap.add_argument("--test-products", type=int, default=6000)
    ap.add_argument("--delta", type=float, action="append",
                    help="the day's dump as %% of the test products (repeat; default 1, 6, 20)")
    ap.add_argument("--workdir", default="data/bench/nightly")
    ap.add_argument("--backbone", default="small_cnn",
                    help="the scoring model's backbone (small_cnn: the demo's; mobilenet_v2 "
                         "costs per picture what a real deployment's models do)")
    ap.add_argument("--image-size", type=int, default=64)
    args = ap.parse_args()
    deltas = args.delta or [1.0, 6.0, 20.0]
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    hierarchy = str(BIN / "hierarchy")
    common = ["spark.master=local[2]"]
    pool_n = int(args.test_products * max(deltas) / 100) + 10
    if not (work / "syn" / "train.bson").exists():
        run([hierarchy, "synth", "--output", "syn", "--products", str(args.products),
             "--test-products", str(args.test_products + pool_n), "--seed", "8"], work)
        docs = list(bson.decode_file_iter(open(work / "syn" / "test.bson", "rb")))
        (work / "syn" / "day0.bson").write_bytes(
            b"".join(bson.encode(d) for d in docs[:args.test_products]))
        # the pool of products a day brings: other ids, pictures no day-0 product has
        (work / "syn" / "pool.bson").write_bytes(
            b"".join(bson.encode(d) for d in docs[args.test_products:]))
    if not (work / "models" / RUN / "run.json").exists():
        shutil.rmtree(work / "train_ds", ignore_errors=True)
        run([hierarchy, "ingest", "--input", "syn/train.bson", "--categories",
             "syn/category_names.csv", "--output", "train_ds", *common], work)
        run([hierarchy, "train", "--data", "train_ds", "--models", "models", "--run-id", RUN,
             "--level", "3", "--mode", "flat", "train.epochs=1",
             f"train.image_size={args.image_size}", f"train.backbone={args.backbone}",
             *common], work)
    test = list(bson.decode_file_iter(open(work / "syn" / "day0.bson", "rb")))
    pool = list(bson.decode_file_iter(open(work / "syn" / "pool.bson", "rb")))
    rows = []
    for delta in deltas:
        name = f"d{delta:g}".replace(".", "_")
        ds = work / f"ds_{name}"
        shutil.rmtree(ds, ignore_errors=True)
        shutil.copytree(work / "train_ds", ds)
        table = [f"catalog.table=p_{name}", f"catalog.curation_table=c_{name}"]
        predict = [hierarchy, "predict", "--data", ds.name, "--models", "models", "--run-id",
                   RUN, "--split", "test", "--strategy", "flat", "--output", f"out_{name}",
                   *common]
        day = {}
        day[0] = [run([hierarchy, "ingest", "--kind", "test", "--input", "syn/day0.bson",
                       "--categories", "syn/category_names.csv", "--output", ds.name,
                       *common], work)[0],
                  run(predict + table, work)[0],
                  run([hierarchy, "curate", "--data", ds.name, *common, *table], work)[0]]
        dump = day_dump(test, pool, work / f"day_{name}.bson", delta / 100)
        ingest_s, ingested = run([hierarchy, "ingest", "--kind", "test", "--append", "--input",
                                  f"day_{name}.bson", "--categories", "syn/category_names.csv",
                                  "--output", ds.name, *common], work)
        predict_s, predicted = run(predict + table, work)
        curate_s, curated = run([hierarchy, "curate", "--data", ds.name, *common, *table], work)
        day[1] = [ingest_s, predict_s, curate_s]
        run(predict + [f"catalog.table=full_{name}", f"catalog.curation_table=c_{name}",
                       "--rescore-all"], work)
        inc, full = leaves(work, f"p_{name}"), leaves(work, f"full_{name}")
        same = sum(inc.get(p) == c for p, c in full.items())
        row = {"delta_pct": delta, **dump, "products": len(inc),
               "expected": args.test_products + dump["new"],
               "added": ingested["added"], "replaced": ingested["replaced"],
               "scored": predicted["scored"], "reused": predicted["reused"],
               "decoded": curated["decoded"], "hashes_reused": curated["reused"],
               "day0_s": [round(s, 1) for s in day[0]], "day1_s": [round(s, 1) for s in day[1]],
               "ratio": round(sum(day[1]) / sum(day[0]), 3),
               "leaves_equal_rescore_all": f"{same}/{len(full)}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| delta | new + re-sent | day 0: ingest / predict / curate (s) | night: append / "
          "predict / curate (s) | night / day 0 | rows (expected) | leaves = rescore-all |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['delta_pct']:g}% | {r['new']} + {r['resent']} | "
              f"{' / '.join(map(str, r['day0_s']))} | {' / '.join(map(str, r['day1_s']))} | "
              f"{r['ratio']:.0%} | {r['products']} ({r['expected']}) | "
              f"{r['leaves_equal_rescore_all']} |")


if __name__ == "__main__":
    main()
