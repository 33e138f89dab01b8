"""One model's training, as every Horovod worker runs it (or a single process, size 1).

Read top to bottom: data -> model (new, or resumed from the last checkpoint) -> fit per phase
-> save. The learning rate is scaled by the number of workers with a warm-up, gradients are
averaged by ``DistributedOptimizer``, rank 0's initial state is broadcast, metrics are averaged
across workers, and only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from hierarchy.contracts import modelstore, storage, versions
from hierarchy.contracts.dataset import VAL, Dataset
from hierarchy.contracts.settings import Train
from hierarchy.train.spec import HEAD, TrainSpec

log = logging.getLogger(__name__)


def _phases(tcfg: Train) -> list:
    """[(phase, first epoch, end epoch, learning rate)]: two-phase transfer learning when the
    backbone starts from pretrained weights, one 'full' phase when it starts from scratch."""
    lr, epochs = tcfg.learning_rate, tcfg.epochs
    if tcfg.weights and tcfg.backbone != "small_cnn":
        head = min(tcfg.head_epochs, epochs)
        return [p for p in (("head", 0, head, lr),
                            ("fine_tune", head, epochs, lr * tcfg.fine_tune_lr_factor))
                if p[2] > p[1]]
    return [("full", 0, epochs, lr)]


@dataclass
class _Worker:
    """One Horovod worker's fixed facts, for the functions a training is made of."""

    hvd: Any
    spec: TrainSpec
    rank: int
    size: int
    policy: str = "float32"     # the mixed-precision policy in force
    jit: bool = False           # the train step compiled by XLA

    @property
    def tcfg(self) -> dict:
        return self.spec.train

    @property
    def multi(self) -> bool:
        """A multi-level model (levels 1, 2 and 3 on one backbone)."""
        return self.spec.label == "levels"


@dataclass
class _Data:
    """What a model trains on: the classes, the curation, the steps of an epoch."""

    taxonomy: Any
    n_classes: int
    exclusion: Any
    steps: int
    val_steps: int
    has_val: bool


def _training_data(w: _Worker) -> _Data:
    from hierarchy.contracts.curation import Exclusion
    from hierarchy.train import data as tdata

    spec, tcfg, branch = w.spec, w.tcfg, w.spec.branch
    dataset = Dataset(spec.data)
    manifest = dataset.require_complete(["train"])
    taxonomy = dataset.taxonomy()
    exclusion = Exclusion(spec.data, tcfg.exclude)
    steps = tdata.steps_per_epoch(manifest, "train", tcfg.batch_size, w.size, branch,
                                  left_out=exclusion.count("train", branch))
    val_steps = tdata.steps_per_epoch(manifest, "val", tcfg.batch_size, w.size, branch,
                                      left_out=exclusion.count("val", branch))
    has_val = manifest.images(VAL, branch) - exclusion.count("val", branch) > 0
    if exclusion.active and w.rank == 0:
        log.info("%s: curation leaves out %s pictures (train.exclude=%s, reviews, val leakage); "
                 "%d relabelled", spec.key, exclusion.summary()["left_out"], list(tcfg.exclude),
                 len(exclusion.relabels))
    return _Data(taxonomy, tdata.class_count(taxonomy, spec.label, branch), exclusion, steps,
                 val_steps, has_val)


def _new_model(w: _Worker, data: _Data, initial_epoch: int):
    """The model to train: built (a branch model from the level-1 backbone), its weights
    replaced from the checkpoint later when ``initial_epoch`` > 0."""
    from hierarchy.train import models as tmodels

    tcfg, spec = w.tcfg, w.spec
    if initial_epoch == 0:
        tmodels.check_weights(tcfg.backbone, tcfg.weights)
    build = dict(image_size=tcfg.image_size,
                 weights=tcfg.weights if initial_epoch == 0 else None,
                 dropout=tcfg.dropout, name=spec.key.replace("/", "_"))
    model = (tmodels.build_multi_model(tcfg.backbone, data.taxonomy, **build)
             if w.multi else
             tmodels.build_model(tcfg.backbone, data.n_classes, **build))
    if initial_epoch == 0 and spec.init_from:
        tmodels.copy_backbone(tmodels.load_backbone(spec.init_from), model)
    return model


def _compile(w: _Worker, model, data: _Data, lr: float):
    """Compile for one phase; returns the optimizer. The rate is scaled by the workers: the
    global batch grows with them (Goyal et al. 2017); LossScaleOptimizer(DistributedOptimizer
    (Adam)) under mixed precision (the order matters: hierarchy.train.gpu.make_optimizer)."""
    from hierarchy.train import gpu as tgpu
    from hierarchy.train import models as tmodels

    tcfg = w.tcfg
    opt = tgpu.make_optimizer(w.hvd, lr * w.size, mixed=w.policy == "mixed_float16",
                              distributed=w.size > 1)
    if w.multi:
        tmodels.compile_multi_model(model, data.taxonomy, lr * w.size, tcfg.label_smoothing,
                                    tcfg, optimizer=opt, jit_compile=w.jit)
    else:
        tmodels.compile_model(model, lr * w.size, tcfg.label_smoothing, optimizer=opt,
                              jit_compile=w.jit)
    return opt


