"""Models on one trunk, scored together: each whole (the trunk once per model) against the
trunk once and each head on its features (hierarchy/infer/loaded.py), side by side.

    .venv/bin/python bench/shared_trunk.py [--backbone NAME] [--size PX] [--pictures N]
                                           [--repeat R] [--classes C]

A flat model (``--backbone``, untrained: speed does not depend on the weights), the refit
head and the fusion head over its trunk, as ``hierarchy train`` builds them, are saved and
loaded as a scoring worker loads them. Then, R times and alternating, N preprocessed pictures
in batches of 256 go through all three:
  whole   each model as one compiled function (what scoring did before: 3 trunk passes);
  shared  :func:`hierarchy.infer.loaded.outputs` with one features cache per batch (1 pass).
The outputs are compared bit for bit first. Printed: images/s of each side (min / median /
max) and the ratio of the medians. This is evaluate's case (flat, refit and fusion scored in
one pass) and serve's with the fusion strategy's companions. Figures depend on the machine;
never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "shared_trunk.json"
BATCH = 256


def build(folder: str, backbone: str, size: int, classes: int):
    from hierarchy.infer.modelset import ModelRef
    from hierarchy.train import heads as theads
    from hierarchy.train import models as tmodels

    flat = tmodels.build_model(backbone, classes, size, name="flat")
    kernel, bias = theads.expert_source_rows(flat, "all")
    models = {"flat": flat, "refit": theads.build_refit_model(flat, 128),
              "fusion": theads.build_fusion_model(
                  flat, theads.fusion_view_head(kernel, bias, 128, 0.0, 32))}
    refs = []
    for name, model in models.items():
        path = os.path.join(folder, f"{name}.h5")
        model.save(path)
        refs.append(ModelRef(key=name, path=path, backbone=backbone, image_size=size))
    return refs


def whole_functions(refs):
    import tensorflow as tf

    from hierarchy.contracts.model import custom_objects

    out = []
    for ref in refs:
        model = tf.keras.models.load_model(ref.path, custom_objects=custom_objects(),
                                           compile=False)
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        out.append(tf.function(lambda x, m=model: m(x, training=False), input_signature=[spec]))
    return out


def run_whole(functions, batches) -> list:
    got = []
    for x in batches:
        for fn in functions:
            out = fn(x)
            got.append([o.numpy() for o in out] if isinstance(out, (list, tuple))
                       else [out.numpy()])
    return got


def run_shared(refs, batches) -> list:
    from hierarchy.infer import loaded

    got = []
    for i, x in enumerate(batches):
        cache: dict = {}
        for ref in refs:
            got.append(loaded.outputs(ref, x, cache, ("batch", i)))
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--pictures", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--classes", type=int, default=1000)
    args = ap.parse_args()
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(1)
    rng = np.random.default_rng(0)
    batches = [rng.uniform(-1, 1, (min(BATCH, args.pictures - i), args.size, args.size, 3))
               .astype(np.float32) for i in range(0, args.pictures, BATCH)]
    with tempfile.TemporaryDirectory() as folder:
        refs = build(folder, args.backbone, args.size, args.classes)
        whole = whole_functions(refs)
        # warm both (traces), and check they agree to the last bit
        a, b = run_whole(whole, batches[:1]), run_shared(refs, batches[:1])
        same = all(np.array_equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))
        print(f"[models] {args.backbone} {args.size}px, flat + refit + fusion; outputs "
              f"identical bit for bit: {same}", flush=True)
        timings = {"whole": [], "shared": []}
        for r in range(args.repeat):
            for side in ("whole", "shared"):
                t0 = time.perf_counter()
                run_whole(whole, batches) if side == "whole" else run_shared(refs, batches)
                timings[side].append(args.pictures / (time.perf_counter() - t0))
            print(f"run {r + 1}: whole {timings['whole'][-1]:.1f} img/s, shared "
                  f"{timings['shared'][-1]:.1f} img/s", flush=True)
    med = {k: statistics.median(v) for k, v in timings.items()}
    for side, v in timings.items():
        print(f"{side:7s} img/s  min {min(v):.1f}  median {med[side]:.1f}  max {max(v):.1f}")
    print(f"ratio shared/whole (medians): {med['shared'] / med['whole']:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "identical": same, "img_s": timings,
                                   "ratio": med["shared"] / med["whole"]}, indent=1))


if __name__ == "__main__":
    main()
