"""The GPU path, as far as a CPU can test it: the mixed-precision policy and float32 outputs,
loss scaling under Horovod (a real step, an overflow skipped on every worker), XLA, and one
GPU per process pinned by local rank (hierarchy/train/gpu.py; README "GPU cluster")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
hvd = pytest.importorskip("horovod.tensorflow.keras")

from hierarchy.contracts import model as cmodel  # noqa: E402
from hierarchy.contracts.taxonomy import Taxonomy  # noqa: E402
from hierarchy.train import gpu, models  # noqa: E402

ON_GPU = bool(tf.config.list_physical_devices("GPU"))
SIZE, CLASSES = 32, 4
INITIAL_SCALE = 2.0 ** 15  # Keras' dynamic loss scale starts here and halves on overflow


pytestmark = pytest.mark.usefixtures("fresh_keras")  # conftest.py


def _batch(seed: int, n: int = 8):
    rng = np.random.default_rng(seed)
    return (rng.random((n, SIZE, SIZE, 3), dtype=np.float32),
            rng.integers(0, CLASSES, n).astype(np.int32))


def _trainable(model) -> list:
    return [v.numpy().copy() for v in model.trainable_variables]


# ------------------------------------------------------------------------------ the policy
def test_policy_switch_and_float32_outputs():
    assert models.enable_mixed_precision_if_gpu("off") == "float32"
    assert models.enable_mixed_precision_if_gpu(False) == "float32"
    assert models.enable_mixed_precision_if_gpu("auto") == (
        "mixed_float16" if ON_GPU else "float32")
    assert models.enable_mixed_precision_if_gpu(True) == "mixed_float16"
    assert models.enable_mixed_precision_if_gpu("on") == "mixed_float16"
    assert tf.keras.mixed_precision.global_policy().name == "mixed_float16"

    flat = models.build_model("small_cnn", CLASSES, SIZE)
    # float16 compute, float32 weights, float32 probabilities (softmax outside float16)
    assert flat.get_layer("logits").compute_dtype == "float16"
    assert flat.get_layer("backbone").layers[1].compute_dtype == "float16"
    assert {v.dtype for v in flat.trainable_variables} == {tf.float32}
    assert flat.output.dtype == tf.float32
    assert flat(_batch(0)[0]).dtype == tf.float32

    taxonomy = Taxonomy.from_rows([(10 + i, f"L{i % 2}", f"M{i % 4}", f"leaf{i}")
                                   for i in range(8)])
    multi = models.build_multi_model("small_cnn", taxonomy, SIZE)
    assert [o.dtype for o in multi.outputs] == [tf.float32] * len(cmodel.MULTI_OUTPUTS)


def test_switches_come_from_the_config():
    from hierarchy.contracts.config import ConfigError, load_config

    train = load_config().train
    assert (train.mixed_precision, train.xla) == ("auto", "auto")
    # a bare on/off is a YAML boolean: still the switch's on/off
    train = load_config(overrides=["train.xla=on", "train.mixed_precision=off"]).train
    assert (train.xla, train.mixed_precision) == ("on", "off")
    with pytest.raises(ConfigError, match="train.xla.*auto, on, off"):
        load_config(overrides=["train.xla=sometimes"])


# ------------------------------------------------------------ loss scaling under Horovod
def test_optimizer_is_loss_scaled_outside_horovod():
    hvd.init()
    opt = gpu.make_optimizer(hvd, 1e-3, mixed=True, distributed=True)
    assert isinstance(opt, tf.keras.mixed_precision.LossScaleOptimizer)
    assert opt.dynamic and float(opt.loss_scale) == INITIAL_SCALE
    inner = opt.inner_optimizer
    assert hasattr(inner, "_allreduce_grads")  # Horovod's DistributedOptimizer
    assert isinstance(inner, tf.keras.optimizers.Adam)
    plain = gpu.make_optimizer(hvd, 1e-3, mixed=False, distributed=True)
    assert not isinstance(plain, tf.keras.mixed_precision.LossScaleOptimizer)
    single = gpu.make_optimizer(hvd, 1e-3, mixed=False, distributed=False)
    assert not hasattr(single, "_allreduce_grads")  # one worker: nothing to average
    # the reverse order does not build with horovod 0.28.1 (gpu.make_optimizer says why)
    with pytest.raises(TypeError):
        hvd.DistributedOptimizer(tf.keras.mixed_precision.LossScaleOptimizer(
            tf.keras.optimizers.Adam(1e-3)))


def _mixed_model(seed: int, distributed: bool, jit_compile: bool = False):
    """A small CNN compiled as the training loop does under mixed precision: (model, opt)."""
    hvd.init()
    tf.keras.utils.set_random_seed(seed)
    models.enable_mixed_precision_if_gpu("on")
    model = models.build_model("small_cnn", CLASSES, SIZE)
    opt = gpu.make_optimizer(hvd, 1e-3, mixed=True, distributed=distributed)
    models.compile_model(model, 1e-3, 0.1, optimizer=opt, jit_compile=jit_compile)
    return model, opt


def test_loss_scaled_step_under_horovod_skips_an_overflow_and_halves_the_scale():
    model, opt = _mixed_model(3, distributed=True)
    assert model.optimizer is opt  # what the checkpoints save and a resume restores
    x, y = _batch(1)
    # the training loop's Horovod callbacks, on the loss-scaled optimizer
    callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                 hvd.callbacks.MetricAverageCallback(),
                 hvd.callbacks.LearningRateWarmupCallback(initial_lr=1e-3, warmup_epochs=1,
                                                          steps_per_epoch=2, verbose=0)]
    hist = model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=callbacks)
    assert np.isfinite(hist.history["loss"][0])
    assert int(opt.iterations) == 2 and float(opt.loss_scale) == INITIAL_SCALE

    # an infinite gradient (an inf sample weight: the forward pass stays finite)
    before = _trainable(model)
    weights = np.ones(len(y), np.float32)
    weights[0] = np.inf
    model.train_on_batch(x, y, sample_weight=weights)
    assert float(opt.loss_scale) == INITIAL_SCALE / 2  # halved...
    assert all(np.array_equal(a, b) for a, b in zip(before, _trainable(model)))  # ...skipped
    assert int(opt.iterations) == 3  # a skipped step still counts

    model.train_on_batch(x, y)  # finite again: applied, scale kept until 2000 good steps
    assert float(opt.loss_scale) == INITIAL_SCALE / 2
    assert not all(np.array_equal(a, b) for a, b in zip(before, _trainable(model)))


WORKER = r'''
import json, os, sys
import numpy as np
import tensorflow as tf
import horovod.tensorflow.keras as hvd
from hierarchy.contracts import model as cmodel
from hierarchy.train import gpu, models

hvd.init()
rank = hvd.rank()
tf.keras.utils.set_random_seed(5)  # the same initial weights on both ranks
models.enable_mixed_precision_if_gpu("on")
model = models.build_model("small_cnn", 4, 32)
opt = gpu.make_optimizer(hvd, 1e-3, mixed=True, distributed=True)
models.compile_model(model, 1e-3, 0.0, optimizer=opt)
rng = np.random.default_rng(100 + rank)  # different pictures on each rank
x = rng.random((4, 32, 32, 3), dtype=np.float32)
y = rng.integers(0, 4, 4).astype(np.int32)
loss_fn = cmodel.SmoothedSparseCrossentropy(0.0)
variables = model.trainable_variables

# the gradients the loss-scaled Horovod optimizer hands to Adam...
with tf.GradientTape() as tape:
    loss = loss_fn(y, model(x, training=False))
averaged = [g.numpy() for g, _ in opt.compute_gradients(loss, variables, tape=tape)]
# ...are the mean over ranks of each rank's own unscaled gradients
with tf.GradientTape() as tape:
    own = tape.gradient(loss_fn(y, model(x, training=False)) * 1024.0, variables)
gathered = [hvd.allgather(tf.expand_dims(g / 1024.0, 0)).numpy() for g in own]
errors = [float(np.max(np.abs(a - g.mean(axis=0))) / (np.max(np.abs(g)) + 1e-12))
          for a, g in zip(averaged, gathered)]

# an overflow on rank 1 only: every rank skips the step and halves its loss scale
before = [v.numpy().copy() for v in variables]
w = np.ones(4, np.float32)
if rank == 1:
    w[0] = np.inf
model.train_on_batch(x, y, sample_weight=w)
skipped = all(np.array_equal(a, v.numpy()) for a, v in zip(before, variables))
scale_after_overflow = float(opt.loss_scale)
model.train_on_batch(x, y)  # then a good step: applied, the same update on both ranks
print("RESULT " + json.dumps({
    "rank": rank, "max_rel_error": max(errors), "skipped": skipped,
    "scale_after_overflow": scale_after_overflow, "scale": float(opt.loss_scale),
    "changed": not all(np.array_equal(a, v.numpy()) for a, v in zip(before, variables)),
    "trainable_checksum": float(sum(np.abs(v.numpy()).sum(dtype=np.float64)
                                    for v in variables))}), flush=True)
'''


def test_two_gloo_workers_average_unscaled_gradients_and_skip_overflows_together(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [str(bin_dir / "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2",
           sys.executable, str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = sorted((json.loads(line.split("RESULT ", 1)[1])
                      for line in proc.stdout.splitlines() if "RESULT " in line),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1], proc.stdout[-3000:]
    for r in results:
        assert r["max_rel_error"] < 1e-4, r  # averaged, then unscaled: the same gradient
        assert r["skipped"] and r["scale_after_overflow"] == INITIAL_SCALE / 2, r
        assert r["changed"] and r["scale"] == INITIAL_SCALE / 2, r
    # different pictures, one averaged update: the same weights on both ranks (BatchNorm's
    # moving statistics are per rank until the loop's SyncNonTrainableCallback)
    assert results[0]["trainable_checksum"] == results[1]["trainable_checksum"]


# ------------------------------------------------------------------------------------- XLA
def test_xla_switch():
    assert gpu.use_xla("off", gpu=True, workers=8, horovod_xla=True) is False
    assert gpu.use_xla("auto", gpu=False, workers=1) is False
    assert gpu.use_xla("auto", gpu=True, workers=1) is True
    assert gpu.use_xla("auto", gpu=True, workers=4, horovod_xla=True) is False  # untested
    assert gpu.use_xla("on", gpu=True, workers=4, horovod_xla=True) is True
    assert gpu.use_xla("auto", gpu=True, workers=4, horovod_xla=False) is False
    assert gpu.use_xla(True, gpu=False, workers=1) is True  # one worker: no allreduce
    with pytest.raises(ValueError, match="only on GPU"):
        gpu.use_xla("on", gpu=False, workers=2)
    with pytest.raises(ValueError, match="HOROVOD_ENABLE_XLA_OPS"):
        gpu.use_xla("on", gpu=True, workers=2, horovod_xla=False)
    with pytest.raises(ValueError, match="auto, on or off"):
        gpu.use_xla("fast", gpu=True, workers=1)


def test_xla_compiles_and_runs_a_loss_scaled_step_on_cpu():
    model, opt = _mixed_model(4, distributed=False, jit_compile=True)
    assert model.jit_compile
    x, y = _batch(2)
    before = _trainable(model)
    hist = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0]) and int(opt.iterations) == 2
    assert not all(np.array_equal(a, b) for a, b in zip(before, _trainable(model)))

    # XLA really compiles the step: with Horovod's allreduce inside, it refuses on CPU,
    # which is why use_xla keeps jit_compile off for several CPU workers
    other = models.build_model("small_cnn", CLASSES, SIZE)
    models.compile_model(other, 1e-3, 0.1, jit_compile=True,
                         optimizer=gpu.make_optimizer(hvd, 1e-3, mixed=True, distributed=True))
    with pytest.raises(tf.errors.InvalidArgumentError, match="HorovodAllreduce"):
        other.train_on_batch(x, y)


# --------------------------------------------------------------------- one GPU per process
class _FakeConfig:
    """tf.config's few calls pin_gpu makes, recorded."""

    def __init__(self, gpus, initialised=None):
        self.gpus, self.initialised, self.calls = list(gpus), initialised, []
        self.experimental = self

    def list_physical_devices(self, kind):
        return self.gpus if kind == "GPU" else []

    def set_visible_devices(self, device, kind):
        if self.initialised is not None:
            raise RuntimeError("Visible devices cannot be modified after being initialized")
        self.calls.append(("visible", device, kind))

    def set_memory_growth(self, device, on):
        self.calls.append(("growth", device, on))

    def get_visible_devices(self, kind):
        return self.initialised or []