def _callbacks(w: _Worker, data: _Data, phase: str, lr: float, history: dict, tracker) -> list:
    import tensorflow as tf

    from hierarchy.train.callbacks import (
        CheckpointCallback,
        LevelThreeAliases,
        SyncNonTrainableCallback,
        TrackingCallback,
    )

    hvd, tcfg = w.hvd, w.tcfg
    callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                 hvd.callbacks.MetricAverageCallback()]
    if w.multi:
        callbacks.append(LevelThreeAliases())  # level 3's figures under every model's names
    if w.size > 1:
        # before any checkpoint: every rank then holds (and rank 0 saves) the same model
        callbacks.append(SyncNonTrainableCallback())
    if phase != "fine_tune" and tcfg.warmup_epochs > 0:
        callbacks.append(hvd.callbacks.LearningRateWarmupCallback(
            initial_lr=lr * w.size, warmup_epochs=tcfg.warmup_epochs,
            steps_per_epoch=data.steps, verbose=0))
    if tcfg.early_stopping_patience > 0 and data.has_val:
        # every worker sees the same averaged val_loss, so all stop together
        callbacks.append(tf.keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=tcfg.early_stopping_patience,
            restore_best_weights=False))
    if w.rank == 0:
        callbacks += [CheckpointCallback(w.spec.run, w.spec.key, history, phase),
                      TrackingCallback(tracker)]
    return callbacks


def _fit(w: _Worker, model, data: _Data, state: dict, initial_epoch: int, history: dict,
         tracker) -> None:
    """Every phase left, from ``initial_epoch`` (a resumed run's last complete epoch)."""
    import tensorflow as tf

    from hierarchy.contracts import model as cmodel
    from hierarchy.train import data as tdata
    from hierarchy.train import models as tmodels

    spec, tcfg = w.spec, w.tcfg
    common = dict(label=spec.label, image_size=tcfg.image_size,
                  batch_size=tcfg.batch_size, preprocess=cmodel.preprocess_for(
                      tcfg.backbone), branch=spec.branch, taxonomy=data.taxonomy,
                  rank=w.rank, world_size=w.size, reader_workers=tcfg.reader_workers,
                  exclusion=data.exclusion, **tdata.input_options(tcfg))
    with tdata.make_dataset(spec.data, "train", tdata.InputOptions(
            training=True, augment=tcfg.augment, shuffle_buffer=tcfg.shuffle_buffer,
            seed=tcfg.seed + w.rank, **common)) as train_ds, \
            tdata.make_dataset(spec.data, "val", tdata.InputOptions(
                training=False, **common)) as val_ds:
        for phase, first, end, lr in _phases(tcfg):
            if end <= initial_epoch:
                continue
            tmodels.set_phase(model, phase, tcfg.fine_tune_layers)
            opt = _compile(w, model, data, lr)
            if initial_epoch > first:
                # resume inside this phase: weights and optimizer state (moments, step count)
                # from the last complete epoch; rank 0's copy is then broadcast as usual
                opt.build(model.trainable_variables)
                tf.train.Checkpoint(model=model, optimizer=opt).read(
                    state["checkpoint"]).assert_existing_objects_matched()
            model.fit(train_ds, steps_per_epoch=data.steps, epochs=end,
                      initial_epoch=max(first, initial_epoch),
                      validation_data=val_ds if data.has_val else None,
                      validation_steps=data.val_steps if data.has_val else None,
                      callbacks=_callbacks(w, data, phase, lr, history, tracker),
                      verbose=2 if w.rank == 0 else 0)
            if model.stop_training:
                break
            initial_epoch = end


