"""Predict throughput (images/s) of the Spark scoring job against bare Keras, on one model.

    .venv/bin/python bench/predict_throughput.py [--products N] [--repeat R] [--workdir DIR]
                                                 [key=value ...]

On the synthetic catalog of bench/input_pipeline.py (3000 products by default, generated and
ingested under DIR/dataset, reused while the settings stay the same) and a small flat model
(small_cnn, 64 px, one epoch; trained into DIR/models run ``bench`` once, reused while
DIR/models/bench/flat/model.h5 exists). The val split is small, so the *train* split's
pictures are scored, side by side in one process:

  baseline   bare Keras: the split's JPEG bytes read into memory with pyarrow first (not
             timed), then decode + resize + preprocess with the functions the scorer uses
             (``resize_for_model``, ``preprocess_for``) and ``model.predict(x, batch_size=256)``;
             reported as decode+predict images/s and predict-only images/s;
  spark      ``hierarchy.infer.pipeline.score`` (repartition by product, sort, mapInPandas with
             the flat strategy) on local[*], run to completion into the ``noop`` sink (nothing
             collected): the first run starts the Python workers and loads the model in each
             (cold), the following ones reuse them (warm: models cached);
  plumbing   the same read + repartition + sort + Arrow hand-over to Python with a mapInPandas
             that only counts rows: what Spark costs before any JPEG is decoded.

Ratios are spark / baseline. Figures go to stdout and bench/results/predict_throughput.json;
they depend on the machine and are never asserted.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import tensorflow as tf  # noqa: E402
from input_pipeline import prepare  # noqa: E402

from hierarchy.contracts.config import load_config  # noqa: E402
from hierarchy.contracts.dataset import Dataset  # noqa: E402
from hierarchy.contracts.model import (  # noqa: E402
    custom_objects,
    preprocess_for,
    resize_for_model,  # noqa: E402
)
from hierarchy.contracts.modelstore import FLAT, ModelStore  # noqa: E402
from hierarchy.infer.modelset import ModelRef, ModelSet  # noqa: E402
from hierarchy.infer.pipeline import read_images, score, training_prior  # noqa: E402
from hierarchy.infer.scoring import ScoringPlan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "predict_throughput.json"
RUN_ID = "bench"
BATCH = 256


def say(text: str) -> None:
    print(text, flush=True)


def flat_model(cfg, data: str, models: str) -> ModelRef:
    """The bench's flat model: trained once (1 epoch, small_cnn 64 px), then reused."""
    run = ModelStore(models).run(RUN_ID)
    path = run.model_file(FLAT)
    if os.path.exists(path):
        say(f"[model] reusing {path}")
    else:
        from hierarchy.train.launch import run_training

        t0 = time.perf_counter()
        run_training(cfg, data, models, RUN_ID, level=3, mode="flat", np_=1)
        say(f"[model] trained in {time.perf_counter() - t0:.1f} s -> {path}")
    recorded = run.read().config.get(FLAT) or cfg.train
    return ModelRef(key="flat", path=path, backbone=recorded.backbone,
                    image_size=int(recorded.image_size))


# ----------------------------------------------------------------------------- baseline
def _decode(jpegs: list, ref: ModelRef) -> np.ndarray:
    """What BatchScorer does to a batch: decode each picture, resize, stack, preprocess."""
    prep = preprocess_for(ref.backbone)
    out = []
    for i in range(0, len(jpegs), BATCH):
        images = [tf.io.decode_jpeg(raw, channels=3) for raw in jpegs[i:i + BATCH]]
        x = tf.stack([resize_for_model(im, ref.image_size) for im in images])
        out.append(tf.cast(prep(x), tf.float32).numpy())
    return np.concatenate(out)


def bench_baseline(jpegs: list, ref: ModelRef, model, repeat: int) -> dict:
    _decode(jpegs[:BATCH], ref)  # warm-up: op kernels
    model.predict(np.zeros((BATCH, ref.image_size, ref.image_size, 3), np.float32),
                  batch_size=BATCH, verbose=0)  # warm-up: predict function traced
    decode_s, predict_s, call_s = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        x = _decode(jpegs, ref)
        t1 = time.perf_counter()
        model.predict(x, batch_size=BATCH, verbose=0)
        t2 = time.perf_counter()
        for i in range(0, len(x), BATCH):  # the scorer's call: one per Arrow batch
            model.predict_on_batch(x[i:i + BATCH])
        t3 = time.perf_counter()
        decode_s.append(t1 - t0)
        predict_s.append(t2 - t1)
        call_s.append(t3 - t2)
    n = len(jpegs)
    d, p, c = (statistics.median(v) for v in (decode_s, predict_s, call_s))
    return {"images": n, "decode_s": round(d, 3), "predict_s": round(p, 3),
            "model_call_s": round(c, 3),
            "decode_per_s": n / d, "predict_per_s": n / p, "model_call_per_s": n / c,
            "images_per_s": n / (d + p)}


# ----------------------------------------------------------------------------- spark
def _timed(action) -> float:
    t0 = time.perf_counter()
    action()
    return time.perf_counter() - t0


def bench_spark(spark, images, plan: ScoringPlan, partitions: int, n: int,
                repeat: int) -> dict:
    def run():
        score(images, plan, partitions).write.format("noop").mode("overwrite").save()

    cold = _timed(run)
    warm = [_timed(run) for _ in range(repeat)]
    w = statistics.median(warm)
    return {"images": n, "cold_s": round(cold, 3), "warm_s": round(w, 3),
            "warm_runs_s": [round(s, 3) for s in warm],
            "cold_images_per_s": n / cold, "warm_images_per_s": n / w}


