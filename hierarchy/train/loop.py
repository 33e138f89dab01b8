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

from hierarchy.contracts import model as cmodel
from hierarchy.contracts import storage
from hierarchy.train.spec import TrainSpec

log = logging.getLogger(__name__)


def _phases(tcfg: dict) -> list:
    """[(phase, first epoch, end epoch, learning rate)]: two-phase transfer learning when the
    backbone starts from pretrained weights, one 'full' phase when it starts from scratch."""
    lr, epochs = tcfg["learning_rate"], tcfg["epochs"]
    if tcfg["weights"] and tcfg["backbone"] != "small_cnn":
        head = min(tcfg["head_epochs"], epochs)
        return [p for p in (("head", 0, head, lr),
                            ("fine_tune", head, epochs, lr * tcfg["fine_tune_lr_factor"]))
                if p[2] > p[1]]
    return [("full", 0, epochs, lr)]


def train_model(spec: TrainSpec) -> dict:
    """Train (or resume) the model described by ``spec``; returns a summary per worker."""
    if spec.label == "experts":
        from hierarchy.train.experts import train_experts

        return train_experts(spec)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from hierarchy.train import gpu as tgpu

    horovod_xla = tgpu.prepare_horovod_xla(spec.train["xla"])  # before horovod loads
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    from hierarchy.contracts.curation import Exclusion
    from hierarchy.contracts.dataset import VAL, Dataset, images_in
    from hierarchy.train import data as tdata
    from hierarchy.train import models as tmodels
    from hierarchy.train.callbacks import (
        CheckpointCallback,
        LevelThreeAliases,
        SyncNonTrainableCallback,
        TrackingCallback,
    )
    from hierarchy.train.tracking import Tracker

    hvd.init()
    tgpu.pin_gpu(hvd.local_rank(), hvd.local_size())  # one GPU per process, before any use
    rank, size = hvd.rank(), hvd.size()
    tcfg = spec.train
    tf.keras.utils.set_random_seed(tcfg["seed"] + rank)

    # ---- data
    dataset = Dataset(spec.data)
    manifest = dataset.require_complete(["train"])
    taxonomy = dataset.taxonomy()
    label, branch = spec.label, spec.branch
    n_classes = tdata.class_count(taxonomy, label, branch)
    exclusion = Exclusion(spec.data, tcfg["exclude"])
    steps = tdata.steps_per_epoch(manifest, "train", tcfg["batch_size"], size, branch,
                                  left_out=exclusion.count("train", branch))
    val_steps = tdata.steps_per_epoch(manifest, "val", tcfg["batch_size"], size, branch,
                                      left_out=exclusion.count("val", branch))
    has_val = images_in(manifest, VAL, branch) - exclusion.count("val", branch) > 0
    if exclusion.active and rank == 0:
        log.info("%s: curation leaves out %s pictures (train.exclude=%s, reviews, val leakage); "
                 "%d relabelled", spec.key, exclusion.summary()["left_out"], tcfg["exclude"],
                 len(exclusion.relabels))

    # ---- model: resume from the last checkpoint, else build (branch: level-1 backbone)
    policy = tmodels.enable_mixed_precision_if_gpu(tcfg["mixed_precision"])
    jit = tgpu.use_xla(tcfg["xla"], tgpu.has_gpu(), size, horovod_xla)
    run = spec.run
    state = storage.read_json(run.state_file(spec.key), {}) or {}
    initial_epoch = int(state.get("epoch", 0))
    phases = _phases(tcfg)
    if initial_epoch >= tcfg["epochs"]:
        return {"rank": rank, "status": "already trained", "epochs": initial_epoch,
                "checksum": None, "key": spec.key}
    if initial_epoch == 0:
        tmodels.check_weights(tcfg["backbone"], tcfg["weights"])
    multi = label == "levels"
    build = dict(image_size=tcfg["image_size"],
                 weights=tcfg["weights"] if initial_epoch == 0 else None,
                 dropout=tcfg["dropout"], name=spec.key.replace("/", "_"))
    model = (tmodels.build_multi_model(tcfg["backbone"], taxonomy, **build) if multi else
             tmodels.build_model(tcfg["backbone"], n_classes, **build))
    if initial_epoch == 0 and spec.init_from:
        tmodels.copy_backbone(tmodels.load_backbone(spec.init_from), model)

    tracker = Tracker(spec.tracking_uri, spec.experiment, enabled=rank == 0)
    tracker.start(spec, resumed_at=initial_epoch)
    try:
        history: dict = storage.read_json(run.history_file(spec.key), {}) or {}
        # epochs logged after the last complete checkpoint are trained again: drop them
        history = {k: v[:initial_epoch] for k, v in history.items()}
        t0 = time.time()
        preprocess = cmodel.preprocess_for(tcfg["backbone"])
        common = dict(label=label, image_size=tcfg["image_size"], batch_size=tcfg["batch_size"],
                      preprocess=preprocess, branch=branch, taxonomy=taxonomy, rank=rank,
                      world_size=size, reader_workers=tcfg["reader_workers"],
                      exclusion=exclusion, **tdata.input_options(tcfg))
        with tdata.make_dataset(spec.data, "train", tdata.InputOptions(
                training=True, augment=tcfg["augment"], shuffle_buffer=tcfg["shuffle_buffer"],
                seed=tcfg["seed"] + rank, **common)) as train_ds, \
                tdata.make_dataset(spec.data, "val", tdata.InputOptions(
                        training=False, **common)) as val_ds:
            for phase, first, end, lr in phases:
                if end <= initial_epoch:
                    continue
                tmodels.set_phase(model, phase, tcfg["fine_tune_layers"])
                # scaled by workers: the global batch grows with them (Goyal et al. 2017);
                # LossScaleOptimizer(DistributedOptimizer(Adam)) under mixed precision
                # (the order matters: hierarchy.train.gpu.make_optimizer)
                opt = tgpu.make_optimizer(hvd, lr * size, mixed=policy == "mixed_float16",
                                          distributed=size > 1)
                if multi:
                    tmodels.compile_multi_model(model, taxonomy, lr * size,
                                                tcfg["label_smoothing"], tcfg,
                                                optimizer=opt, jit_compile=jit)
                else:
                    tmodels.compile_model(model, lr * size, tcfg["label_smoothing"],
                                          optimizer=opt, jit_compile=jit)
                if initial_epoch > first:
                    # resume inside this phase: weights and optimizer state (moments, step count)
                    # from the last complete epoch; rank 0's copy is then broadcast as usual
                    opt.build(model.trainable_variables)
                    tf.train.Checkpoint(model=model, optimizer=opt).read(
                        state["checkpoint"]).assert_existing_objects_matched()
                callbacks = [
                    hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                    hvd.callbacks.MetricAverageCallback(),
                ]
                if multi:
                    # level 3's figures under the names every model's history uses
                    callbacks.append(LevelThreeAliases())
                if size > 1:
                    # before any checkpoint: every rank then holds (and rank 0 saves) the same model
                    callbacks.append(SyncNonTrainableCallback())
                if phase != "fine_tune" and tcfg["warmup_epochs"] > 0:
                    callbacks.append(hvd.callbacks.LearningRateWarmupCallback(
                        initial_lr=lr * size, warmup_epochs=tcfg["warmup_epochs"],
                        steps_per_epoch=steps, verbose=0))
                if tcfg["early_stopping_patience"] > 0 and has_val:
                    # every worker sees the same averaged val_loss, so all stop together
                    callbacks.append(tf.keras.callbacks.EarlyStopping(
                        monitor="val_loss", patience=tcfg["early_stopping_patience"],
                        restore_best_weights=False))
                if rank == 0:
                    callbacks += [CheckpointCallback(run, spec.key, history, phase),
                                  TrackingCallback(tracker)]
                model.fit(train_ds, steps_per_epoch=steps, epochs=end,
                          initial_epoch=max(first, initial_epoch),
                          validation_data=val_ds if has_val else None,
                          validation_steps=val_steps if has_val else None,
                          callbacks=callbacks, verbose=2 if rank == 0 else 0)
                if model.stop_training:
                    break
                initial_epoch = end

        checksum = tmodels.weights_checksum(model)
        result = {"rank": rank, "size": size, "key": spec.key, "checksum": checksum,
                  "iterations": int(model.optimizer.iterations.numpy()),
                  "policy": policy, "xla": jit, "seconds": round(time.time() - t0, 2)}
        if rank == 0:
            result.update(_finish(model, spec, history, taxonomy, n_classes, steps, tracker,
                                   exclusion.summary()))
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
                    "taxonomy_fingerprint": taxonomy.fingerprint,
                    "label": spec.label, "branch": spec.branch,
                    "curation": curation})
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
            return (f"{key}: " + (result.get("status") or "trained") +
                    ("" if acc is None else f" ({what.format(acc, m.get(before))})") +
                    ("" if result.get("status") else
                     f", {result.get('seconds', 0):.0f} s -> {result.get('model')}"))
    if result.get("status"):
        acc = m.get("val_accuracy")
        return f"{key}: {result['status']}" + ("" if acc is None else
                                                 f" (val accuracy {acc:.3f})")
    acc = m.get("val_accuracy")
    return (f"{key}: val accuracy {acc:.3f}" if acc is not None else f"{key}: trained") + \
        f" (top-5 {m.get('val_top5', float('nan')):.3f}, {m.get('epochs')} epochs, " \
        f"{result.get('seconds', 0):.0f} s) -> {result.get('model')}"