def test_each_process_pins_the_gpu_of_its_local_rank():
    four = [f"GPU:{i}" for i in range(4)]
    assert [gpu.pick_gpu(four, r, 4) for r in range(4)] == four
    assert gpu.pick_gpu([], 0, 2) is None  # a CPU host: nothing to pin
    assert gpu.pick_gpu(["GPU:0"], 1, 2) == "GPU:0"  # each task already sees only its own
    with pytest.raises(ValueError, match="3 Horovod processes on this host but 2 GPUs"):
        gpu.pick_gpu(four[:2], 2, 3)
    with pytest.raises(ValueError, match="local rank 4"):
        gpu.pick_gpu(four, 4, 4)

    fake = _FakeConfig(four)
    assert gpu.pin_gpu(2, 4, config=fake) == "GPU:2"
    assert fake.calls == [("visible", "GPU:2", "GPU"), ("growth", "GPU:2", True)]
    assert gpu.pin_gpu(0, 1, config=_FakeConfig([])) is None
    # a second call in the same process is fine for the same GPU, an error for another
    assert gpu.pin_gpu(1, 4, config=_FakeConfig(four, initialised=["GPU:1"])) == "GPU:1"
    with pytest.raises(RuntimeError, match="before anything uses a GPU"):
        gpu.pin_gpu(1, 4, config=_FakeConfig(four, initialised=["GPU:0"]))
    if not ON_GPU:  # this machine's real devices, as the training loop calls it
        hvd.init()
        assert gpu.pin_gpu(hvd.local_rank(), hvd.local_size()) is None


def test_horovod_xla_ops_are_asked_for_before_horovod_loads(monkeypatch):
    env: dict = {}
    monkeypatch.setattr(gpu.os, "environ", env)
    assert gpu.prepare_horovod_xla("off") is False and env == {}
    assert gpu.prepare_horovod_xla("on") is False and env == {}  # horovod already loaded
    monkeypatch.delitem(sys.modules, "horovod.tensorflow")
    assert gpu.prepare_horovod_xla("auto") is False and env == {}  # only `on` opts in
    assert gpu.prepare_horovod_xla("on") is True and env == gpu.HOROVOD_XLA_ENV
