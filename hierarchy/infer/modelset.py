"""Which trained models a predict strategy needs, found in the model store and checked before
any scoring starts: every model must exist and its outputs stand for the ids the dataset's
taxonomy version has for them (:mod:`hierarchy.contracts.versions`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

from hierarchy.contracts import modelstore, runrecord, versions
from hierarchy.contracts import strategies as declared
from hierarchy.contracts.errors import Refused, UsageError
from hierarchy.contracts.modelstore import ModelStore, Run
from hierarchy.contracts.runrecord import DecisionRule, ModelStatus, RunFileInvalid, RunRecord
from hierarchy.contracts.strategies import AUTO, Spec
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.infer import strategies

log = logging.getLogger(__name__)
IDENTITY = runrecord.IDENTITY  # an uncalibrated hierarchical is multi


class ScoringRefused(Refused, RuntimeError):
    """A run, its models or the dataset cannot be scored (predict, evaluate, serve) or the
    result cannot be published: the message says what and where."""


class ModelMissing(ScoringRefused):
    """A model the strategy needs was never trained (or its files are gone)."""


@dataclass(frozen=True)
class ModelRef:
    key: str          # level1 | flat | multi | experts | branch/<l1>
    path: str         # model.h5 (any filesystem pyarrow knows)
    backbone: str     # decides the pixel preprocessing
    image_size: int


@dataclass(frozen=True)
class ModelSet:
    """The models one strategy (or variant) scores with, found and checked."""

    run_id: str
    strategy: str  # the name the table and run.json write: a declared strategy or a variant
    level1: Optional[ModelRef] = None
    flat: Optional[ModelRef] = None
    # a model with multi-level outputs (level 3, level-1 head, per-group conditional): the
    # multi-level model, or the experts model built over it (hierarchy.contracts.model)
    multilevel: Optional[ModelRef] = None
    # hierarchical: temperature, w, v fitted on val (IDENTITY until evaluate fits them)
    calibration: Dict[str, float] = field(default_factory=lambda: dict(IDENTITY))
    branches: Dict[int, ModelRef] = field(default_factory=dict)
    # branches with >= 2 leaves but no model (no training images): uniform over their leaves
    untrained_branches: List[int] = field(default_factory=list)
    # refit, fusion: the head model (its trunk included); fusion's also weighs each picture
    head: Optional[ModelRef] = None
    # the decision rule evaluate fitted for this strategy, None if none
    decision: Optional[DecisionRule] = None
    base: str = ""  # the declared strategy behind a variant ("": the strategy itself)
    # what a variant sets (hierarchy.contracts.strategies.Spec)
    params: Tuple[Tuple[str, float], ...] = ()

    @property
    def spec(self) -> Spec:
        return Spec(self.strategy, self.base or self.strategy, self.params)

    def refs(self) -> List[ModelRef]:
        return [m for m in (self.level1, self.flat, self.multilevel, self.head) if m] + \
            list(self.branches.values())


def available_strategies(models: str, run_id: str) -> List[str]:
    """The declared strategies this run's models can serve (evaluate scores each of them).
    A model run.json records whose file is gone keeps its strategy here: scoring it then
    names the missing file instead of evaluating the rest as if it had never been trained."""
    return strategies.available(ModelStore(models).run(run_id))


def _spec(name: str, variants: Mapping[str, Mapping], run: Optional[Run] = None) -> Spec:
    """A name as a :class:`Spec`: declared, or a variant the run's evaluation recorded (its
    decision rule was fitted on those parameters) or the configuration names."""
    recorded = (run.read().variants or {}) if run is not None else {}
    spec = declared.spec_of(name, {**variants, **recorded})
    if spec is None:
        raise UsageError(f"strategy {name!r}: expected one of "
                         f"{declared.choices_text({**variants, **recorded})}")
    return spec


def resolve_strategy(models: str, run_id: str, strategy: str,
                     variants: Mapping[str, Mapping] = {}) -> Spec:  # noqa: B006 - read only
    """``auto`` -> the strategy evaluate recommended for the run, or (not evaluated yet) the
    first of :data:`hierarchy.contracts.strategies.PREFERENCE` its models can serve; any
    other name as declared or as a variant; an unknown name is refused (UsageError)."""
    run = ModelStore(models).run(run_id)
    if strategy != AUTO:
        return _spec(strategy, variants, run)
    recommended = run.recommended_strategy()
    if recommended:
        return _spec(recommended, variants, run)
    available = available_strategies(models, run_id)
    for name in declared.PREFERENCE:
        if name in available:
            return Spec(name, name)
    return Spec("two-stage", "two-stage")  # nothing trained: load_modelset names the models


class _Models:
    """:class:`hierarchy.infer.strategies.base.Models` over one run's store."""

    def __init__(self, run: Run, recorded: RunRecord, taxonomy: Taxonomy):
        self.run, self.recorded, self.taxonomy = run, recorded, taxonomy

    def ref(self, key: str) -> ModelRef:
        return _ref(self.run, self.recorded, key, self.taxonomy)

    def calibration(self, key: str) -> Dict[str, float]:
        fitted = self.recorded.calibration
        # (T, w, v) fitted on another model (experts trained after evaluate) would weigh the
        # wrong experts: uncorrected until evaluate fits this one
        if fitted is None or fitted.model != key:
            return dict(IDENTITY)
        return fitted.correction()

    def branches(self, strategy: str) -> Tuple[Dict[int, ModelRef], List[int]]:
        """(a model per branch with two or more leaves, branches without training images)."""
        branches: Dict[int, ModelRef] = {}
        untrained: List[int] = []
        missing = []
        for b in range(self.taxonomy.n_l1):
            if len(self.taxonomy.branch(b)) < 2:
                continue  # P(l3 | b) = 1: nothing was trained, nothing is needed
            entry = self.recorded.model(modelstore.branch_key(b))
            if entry.status == ModelStatus.NO_TRAINING_IMAGES:
                untrained.append(b)
                continue
            try:
                branches[b] = self.ref(modelstore.branch_key(b))
            except ModelMissing:
                missing.append(b)
        if missing:
            ids = ",".join(str(b) for b in missing)
            run_id = self.run.run_id
            raise ScoringRefused(
                f"run {run_id}: {strategy} needs a model per level-1 branch with two or more "
                f"leaves; branches {ids} have none. Train them with `hierarchy train ... "
                f"--run-id {run_id} --level 3 --mode branch --branches {ids}`")
        return branches, untrained


