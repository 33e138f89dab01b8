"""Keras callbacks of the training loop: checkpoints and experiment tracking (rank 0 only),
and the averaging of non-trainable state (every rank)."""

from __future__ import annotations

import os
import warnings

import tensorflow as tf

from hierarchy.contracts import storage
from hierarchy.contracts.modelstore import Run

# HDF5 is chosen on purpose (see store.MODEL_FILE); Keras says it is legacy on every save
warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file")


class CheckpointCallback(tf.keras.callbacks.Callback):
    """After every epoch: history.json, a TF checkpoint ``last-<epoch>`` (weights and optimizer
    state: a Keras file cannot hold Horovod's wrapped optimizer), ``best.h5`` when val_loss
    (averaged over workers) improved, and ``state.json`` written last — it is what a resume
    trusts, so a crash mid-save resumes from the previous complete epoch."""

    def __init__(self, run: Run, key: str, history: dict, phase: str):
        super().__init__()
        self.run, self.key, self.history, self.phase = run, key, history, phase
        # TF checkpoints and Keras files are written by path: the store is local or mounted
        self.ckpt_dir = storage.local_path(run.checkpoint_dir(key))
        os.makedirs(self.ckpt_dir, exist_ok=True)

    def _save_state(self, epoch: int) -> str:
        prefix = os.path.join(self.ckpt_dir, f"last-{epoch}")
        tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer).write(prefix)
        return prefix

    def _drop_older(self, keep: str) -> None:
        for name, location, _ in storage.list_dir(self.ckpt_dir):
            if name.startswith("last-") and not name.startswith(os.path.basename(keep) + "."):
                storage.remove(location)

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        previous = list(self.history.get("val_loss", []))
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        storage.write_json_atomic(self.run.history_file(self.key), self.history)
        prefix = self._save_state(epoch + 1)
        if "val_loss" not in logs or not previous or logs["val_loss"] < min(previous):
            with storage.atomic_local_file(self.run.best_file(self.key)) as tmp:
                self.model.save(tmp, include_optimizer=False)
        storage.write_json_atomic(self.run.state_file(self.key),
                                  {"epoch": epoch + 1, "phase": self.phase, "checkpoint": prefix})
        self._drop_older(prefix)


class TrackingCallback(tf.keras.callbacks.Callback):
    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker

    def on_epoch_end(self, epoch, logs=None):
        self.tracker.log_epoch(epoch + 1, logs or {})


class SyncNonTrainableCallback(tf.keras.callbacks.Callback):
    """Average non-trainable variables (BatchNorm moving mean and variance) across workers at
    the end of every epoch. DistributedOptimizer only averages gradients, so each worker's
    moving statistics drift on its own shard; averaged, they describe the whole split and the
    model rank 0 saves is the one every worker holds. A collective: every rank must run it."""

    def on_epoch_end(self, epoch, logs=None):
        import horovod.tensorflow as hvd

        for i, var in enumerate(self.model.non_trainable_variables):
            if var.dtype.is_floating:
                var.assign(hvd.allreduce(var.read_value(), op=hvd.Average,
                                         name=f"sync_non_trainable.{i}"))


class LevelThreeAliases(tf.keras.callbacks.Callback):
    """A multi-level model logs ``probs_accuracy``; copy its level-3 figures to ``accuracy``,
    ``top5`` (and ``val_``) so its history, metrics.json and summary read like any model's.
    Runs before the callbacks that record the logs (they share one dict)."""

    ALIASES = {"accuracy": "probs_accuracy", "top5": "probs_top5"}

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for prefix in ("", "val_"):
            for name, source in self.ALIASES.items():
                if prefix + source in logs:
                    logs[prefix + name] = logs[prefix + source]
