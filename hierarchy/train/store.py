"""The model store: ``<models>/<run_id>/`` with ``level1/``, ``flat/``, ``branch/<l1>/`` and
``run.json`` (DESIGN.md, "Model store"). Models live on a filesystem every worker sees
(local disk, NFS, a mounted bucket): Keras writes them with plain file I/O."""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Optional

from hierarchy.errors import Refused


class RunMismatch(Refused, RuntimeError):
    """A model would join a run it does not belong to (another taxonomy)."""


MODEL_FILE = "model.h5"  # HDF5: the .keras format cannot leave out Horovod's optimizer
STATE_FILE = "state.json"


def run_dir(models: str, run_id: str) -> str:
    return os.path.join(models, run_id)


def model_key(level: int, mode: Optional[str], branch: Optional[int]) -> str:
    if level == 1:
        return "level1"
    if mode == "flat":
        return "flat"
    return f"branch/{branch}"


def model_dir(models: str, run_id: str, key: str) -> str:
    return os.path.join(run_dir(models, run_id), *key.split("/"))


def checkpoint_dir(models: str, run_id: str, key: str) -> str:
    return os.path.join(model_dir(models, run_id, key), "checkpoints")


def write_json(path: str, obj) -> None:
    """Atomic: a crash never leaves half a JSON file that a resume would trip over."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as fh:
        return json.load(fh)


def update_run(models: str, run_id: str, *, config: dict, fingerprint: str, data: str,
               manifest: dict, key: str, result: dict) -> dict:
    """Merge one trained model into run.json (level-1 and level-3 runs share a run id)."""
    path = os.path.join(run_dir(models, run_id), "run.json")
    run = read_json(path, {}) or {}
    if run.get("taxonomy_fingerprint") not in (None, fingerprint):
        raise RunMismatch(
            f"{path}: run {run_id} was trained on taxonomy {run['taxonomy_fingerprint'][:19]}, "
            f"this dataset has {fingerprint[:19]}; use another --run-id"
        )
    run.update({
        "run_id": run_id,
        "taxonomy_fingerprint": fingerprint,
        "dataset": {"path": os.path.abspath(data) if "://" not in data else data,
                    "manifest_updated": manifest.get("updated"),
                    "splits": manifest.get("splits")},
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    })
    run.setdefault("models", {})[key] = result
    run.setdefault("config", {})[key] = config
    write_json(path, run)
    return run