def bench_plumbing(images, partitions: int, n: int, repeat: int) -> dict:
    """score()'s shape with the model taken out: read, shuffle by product, sort, Arrow."""
    import pandas as pd

    def count(batches):
        for pdf in batches:
            yield pd.DataFrame({"rows": [len(pdf)]})

    parts = partitions or max(1, images.rdd.getNumPartitions())

    def run():
        (images.repartition(parts, "product_id").sortWithinPartitions("product_id", "img_idx")
               .mapInPandas(count, "rows long").write.format("noop").mode("overwrite").save())

    run()  # its own Python workers (no TensorFlow in them) started
    s = statistics.median(_timed(run) for _ in range(repeat))
    return {"images": n, "seconds": round(s, 3), "images_per_s": n / s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=2,
                    help="timed runs per side (spark: warm runs after the cold one)")
    ap.add_argument("--workdir", type=Path,
                    default=ROOT / "bench" / "results" / "predict_throughput")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    repeat = max(1, args.repeat)

    cfg = load_config(overrides=[
        "train.backbone=small_cnn", "train.image_size=64", "train.epochs=1",
        f"catalog.metastore={args.workdir / 'metastore_db'}",
        f"catalog.warehouse={args.workdir / 'wh'}", "predict.progress=false",
        *args.overrides])
    data = prepare(args.workdir, args.products, args.seed)
    models = str(args.workdir / "models")
    ref = flat_model(cfg, data, models)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    # ---- baseline: bare Keras in this process
    jpegs = pq.read_table(f"{data}/images/split=train", columns=["jpeg"]).column(0).to_pylist()
    n = len(jpegs)
    say(f"[setup] {n} train pictures, {ref.backbone} {ref.image_size}px, {cores} cores, "
        f"repeat {repeat}")
    model = tf.keras.models.load_model(ref.path, custom_objects=custom_objects(), compile=False)
    base = bench_baseline(jpegs, ref, model, repeat)
    del jpegs
    say(f"baseline  decode+resize (1 thread loop)        {base['decode_per_s']:9.0f} img/s")
    say(f"baseline  model.predict(batch 256) only        {base['predict_per_s']:9.0f} img/s")
    say(f"baseline  predict_on_batch per 256 (scorer)    {base['model_call_per_s']:9.0f} img/s")
    say(f"baseline  decode+predict                       {base['images_per_s']:9.0f} img/s")

    # ---- spark: the predict job's transform on local[*]
    from hierarchy.spark import get_spark, stop_spark

    pcfg = cfg.predict
    spark = get_spark(cfg, "bench-predict")
    try:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(pcfg.batch_size))
        taxonomy = Dataset(data).taxonomy()
        prior = training_prior(spark, data)
        plan = ScoringPlan(models=ModelSet(run_id=RUN_ID, strategy="flat", flat=ref),
                           taxonomy_json=taxonomy.to_json(), prior_category_id=prior[0],
                           prior_share=prior[1], params=(),
                           aggregate=pcfg.aggregate, tta_flip=pcfg.tta_flip,
                           top_n=pcfg.top_n, threads=pcfg.threads)
        images = read_images(spark, data, "train")
        counted = images.count()
        if counted != n:
            say(f"[warning] Spark reads {counted} train pictures, pyarrow {n}")
        read_parts = images.rdd.getNumPartitions()
        partitions = pcfg.partitions
        say(f"[spark] {spark.sparkContext.master}, {read_parts} read partitions, scoring in "
            f"{partitions or read_parts} tasks, Arrow batches of {pcfg.batch_size}, "
            f"TF threads {pcfg.threads or 'spark.task.cpus'}")
        sp = bench_spark(spark, images, plan, partitions, n, repeat)
        sp["read_partitions"] = read_parts
        sp["scoring_partitions"] = partitions or read_parts
        sp["ratio_cold_vs_baseline"] = sp["cold_images_per_s"] / base["images_per_s"]
        sp["ratio_warm_vs_baseline"] = sp["warm_images_per_s"] / base["images_per_s"]
        sp["ratio_warm_vs_predict_only"] = sp["warm_images_per_s"] / base["predict_per_s"]
        say(f"spark     score() cold (workers start, load)   {sp['cold_images_per_s']:9.0f} "
            f"img/s = {sp['ratio_cold_vs_baseline']:.2f}x baseline  ({sp['cold_s']:.1f} s)")
        say(f"spark     score() warm (models cached)         {sp['warm_images_per_s']:9.0f} "
            f"img/s = {sp['ratio_warm_vs_baseline']:.2f}x baseline  ({sp['warm_s']:.1f} s), "
            f"{sp['ratio_warm_vs_predict_only']:.2f}x predict-only")
        plumb = bench_plumbing(images, partitions, n, repeat)
        plumb["ratio_vs_baseline"] = plumb["images_per_s"] / base["images_per_s"]
        say(f"spark     plumbing only (no decode, no model)  {plumb['images_per_s']:9.0f} "
            f"img/s  ({plumb['seconds']:.1f} s of the warm run's {sp['warm_s']:.1f} s)")
    finally:
        stop_spark(spark)

    results = {"baseline": base, "spark": sp, "plumbing": plumb,
               "settings": {**vars(args), "workdir": str(args.workdir), "repeat": repeat,
                            "cores": cores, "model": ref.__dict__,
                            "predict": dict(pcfg), "python": platform.python_version(),
                            "tensorflow": tf.__version__, "machine": platform.machine()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    say(f"[saved] {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
