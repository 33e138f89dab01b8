"""Which trained models a predict strategy needs, found in the model store and checked before
any scoring starts: every model must exist and carry the dataset's taxonomy fingerprint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from hierarchy.contracts import modelstore, storage
from hierarchy.contracts.errors import Refused
from hierarchy.contracts.modelstore import ModelStore, Run
from hierarchy.contracts.taxonomy import Taxonomy

STRATEGIES = ("flat", "two-stage", "blend", "multi", "hierarchical", "refit", "fusion")
AUTO = "auto"  # the run's recommended strategy (evaluate records it)
# when a run recommends nothing (not evaluated yet): the first of these its models can serve.
# Heads over a trained trunk first: at equal compute they beat their source (bench/README)
PREFERENCE = ("fusion", "refit", "hierarchical", "multi", "flat", "two-stage", "blend")
# strategies answered by one per-picture model over a frozen trunk (modelstore.HEADS)
HEAD_STRATEGIES = {"refit": modelstore.REFIT, "fusion": modelstore.FUSION}
IDENTITY = {"temperature": 1.0, "w": 0.0, "v": 0.0}  # an uncalibrated hierarchical = multi


class PredictError(Refused, RuntimeError):
    """The job refuses to run or to publish: the message says what and where."""


class ModelMissing(PredictError):
    """A model the strategy needs was never trained (or its files are gone)."""


@dataclass(frozen=True)
class ModelRef:
    key: str          # level1 | flat | multi | experts | branch/<l1>
    path: str         # model.h5 (any filesystem pyarrow knows)
    backbone: str     # decides the pixel preprocessing
    image_size: int


@dataclass(frozen=True)
class ModelSet:
    run_id: str
    strategy: str
    level1: Optional[ModelRef] = None
    flat: Optional[ModelRef] = None
    # multi: the multi-level model; hierarchical: the experts model when the run has one (the
    # source's level 3 and level-1 head plus the experts' conditional), else the multi-level one
    multi: Optional[ModelRef] = None
    # hierarchical: temperature, w, v fitted on val (IDENTITY until evaluate fits them)
    calibration: Dict[str, float] = field(default_factory=lambda: dict(IDENTITY))
    branches: Dict[int, ModelRef] = field(default_factory=dict)
    # branches with >= 2 leaves but no model (no training images): uniform over their leaves
    untrained_branches: List[int] = field(default_factory=list)
    # refit, fusion: the head model (its trunk included); fusion's also weighs each picture
    head: Optional[ModelRef] = None
    # the decision rule evaluate fitted for this strategy (DecisionRule.to_dict), None if none
    decision: Optional[Dict] = None

    def decision_rule(self):
        from hierarchy.infer.decide import DecisionRule

        return None if self.decision is None else DecisionRule.from_dict(self.decision)

    def refs(self) -> List[ModelRef]:
        return [m for m in (self.level1, self.flat, self.multi, self.head) if m] + \
            list(self.branches.values())


def available_strategies(models: str, run_id: str) -> List[str]:
    """The strategies this run's models can serve (evaluate scores each of them)."""
    run = ModelStore(models).run(run_id)
    # a model run.json records whose file is gone keeps its strategy here: scoring it then
    # names the missing file instead of evaluating the rest as if it had never been trained
    out = ["flat"] if run.trained(modelstore.FLAT) else []
    if run.trained(modelstore.LEVEL1) and any(
            run.has_model(modelstore.branch_key(b)) for b in run.branch_ids()):
        out.append("two-stage")
    if len(out) == 2:
        out.append("blend")
    if run.trained(modelstore.MULTI):
        out.append("multi")
    if run.trained(modelstore.MULTI) or run.trained(modelstore.EXPERTS):
        out.append("hierarchical")
    out += [s for s, key in HEAD_STRATEGIES.items() if run.trained(key)]
    return out


def hierarchical_key(run: Run) -> str:
    """The model the ``hierarchical`` strategy reads: the experts when trained."""
    return modelstore.EXPERTS if run.trained(modelstore.EXPERTS) else modelstore.MULTI


def resolve_strategy(models: str, run_id: str, strategy: str) -> str:
    """``auto`` -> the strategy evaluate recommended for the run, or (not evaluated yet) the
    first of :data:`PREFERENCE` its models can serve; any other name as given."""
    if strategy != AUTO:
        return strategy
    recommended = ModelStore(models).run(run_id).recommended_strategy()
    if recommended:
        return recommended
    available = available_strategies(models, run_id)
    for name in PREFERENCE:
        if name in available:
            return name
    return "two-stage"  # nothing trained: load_modelset names the models to train


