"""What one Horovod worker receives: everything it needs to train one model, and nothing
it would have to look up on the driver. Frozen and picklable, so ``horovod.spark.run`` can
ship it to Spark tasks and a resumed run rebuilds the same one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hierarchy.contracts import modelstore
from hierarchy.contracts.settings import Train, Tune

# what a head over init_from's cached trunk features trains on (--mode experts, refit and
# fusion: hierarchy.train.experts). Its value is what metrics.json, run.json and MLflow's
# "label" tag record for those models, and stays so that they do not change.
HEAD = "experts"
LABELS = ("l1", "l3", "branch", "levels", HEAD)


@dataclass(frozen=True)
class TrainSpec:
    data: str                      # dataset folder (path or URL)
    models: str                    # model store root (a filesystem every worker sees)
    run_id: str
    key: str                       # level1 | flat | multi | branch/<l1> | a head's mode
                                   # (experts | refit | fusion)
    label: str                     # l1 | l3 | branch (branch-local level-3 ids) | levels |
                                   # HEAD (a head over init_from's cached trunk features)
    level: int                     # 1 or 3
    train: Train                   # the validated `train:` config section
    tracking_uri: str              # MLflow
    experiment: str
    branch: Optional[int] = None   # the level-1 branch of a branch model
    init_from: Optional[str] = None  # a model whose backbone starts this one (branch models),
                                     # or whose trunk a head sits on
    tune: Optional[Tune] = None    # refit and fusion heads: the search of their knobs
    from_run: Optional[str] = None  # a head over another run's trunk (train --from-run):
                                    # its rows are carried to this taxonomy by leaf id

    def __post_init__(self):
        if self.label not in LABELS:
            raise ValueError(f"label {self.label!r}: one of {', '.join(LABELS)}")
        if (self.label == "branch") != (self.branch is not None):
            raise ValueError("a branch model, and only one, has a branch")

    def config(self) -> dict:
        """What run.json and MLflow record of this model's configuration."""
        recorded = self.train.model_dump(mode="json")
        if self.tune is not None:
            recorded["tune"] = self.tune.model_dump(mode="json")
        return recorded

    @property
    def run(self) -> modelstore.Run:
        return modelstore.ModelStore(self.models).run(self.run_id)
