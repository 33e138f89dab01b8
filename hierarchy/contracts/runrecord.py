"""run.json as typed records: what training writes of each model, what evaluate fits (the
hierarchical correction, a decision rule per strategy, the recommendation) and where the run
came from. :class:`hierarchy.contracts.modelstore.Run` is the only reader and writer of the
file; stages get these records, never its dict.

Records keep the keys they do not name and write back only the keys that were present or set
(:class:`hierarchy.contracts.record.Record`), so a run.json written before a field existed
reads and writes unchanged.
"""

from __future__ import annotations

from enum import Enum
from typing import Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict

from hierarchy.contracts import record
from hierarchy.contracts.errors import Refused


class RunFileInvalid(Refused, RuntimeError):
    """run.json is not what this version writes (hand-edited, cut short, another tool's)."""


class Record(record.Record):
    def unset(self, name: str) -> None:
        """Remove a field from what :meth:`to_json` writes (its value back to the default)."""
        setattr(self, name, type(self).model_fields[name].default)
        self.model_fields_set.discard(name)


class ModelStatus(str, Enum):
    """Why a model key has an entry but no trained model of its own (no status: trained)."""

    ALREADY_TRAINED = "already trained"      # a re-run found it finished
    NO_TRAINING_IMAGES = "no training images"  # a branch with leaves but no picture
    SINGLE_LEAF = "single leaf"              # a branch whose P(l3 | b) is 1: nothing to learn


class ModelEntry(Record):
    """What training recorded of one model (its worker's result: rank, epochs, checksum,
    label, branch, tuning, ... kept as they are)."""

    status: Optional[ModelStatus] = None
    metrics: Optional[dict] = None

    @property
    def trained(self) -> bool:
        return self.status is None


class ModelConfig(Record):
    """The ``train:`` section a model was trained with (what scoring feeds it with)."""

    backbone: str
    image_size: int


class Calibration(Record):
    """The hierarchical strategy's (temperature, w, v), fitted on val for ``model``, with its
    val figures and grid (kept as evaluate wrote them)."""

    temperature: float = 1.0
    w: float = 0.0
    v: float = 0.0
    model: str = "multi"
    products: int = 0

    def correction(self) -> Dict[str, float]:
        return {"temperature": self.temperature, "w": self.w, "v": self.v}


IDENTITY = Calibration().correction()  # an uncorrected hierarchical is multi


class DecisionRule(BaseModel):
    """What evaluate fitted for one strategy and predict applies; ``threshold`` None files
    nothing (``reason`` says why); ``certifier``: the ``decide.rule`` that certified it, so
    what it promises (a rule recorded before there was a choice was a fixed sequence). Every
    field is always written."""

    model_config = ConfigDict(frozen=True)

    target: float
    levels: Tuple[int, ...]
    confidence: float
    temperature: float
    threshold: Optional[float]
    reason: str = ""
    certifier: str = "fixed-sequence"

    def to_dict(self) -> dict:
        return {**self.model_dump(mode="json"), "levels": list(self.levels)}

    @classmethod
    def from_dict(cls, d: dict) -> DecisionRule:
        return cls.model_validate(d)


class Lineage(Record):
    """Where the run's models came from: the dataset (its path, the manifest's ``updated``
    when training read it, its splits' counts)."""

    path: Optional[str] = None
    manifest_updated: Optional[str] = None
    splits: Optional[dict] = None


class FromRun(Record):
    """The run whose frozen trunk this run's heads sit on (``train --from-run``): its id, its
    taxonomy version and the model whose trunk was reused."""

    run_id: str
    taxonomy_fingerprint: Optional[str] = None
    model: Optional[str] = None


class RunRecord(Record):
    """The whole of run.json. ``taxonomy_fingerprint`` is the run's taxonomy version
    (:mod:`hierarchy.contracts.versions`)."""

    run_id: Optional[str] = None
    taxonomy_fingerprint: Optional[str] = None
    dataset: Optional[Lineage] = None
    from_run: Optional[FromRun] = None
    updated: Optional[str] = None
    models: Dict[str, ModelEntry] = {}
    config: Dict[str, ModelConfig] = {}
    calibration: Optional[Calibration] = None
    decisions: Optional[Dict[str, DecisionRule]] = None
    recommended_strategy: Optional[str] = None
    strategy_scores: Optional[Dict[str, Optional[float]]] = None
    recommendation: Optional[dict] = None
    # the variants evaluate scored ({name: {strategy, params}}, hierarchy.contracts.strategies)
    variants: Optional[Dict[str, dict]] = None

    @classmethod
    def parse(cls, obj, source: str) -> RunRecord:
        return cls.validated(obj, source, RunFileInvalid,
                         "not a run.json this version can read; train the run again or "
                         "restore the file")

    def model(self, key: str) -> ModelEntry:
        """What training recorded of model ``key`` (an empty entry when nothing)."""
        return self.models.get(key) or ModelEntry()

    def rule(self, strategy: str) -> Optional[DecisionRule]:
        return (self.decisions or {}).get(strategy)

    def to_json(self) -> dict:
        out = super().to_json()
        if self.decisions is not None:  # a rule writes every field, defaults included
            out["decisions"] = {s: r.to_dict() for s, r in self.decisions.items()}
        return out

    def trained_keys(self) -> List[str]:
        return [k for k, m in self.models.items() if m.trained]