def train_model(spec: TrainSpec) -> dict:
    """Train (or resume) the model described by ``spec``; returns a summary per worker."""
    if spec.label == HEAD:
        from hierarchy.train.experts import train_head

        return train_head(spec)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from hierarchy.train import gpu as tgpu

    horovod_xla = tgpu.prepare_horovod_xla(spec.train.xla)  # before horovod loads
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    from hierarchy.train import models as tmodels
    from hierarchy.train.tracking import Tracker

    hvd.init()
    tgpu.pin_gpu(hvd.local_rank(), hvd.local_size())  # one GPU per process, before any use
    w = _Worker(hvd, spec, hvd.rank(), hvd.size())
    tcfg = spec.train
    tf.keras.utils.set_random_seed(tcfg.seed + w.rank)
    data = _training_data(w)
    w.policy = tmodels.enable_mixed_precision_if_gpu(tcfg.mixed_precision)
    w.jit = tgpu.use_xla(tcfg.xla, tgpu.has_gpu(), w.size, horovod_xla)
    state = storage.read_json(spec.run.state_file(spec.key), {}) or {}
    initial_epoch = int(state.get("epoch", 0))
    if initial_epoch >= tcfg.epochs:
        return {"rank": w.rank, "status": "already trained", "epochs": initial_epoch,
                "checksum": None, "key": spec.key}
    model = _new_model(w, data, initial_epoch)
    tracker = Tracker(spec.tracking_uri, spec.experiment, enabled=w.rank == 0)
    tracker.start(spec, resumed_at=initial_epoch)
    try:
        history: dict = storage.read_json(spec.run.history_file(spec.key), {}) or {}
        # epochs logged after the last complete checkpoint are trained again: drop them
        history = {k: v[:initial_epoch] for k, v in history.items()}
        t0 = time.time()
        _fit(w, model, data, state, initial_epoch, history, tracker)
        result = {"rank": w.rank, "size": w.size, "key": spec.key,
                  "checksum": tmodels.weights_checksum(model),
                  "iterations": int(model.optimizer.iterations.numpy()),
                  "policy": w.policy, "xla": w.jit, "seconds": round(time.time() - t0, 2)}
        if w.rank == 0:
            result.update(_finish(model, spec, history, data.taxonomy, data.n_classes,
                                  data.steps, tracker, data.exclusion.summary()))
    except BaseException:
        tracker.end(failed=True)  # a run that failed is not left open in MLflow
        raise
    tracker.end()
    return result


def _finish(model, spec: TrainSpec, history, taxonomy, n_classes, steps, tracker,
            curation: dict) -> dict:
    """Rank 0: publish the best checkpoint (by val_loss) as the model, with its metrics."""
    run = spec.run
    best = storage.local_path(run.best_file(spec.key))
    final = run.model_file(spec.key)
    with storage.atomic_local_file(final) as tmp:
        if storage.exists(best):
            shutil.copyfile(best, tmp)
        else:
            model.save(tmp, include_optimizer=False)
    val_loss = history.get("val_loss") or []
    best_epoch = int(min(range(len(val_loss)), key=val_loss.__getitem__)) if val_loss else \
        len(history.get("loss", [])) - 1
    metrics = {k: v[best_epoch] for k, v in history.items() if k.startswith("val_") and v}
    metrics.update({"best_epoch": best_epoch + 1, "epochs": len(history.get("loss", [])),
                    "classes": n_classes, "steps_per_epoch": steps,
                    **versions.recorded(taxonomy, spec.key),
                    "label": spec.label, "branch": spec.branch,
                    "curation": curation,
                    modelstore.DIGEST: storage.file_digest(final)})
    storage.write_json_atomic(run.metrics_file(spec.key), metrics)
    tracker.log_final(metrics, [run.history_file(spec.key), run.metrics_file(spec.key)])
    return {"metrics": metrics, "model": final}


def summary_line(key: str, result: dict) -> str:
    m = result.get("metrics", {})
    # heads over a frozen trunk: their val figure beside the source model's
    for got, before, what in (
            ("val_conditional_accuracy", "val_conditional_accuracy_source",
             "val accuracy within the true group {:.3f}, source model {:.3f}"),
            ("val_product_accuracy", "val_product_accuracy_initial",  # fusion
             "val product accuracy {:.3f}, source model with the geometric mean {:.3f}")):
        if got in m:
            acc = m[got]
            if key == "refit":  # its one group is the whole tree: plain leaf accuracy
                what = what.replace(" within the true group", "")
            return (f"{key}: " + (result.get("status") or "trained") +
                    ("" if acc is None else f" ({what.format(acc, m.get(before))})") +
                    ("" if result.get("status") else
                     f", {result.get('seconds', 0):.0f} s -> {result.get('model')}"))
    if result.get("reused_from"):  # train --from-run: taken over, not trained
        src = result["reused_from"]
        return f"{key}: reused from run {src['run_id']} ({src['model']}), not trained"
    if result.get("status"):
        acc = m.get("val_accuracy")
        return f"{key}: {result['status']}" + ("" if acc is None else
                                                 f" (val accuracy {acc:.3f})")
    acc = m.get("val_accuracy")
    return (f"{key}: val accuracy {acc:.3f}" if acc is not None else f"{key}: trained") + \
        f" (top-5 {m.get('val_top5', float('nan')):.3f}, {m.get('epochs')} epochs, " \
        f"{result.get('seconds', 0):.0f} s) -> {result.get('model')}"
