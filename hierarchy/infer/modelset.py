"""Which trained models a predict strategy needs, found in the model store and checked before
any scoring starts: every model must exist and carry the dataset's taxonomy fingerprint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from hierarchy import storage
from hierarchy.errors import Refused
from hierarchy.taxonomy import Taxonomy
from hierarchy.train import store

STRATEGIES = ("flat", "two-stage", "blend")


class PredictError(Refused, RuntimeError):
    """The job refuses to run or to publish: the message says what and where."""


class ModelMissing(PredictError):
    """A model the strategy needs was never trained (or its files are gone)."""


@dataclass(frozen=True)
class ModelRef:
    key: str          # level1 | flat | branch/<l1>
    path: str         # model.h5 (any filesystem pyarrow knows)
    backbone: str     # decides the pixel preprocessing
    image_size: int


@dataclass(frozen=True)
class ModelSet:
    run_id: str
    strategy: str
    level1: Optional[ModelRef] = None
    flat: Optional[ModelRef] = None
    branches: Dict[int, ModelRef] = field(default_factory=dict)
    # branches with >= 2 leaves but no model (no training images): uniform over their leaves
    untrained_branches: List[int] = field(default_factory=list)

    def refs(self) -> List[ModelRef]:
        return [m for m in (self.level1, self.flat) if m] + list(self.branches.values())


def available_strategies(models: str, run_id: str) -> List[str]:
    """The strategies this run's models can serve (evaluate scores each of them)."""
    fs, root = storage.resolve(models)

    def has(key: str) -> bool:
        return storage.exists(fs, storage.join(root, run_id, *key.split("/"), store.MODEL_FILE))

    branches = [f.base_name for f in storage.list_dir(fs, storage.join(root, run_id, "branch"))]
    out = ["flat"] if has("flat") else []
    if has("level1") and any(has(f"branch/{b}") for b in branches):
        out.append("two-stage")
    if len(out) == 2:
        out.append("blend")
    return out


def _read_run(models: str, run_id: str, required: bool = True) -> Optional[dict]:
    fs, root = storage.resolve(models)
    path = storage.join(root, run_id, "run.json")
    if not storage.exists(fs, path):
        if required:
            raise PredictError(f"{storage.join(models, run_id)}: no run.json — train run "
                               f"{run_id!r} first (hierarchy train --run-id {run_id})")
        return None
    return storage.read_json(fs, path)


def _ref(models: str, run: dict, run_id: str, key: str, fingerprint: str) -> ModelRef:
    fs, root = storage.resolve(models)
    folder = storage.join(root, run_id, *key.split("/"))
    path = storage.join(folder, store.MODEL_FILE)
    # the model's own folder describes it (metrics.json is written beside model.h5); run.json
    # is the run's summary of its models
    metrics_file = storage.join(folder, "metrics.json")
    metrics = storage.read_json(fs, metrics_file) if storage.exists(fs, metrics_file) else \
        run.get("models", {}).get(key, {}).get("metrics")
    if not metrics or not storage.exists(fs, path):
        hint = "--level 1" if key == "level1" else \
            "--level 3 --mode flat" if key == "flat" else \
            f"--level 3 --mode branch --branches {key.split('/')[1]}"
        raise ModelMissing(f"run {run_id}: model {key} is missing ({path}); train it with "
                           f"`hierarchy train ... --run-id {run_id} {hint}`")
    got = metrics.get("taxonomy_fingerprint") or run.get("taxonomy_fingerprint")
    if got != fingerprint:
        raise PredictError(
            f"run {run_id}: model {key} was trained on taxonomy {str(got)[:19]}, but the "
            f"dataset has {fingerprint[:19]}: its class ids would mean other categories. "
            f"Score with a run trained on this dataset's category table.")
    cfg = run.get("config", {}).get(key, {})
    return ModelRef(key=key, path=path,
                    backbone=cfg.get("backbone", "small_cnn"),
                    image_size=int(cfg.get("image_size", 64)))


def load_modelset(models: str, run_id: str, strategy: str, taxonomy: Taxonomy) -> ModelSet:
    """Every model ``strategy`` needs, or :class:`PredictError` naming what is wrong."""
    if strategy not in STRATEGIES:
        raise PredictError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    run = _read_run(models, run_id)
    fingerprint = taxonomy.fingerprint
    if run.get("taxonomy_fingerprint") not in (None, fingerprint):
        raise PredictError(
            f"run {run_id} was trained on taxonomy {run['taxonomy_fingerprint'][:19]}, but the "
            f"dataset has {fingerprint[:19]}: refusing to score with another category table")
    level1 = flat = None
    branches: Dict[int, ModelRef] = {}
    untrained: List[int] = []
    if strategy in ("flat", "blend"):
        flat = _ref(models, run, run_id, "flat", fingerprint)
    if strategy in ("two-stage", "blend"):
        level1 = _ref(models, run, run_id, "level1", fingerprint)
        missing = []
        for b in range(taxonomy.n_l1):
            if len(taxonomy.branch(b)) < 2:
                continue  # P(l3 | b) = 1: nothing was trained, nothing is needed
            entry = run.get("models", {}).get(f"branch/{b}", {})
            if entry.get("status") == "no training images":
                untrained.append(b)
                continue
            try:
                branches[b] = _ref(models, run, run_id, f"branch/{b}", fingerprint)
            except ModelMissing:
                missing.append(b)
        if missing:
            ids = ",".join(str(b) for b in missing)
            raise PredictError(
                f"run {run_id}: two-stage needs a model per level-1 branch with two or more "
                f"leaves; branches {ids} have none. Train them with `hierarchy train ... "
                f"--run-id {run_id} --level 3 --mode branch --branches {ids}`")
    return ModelSet(run_id=run_id, strategy=strategy, level1=level1, flat=flat,
                    branches=branches, untrained_branches=untrained)