def _ref(run: Run, recorded: RunRecord, key: str, taxonomy: Taxonomy) -> ModelRef:
    # the model's own folder describes it (metrics.json is written beside model.h5); run.json
    # is the run's summary of its models
    metrics = run.metrics(key)
    if not metrics or not run.has_model(key):
        raise ModelMissing(f"run {run.run_id}: model {key} is missing ({run.model_file(key)}); "
                           f"train it with `hierarchy train ... --run-id {run.run_id} "
                           f"{modelstore.train_command(key)}`")
    run.verified_model_file(key)
    why = versions.unusable(taxonomy, key, {**metrics, "taxonomy_fingerprint": metrics.get(
        "taxonomy_fingerprint") or recorded.taxonomy_fingerprint})
    if why:
        raise ScoringRefused(f"run {run.run_id}: {why}: its outputs would mean other "
                             f"categories. Score with a run trained on this dataset's category "
                             f"table, or make one from this run's trunk with `hierarchy train "
                             f"--level 3 --mode refit --from-run {run.run_id} --run-id NEW`")
    cfg = recorded.config.get(key)
    if cfg is None:
        raise RunFileInvalid(f"{run.run_file}: config.{key} is missing — run.json does not say "
                             f"how model {key} was trained; train it again")
    return ModelRef(key=key, path=run.model_file(key), backbone=cfg.backbone,
                    image_size=cfg.image_size)


def load_modelset(models: str, run_id: str, strategy: Union[str, Spec],
                  taxonomy: Taxonomy) -> ModelSet:
    """Every model ``strategy`` (a declared name or a resolved :class:`Spec`) needs, or
    :class:`ScoringRefused` naming what is wrong."""
    run = ModelStore(models).run(run_id)
    spec = strategy if isinstance(strategy, Spec) else _spec(strategy, {})
    impl = strategies.get(spec.strategy)
    if not run.exists():
        raise ScoringRefused(f"{run.path}: no {modelstore.RUN_FILE} — train run {run_id!r} "
                           f"first (hierarchy train --run-id {run_id})")
    recorded = run.read()
    fingerprint = taxonomy.fingerprint
    decision = recorded.rule(spec.name)
    if recorded.taxonomy_fingerprint not in (None, fingerprint) and decision is not None:
        # each model is checked by the ids its outputs stand for (_ref); a rule certified
        # on another version's val is not a promise about this one
        log.warning("run %s was evaluated on taxonomy version %s, the dataset has %s: its "
                    "decision rules are not applied; evaluate it on this dataset to fit them",
                    run_id, recorded.taxonomy_fingerprint[:19], fingerprint[:19])
        decision = None
    found = impl.models(_Models(run, recorded, taxonomy))
    return ModelSet(run_id=run_id, strategy=spec.name, base=spec.strategy, params=spec.params,
                    decision=decision, **found)
