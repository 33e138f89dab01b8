"""Does our input starve a GPU? img/s of ``model.fit`` on in-memory batches vs on Petastorm.

    .venv/bin/python bench/gpu_train.py [--models M[,M...]] [--image-size S] [--batch B]
                                        [--steps N] [--products N] [key=value ...]

For each model, side by side in one process on one device (bench/train_throughput.py's two
functions, imported):

  in-memory  ``model.fit`` on one batch of random pixels held in memory, repeated: the model's
             own speed on this device with no input pipeline (the ceiling);
  petastorm  ``model.fit`` on ``hierarchy.train.data.make_dataset`` (read, decode, augment,
             batch, prefetch) over bench/input_pipeline.py's ingested synthetic catalog of
             180x180 pictures (generated once, reused).

``ratio petastorm/in-memory`` below 1 is the share of the accelerator the input leaves idle.

With a GPU: ``resnet50`` and ``efficientnet_b0`` at 180 px, batch 128, the GPU of local rank 0
pinned as training pins it, mixed precision and XLA as ``train.mixed_precision`` /
``train.xla`` resolve (auto: on). On CPU: the same bench with ``small_cnn`` at 64 px and 40
steps (well under a minute once the catalog exists); there model and input share the cores,
so the CPU ratio checks the bench rather than forecasting a GPU's. One process measures one
GPU: with N GPUs per host each training process's input gets 1/N of the host's cores
(``train.reader_workers``).

Anchors for a GPU run: 872 img/s for ResNet-34 at 180 px on 2 Pascal GPUs (Cdiscount, 3rd
place); one H100/H200 should exceed 3000 img/s training ResNet-50. Figures go to stdout and
bench/results/gpu_train.json; they depend on the machine and are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tensorflow as tf  # noqa: E402
from input_pipeline import prepare  # noqa: E402
from train_throughput import bench_baseline, bench_training  # noqa: E402

from hierarchy.contracts.config import load_config  # noqa: E402
from hierarchy.train import gpu as tgpu  # noqa: E402
from hierarchy.train import models as tmodels  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "gpu_train.json"
GPU_MODELS, GPU_SIZE, GPU_BATCH, GPU_STEPS = ("resnet50", "efficientnet_b0"), 180, 128, 50
CPU_MODELS, CPU_SIZE, CPU_STEPS = ("small_cnn",), 64, 40
CLASSES = 4  # the synthetic catalog's level-1 classes (the head's size barely matters)
ANCHORS = {
    "resnet34_180px_2_pascal_gpus_cdiscount_3rd_place_img_s": 872,
    "resnet50_one_h100_or_h200_expected_img_s": "> 3000",
}


def say(text: str) -> None:
    print(text, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated backbones (default: by device)")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--batch", type=int, help="per step (default: 128 on GPU, train.batch_size)")
    ap.add_argument("--steps", type=int, help="timed steps per side")
    ap.add_argument("--products", type=int, default=3000)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "results" / "input_pipeline")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)

    pinned = tgpu.pin_gpu(0, 1)  # as a training process of local rank 0 does, before any use
    on_gpu = pinned is not None
    names = (args.models.split(",") if args.models else
             list(GPU_MODELS if on_gpu else CPU_MODELS))
    size = args.image_size or (GPU_SIZE if on_gpu else CPU_SIZE)
    steps = args.steps or (GPU_STEPS if on_gpu else CPU_STEPS)
    cfg = load_config(overrides=[*args.overrides, f"train.image_size={size}"]
                      + ([f"train.batch_size={args.batch or GPU_BATCH}"] if on_gpu or args.batch
                         else []))
    tcfg = cfg.train
    policy = tmodels.enable_mixed_precision_if_gpu(tcfg.mixed_precision)
    xla = tgpu.use_xla(tcfg.xla, on_gpu, workers=1)
    device = (tf.config.experimental.get_device_details(pinned).get("device_name", str(pinned))
              if on_gpu else "no GPU: CPU run with a tiny model")
    cores = len(os.sched_getaffinity(0))
    say(f"[device] {device}; {cores} cores; batch {tcfg.batch_size}, {steps} timed steps, "
        f"policy {policy}, xla {'on' if xla else 'off'}")
    data = prepare(args.workdir, args.products, 7)

    rows = []
    for name in names:
        run = tcfg.model_copy(update={"backbone": name})
        tf.keras.backend.clear_session()
        memory = bench_baseline(run, CLASSES, steps)
        say(f"[{name} {size}px] in-memory  {memory:9.1f} img/s")
        tf.keras.backend.clear_session()
        petastorm = bench_training(run, data, CLASSES, steps)
        say(f"[{name} {size}px] petastorm  {petastorm:9.1f} img/s")
        ratio = petastorm / memory
        say(f"ratio petastorm/in-memory {name} {size}: {ratio:.2f}")
        rows.append({"model": name, "image_size": size, "in_memory_img_s": round(memory, 1),
                     "petastorm_img_s": round(petastorm, 1), "ratio": round(ratio, 3)})
    say("anchors (GPU): 872 img/s ResNet-34 at 180 px on 2 Pascal GPUs (Cdiscount 3rd "
        "place); one H100/H200 should exceed 3000 img/s training ResNet-50")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"cores": cores, "platform": platform.platform(), "device": device,
                    "gpu": on_gpu},
        "batch_size": tcfg.batch_size, "steps": steps, "policy": policy, "xla": xla,
        "reader_workers": tcfg.reader_workers, "results": rows, "anchors": ANCHORS},
        indent=2) + "\n")
    say(f"saved {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