def _ref(run: Run, recorded: dict, key: str, fingerprint: str) -> ModelRef:
    # the model's own folder describes it (metrics.json is written beside model.h5); run.json
    # is the run's summary of its models
    metrics = storage.read_json(run.metrics_file(key), None) or \
        recorded.get("models", {}).get(key, {}).get("metrics")
    if not metrics or not run.has_model(key):
        raise ModelMissing(f"run {run.run_id}: model {key} is missing ({run.model_file(key)}); "
                           f"train it with `hierarchy train ... --run-id {run.run_id} "
                           f"{modelstore.train_command(key)}`")
    problem = modelstore.model_file_problem(run.model_file(key))
    if problem:
        raise modelstore.ModelDamaged(
            f"{run.model_file(key)}: {problem} — copy it again or train it again: delete its "
            f"folder, then `hierarchy train ... --run-id {run.run_id} "
            f"{modelstore.train_command(key)}`")
    got = metrics.get("taxonomy_fingerprint") or recorded.get("taxonomy_fingerprint")
    if got != fingerprint:
        raise PredictError(
            f"run {run.run_id}: model {key} was trained on taxonomy {str(got)[:19]}, but the "
            f"dataset has {fingerprint[:19]}: its class ids would mean other categories. "
            f"Score with a run trained on this dataset's category table.")
    cfg = recorded.get("config", {}).get(key, {})
    return ModelRef(key=key, path=run.model_file(key),
                    backbone=cfg.get("backbone", "small_cnn"),
                    image_size=int(cfg.get("image_size", 64)))


def load_modelset(models: str, run_id: str, strategy: str, taxonomy: Taxonomy) -> ModelSet:
    """Every model ``strategy`` needs, or :class:`PredictError` naming what is wrong."""
    if strategy not in STRATEGIES:
        raise PredictError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    run = ModelStore(models).run(run_id)
    if not run.exists():
        raise PredictError(f"{run.path}: no {modelstore.RUN_FILE} — train run {run_id!r} "
                           f"first (hierarchy train --run-id {run_id})")
    recorded = run.read()
    fingerprint = taxonomy.fingerprint
    if recorded.get("taxonomy_fingerprint") not in (None, fingerprint):
        raise PredictError(
            f"run {run_id} was trained on taxonomy {recorded['taxonomy_fingerprint'][:19]}, "
            f"but the dataset has {fingerprint[:19]}: refusing to score with another category "
            f"table")
    level1 = flat = multi = None
    calibration = dict(IDENTITY)
    branches: Dict[int, ModelRef] = {}
    untrained: List[int] = []
    if strategy == "multi":
        multi = _ref(run, recorded, modelstore.MULTI, fingerprint)
    if strategy == "hierarchical":
        multi = _ref(run, recorded, hierarchical_key(run), fingerprint)
        fitted = recorded.get("calibration") or {}
        # (T, w, v) fitted on another model (experts trained after evaluate) would weigh the
        # wrong experts: uncorrected until evaluate fits this one
        if fitted.get("model", modelstore.MULTI) == multi.key:
            calibration = {k: float(fitted.get(k, IDENTITY[k])) for k in IDENTITY}
    head = None
    if strategy in HEAD_STRATEGIES:
        head = _ref(run, recorded, HEAD_STRATEGIES[strategy], fingerprint)
    if strategy in ("flat", "blend"):
        flat = _ref(run, recorded, modelstore.FLAT, fingerprint)
    if strategy in ("two-stage", "blend"):
        level1 = _ref(run, recorded, modelstore.LEVEL1, fingerprint)
        missing = []
        for b in range(taxonomy.n_l1):
            if len(taxonomy.branch(b)) < 2:
                continue  # P(l3 | b) = 1: nothing was trained, nothing is needed
            entry = recorded.get("models", {}).get(modelstore.branch_key(b), {})
            if entry.get("status") == "no training images":
                untrained.append(b)
                continue
            try:
                branches[b] = _ref(run, recorded, modelstore.branch_key(b), fingerprint)
            except ModelMissing:
                missing.append(b)
        if missing:
            ids = ",".join(str(b) for b in missing)
            raise PredictError(
                f"run {run_id}: two-stage needs a model per level-1 branch with two or more "
                f"leaves; branches {ids} have none. Train them with `hierarchy train ... "
                f"--run-id {run_id} --level 3 --mode branch --branches {ids}`")
    return ModelSet(run_id=run_id, strategy=strategy, level1=level1, flat=flat, multi=multi,
                    calibration=calibration, branches=branches, untrained_branches=untrained,
                    head=head, decision=(recorded.get("decisions") or {}).get(strategy))
