"""Training throughput (images/s) of the configured backbone, against its compute ceiling.

    .venv/bin/python bench/train_throughput.py [--backbone B] [--image-size S] [--batch B]
                                               [--steps N] [--products N] [key=value ...]

Side by side in one process, one Horovod-free worker, the same model and batch size:

  baseline   ``model.fit`` on one batch of random pixels already in memory, repeated: what
             the backbone costs on this machine with no input pipeline at all (the ceiling);
  training   ``model.fit`` on ``hierarchy.train.data.make_dataset`` (Petastorm read, decode,
             augment, batch, prefetch) over the synthetic catalog that bench/input_pipeline.py
             generates and ingests (reused when present).

The ratio training / baseline says how much of the compute the input pipeline leaves idle.
The backbone and image size default to conf/local.yaml's ``train`` section (``key=value``
overrides as on every command). Figures go to stdout and bench/results/train_throughput.json;
they depend on the machine and are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tensorflow as tf  # noqa: E402
from input_pipeline import prepare  # noqa: E402

from hierarchy.contracts import model as cmodel
from hierarchy.contracts.config import load_config  # noqa: E402
from hierarchy.contracts.settings import Train  # noqa: E402
from hierarchy.train import data as tdata  # noqa: E402
from hierarchy.train import gpu as tgpu  # noqa: E402
from hierarchy.train import models as tmodels  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "train_throughput.json"


class _Clock(tf.keras.callbacks.Callback):
    """Wall time of the steps after the first (graph tracing and warm-up excluded)."""

    def __init__(self):
        super().__init__()
        self.start = None
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        if self.start is None:
            self.start = time.perf_counter()
        else:
            self.steps += 1

    def rate(self, batch: int) -> float:
        return self.steps * batch / (time.perf_counter() - self.start)


def _model(tcfg: dict, classes: int) -> tf.keras.Model:
    # the training loop's switches (auto: mixed precision and XLA on with a GPU, off on CPU)
    tmodels.enable_mixed_precision_if_gpu(tcfg.mixed_precision)
    model = tmodels.build_model(tcfg.backbone, classes, tcfg.image_size, weights=None,
                                dropout=tcfg.dropout)
    tmodels.compile_model(model, tcfg.learning_rate, tcfg.label_smoothing,
                          jit_compile=tgpu.use_xla(tcfg.xla, tgpu.has_gpu(), workers=1))
    return model


def bench_baseline(tcfg: Train, classes: int, steps: int) -> float:
    size, batch = tcfg.image_size, tcfg.batch_size
    x = tf.random.uniform([batch, size, size, 3])
    y = tf.random.uniform([batch], maxval=classes, dtype=tf.int32)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    clock = _Clock()
    _model(tcfg, classes).fit(ds, steps_per_epoch=steps + 1, epochs=1, verbose=0,
                              callbacks=[clock])
    return clock.rate(batch)


def bench_training(tcfg: Train, data: str, classes: int, steps: int) -> float:
    clock = _Clock()
    with tdata.make_dataset(data, "train", tdata.InputOptions(
            label="l1", image_size=tcfg.image_size, batch_size=tcfg.batch_size, training=True,
            augment=tcfg.augment, shuffle_buffer=tcfg.shuffle_buffer,
            preprocess=cmodel.preprocess_for(tcfg.backbone),
            reader_workers=tcfg.reader_workers)) as ds:
        _model(tcfg, classes).fit(ds, steps_per_epoch=steps + 1, epochs=1, verbose=0,
                                  callbacks=[clock])
    return clock.rate(tcfg.batch_size)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per side")
    ap.add_argument("--products", type=int, default=3000)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "results" / "input_pipeline")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    extra = [f"train.{k}={v}" for k, v in (("backbone", args.backbone),
                                          ("image_size", args.image_size),
                                          ("batch_size", args.batch)) if v]
    tcfg = dict(load_config(overrides=[*args.overrides, *extra])["train"])
    data = prepare(args.workdir, args.products, 7)
    classes = 4  # the small synthetic taxonomy's level-1 classes
    cores = len(os.sched_getaffinity(0))
    print(f"[model] {tcfg.backbone} {tcfg.image_size}px batch {tcfg.batch_size}, "
          f"{cores} cores", flush=True)
    base = bench_baseline(tcfg, classes, args.steps)
    print(f"[baseline] fit on in-memory batch   {base:9.1f} img/s", flush=True)
    real = bench_training(tcfg, data, classes, args.steps)
    print(f"[training] fit on Petastorm input   {real:9.1f} img/s   "
          f"ratio {real / base:.2f}x baseline", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"cores": cores, "platform": platform.platform()},
        "backbone": tcfg.backbone, "image_size": tcfg.image_size,
        "batch_size": tcfg.batch_size, "steps": args.steps,
        "baseline_img_s": round(base, 1), "training_img_s": round(real, 1),
        "ratio": round(real / base, 3)}, indent=2) + "\n")
    print(f"saved {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
