"""The GPU path of training: one Horovod process per GPU, XLA, loss scaling under Horovod.

Tested on CPU as far as a CPU allows (tests/test_gpu_path.py); README "GPU cluster" says what
only a GPU run shows. Three rules, each a small function the tests call directly:

* **One process per GPU.** ``--np`` is the number of GPUs; each process sees only the GPU of
  its Horovod *local* rank (rank within its host), with memory growth on, and both are set
  right after ``hvd.init()``, before anything touches a GPU (:func:`pin_gpu`).
* **Loss scaling outside Horovod.** Under the ``mixed_float16`` policy the optimizer is
  ``LossScaleOptimizer(DistributedOptimizer(Adam))`` (:func:`make_optimizer`), see there why.
* **XLA only where it compiles.** ``train.xla`` sets ``jit_compile`` of ``model.compile``;
  Horovod's allreduce has an XLA kernel on GPU only (:func:`use_xla`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional, Sequence, Union

log = logging.getLogger(__name__)

SWITCHES = ("auto", "on", "off")
# Horovod registers the XLA lowering of its allreduce when its library loads, only when these
# are set (horovod docs/xla.rst); the XLA kernel exists in GPU builds only (xla_mpi_ops.cc).
HOROVOD_XLA_ENV = {"HOROVOD_ENABLE_XLA_OPS": "1", "HOROVOD_ENABLE_ASYNC_COMPLETION": "1"}


def switch(value: Union[str, bool], key: str) -> str:
    """auto | on | off from a config value (YAML 1.1 reads a bare on/off as a boolean)."""
    if value is True:
        return "on"
    if value is False:
        return "off"
    if value not in SWITCHES:
        raise ValueError(f"{key} must be auto, on or off, got {value!r}")
    return value


def has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


# ------------------------------------------------------------------ one process per GPU
def pick_gpu(gpus: Sequence[Any], local_rank: int, local_size: int) -> Optional[Any]:
    """The GPU of the process of Horovod local rank ``local_rank`` among ``local_size``
    processes on its host (None on a host without GPUs).

    One process per GPU: process i takes GPU i. A host that shows each process exactly one
    GPU (a scheduler that sets CUDA_VISIBLE_DEVICES per task) leaves nothing to choose.
    More processes than GPUs is a launch error (``--np`` must be the number of GPUs)."""
    if not gpus:
        return None
    if not 0 <= local_rank < local_size:
        raise ValueError(f"local rank {local_rank} is not in [0, {local_size})")
    if len(gpus) == 1:
        return gpus[0]
    if local_size > len(gpus):
        raise ValueError(
            f"{local_size} Horovod processes on this host but {len(gpus)} GPUs: run one "
            f"process per GPU (--np = GPUs, horovodrun -H host:{len(gpus)})")
    return gpus[local_rank]


def pin_gpu(local_rank: int, local_size: int, gpus: Optional[Sequence[Any]] = None,
            config: Any = None) -> Optional[Any]:
    """Make only this process's GPU visible, with memory growth (TensorFlow would otherwise
    reserve every GPU's memory in every process). Call right after ``hvd.init()``: both
    settings are refused once TensorFlow has initialised its GPUs. ``gpus`` and ``config``
    (``tf.config``) are parameters for the tests; returns the pinned device or None."""
    if config is None:
        import tensorflow as tf

        config = tf.config
    if gpus is None:
        gpus = config.list_physical_devices("GPU")
    gpu = pick_gpu(gpus, local_rank, local_size)
    if gpu is None:
        return None
    try:
        config.set_visible_devices(gpu, "GPU")
        config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as exc:
        # already initialised: fine when an earlier call in this process pinned the same GPU
        visible = list(config.get_visible_devices("GPU"))
        if visible != [gpu]:
            raise RuntimeError(
                f"cannot pin {gpu} to local rank {local_rank}: TensorFlow already set up "
                f"{visible} ({exc}); pin_gpu must run before anything uses a GPU") from exc
    return gpu


# ------------------------------------------------------------------------------------- XLA
def prepare_horovod_xla(setting: Union[str, bool]) -> bool:
    """Before the first ``import horovod``: ask Horovod to register its XLA allreduce (GPU
    builds) unless XLA is off. Returns whether Horovod can have it (False when Horovod was
    imported earlier without the variables: too late to register)."""
    if switch(setting, "train.xla") != "on":
        # only an explicit `on` opts into Horovod's XLA kernels and async completion: they
        # change how every GPU allreduce completes, and no GPU run here has tried them
        return False
    if "horovod.tensorflow" not in sys.modules:
        for key, value in HOROVOD_XLA_ENV.items():
            os.environ.setdefault(key, value)
    return all(os.environ.get(k) == v for k, v in HOROVOD_XLA_ENV.items())


def use_xla(setting: Union[str, bool], gpu: bool, workers: int,
            horovod_xla: bool = False) -> bool:
    """``jit_compile`` for ``model.compile``: ``auto`` is on with a GPU and one worker,
    ``on`` wherever it can compile.

    With more than one worker the train step holds Horovod's allreduce, which XLA can compile
    only through Horovod's XLA kernel: GPU builds, registered at import when
    ``HOROVOD_ENABLE_XLA_OPS=1`` (:func:`prepare_horovod_xla`). Without it, ``auto`` stays
    off and ``on`` is refused before training starts (XLA would fail at the first step with
    "No registered 'HorovodAllreduce' OpKernel for XLA_CPU_JIT"). ``auto`` never takes that
    untested route with several workers: ``on`` does. One worker has no allreduce
    (:func:`make_optimizer` does not wrap the optimizer), so XLA compiles on CPU too."""
    setting = switch(setting, "train.xla")
    if setting == "off":
        return False
    allreduce_ok = workers == 1 or (gpu and horovod_xla)
    if setting == "auto":
        return gpu and workers == 1
    if not allreduce_ok:
        why = ("Horovod's XLA allreduce exists only on GPU" if not gpu else
               "Horovod was imported before HOROVOD_ENABLE_XLA_OPS=1 and "
               "HOROVOD_ENABLE_ASYNC_COMPLETION=1 were set: export them for the workers")
        raise ValueError(f"train.xla=on with {workers} workers: {why}; set train.xla=auto "
                         "(XLA where it compiles) or off")
    return True


# --------------------------------------------------------------------------- the optimizer
def make_optimizer(hvd, learning_rate: float, mixed: bool, distributed: bool):
    """Adam, averaged across workers by Horovod (``distributed``), loss-scaled under mixed
    precision (``mixed``).

    The order is ``LossScaleOptimizer(DistributedOptimizer(Adam))``, never the reverse:

    * Keras 2.15 ``LossScaleOptimizer.compute_gradients`` scales the loss, asks its inner
      optimizer for the gradients — Horovod's ``compute_gradients``, which allreduces them —
      and only then divides by the loss scale. So Horovod averages the *scaled* gradients
      and every worker unscales the same average: identical to averaging unscaled gradients
      (a common factor), and the order a Horovod maintainer asked for when the two were
      first combined (review of horovod/horovod#1692: allreduce, then unscale). Scaled
      values also survive ``hvd.Compression.fp16`` where small unscaled ones flush to 0.
    * ``apply_gradients`` then checks the averaged gradients for inf/NaN. An overflow on any
      worker reaches every worker through the allreduce (inf + x = inf), so all of them skip
      the step and halve the loss scale together: the loss scale stays identical everywhere.
    * The reverse, ``DistributedOptimizer(LossScaleOptimizer(Adam))``, does not even build
      with horovod 0.28.1: Horovod re-creates the optimizer from its config through a
      subclass whose ``__init__`` takes keyword arguments only, and LossScaleOptimizer's
      ``from_config`` passes the inner optimizer positionally (TypeError; compare
      horovod/horovod#2989, #3807).

    Keras' ``compile`` would wrap a mixed-precision model's optimizer itself; wrapping it
    here makes the object compiled, checkpointed and restored on resume the same one.
    One worker (``distributed=False``) needs no allreduce: nothing to average, and a train
    step without Horovod ops compiles under XLA on any device."""
    import tensorflow as tf

    opt = tf.keras.optimizers.Adam(learning_rate)
    if distributed:
        opt = hvd.DistributedOptimizer(opt)
    if mixed:
        opt = tf.keras.mixed_precision.LossScaleOptimizer(opt)
    return opt
