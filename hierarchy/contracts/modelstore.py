"""The model store: the contract between training and prediction.

```
<models>/
  <run_id>/
    run.json                 config of each model, taxonomy fingerprint, dataset manifest;
                             evaluate adds the fitted calibration and the recommended strategy
    taxonomy.json            the category table the run was trained on (what a server that
                             has no dataset answers names from)
    level1/                  the level-1 (49-class) model
    flat/                    the flat level-3 model
    multi/                   the multi-level model (levels 1, 2, 3 on one backbone)
    experts/                 per-branch expert heads over the multi (or flat) model's
                             frozen trunk, in one model with that model's own heads
      features/              the trunk's features of train and val, split=*/l1=*/ (Parquet)
    refit/                   the flat model's level-3 head refit over its frozen trunk
    fusion/                  a per-picture head and view weight over a frozen trunk, trained
                             on whole products (a product's pictures fused by the weights)
    branch/<l1 id>/          one level-3 model per level-1 branch
      model.h5               the published model (HDF5: see MODEL_FILE)
      history.json           metrics per epoch
      metrics.json           validation metrics of the best epoch
      checkpoints/           last-<epoch>.* (weights + optimizer), best.h5, state.json
  mlruns/                    the default MLflow file store
```

A model is named by its *key*: ``level1``, ``flat``, ``multi``, ``experts``, ``refit``,
``fusion`` or ``branch/<l1 id>``. Keras
writes models with plain file I/O, so training needs the store on a filesystem every worker
sees (local disk, NFS, a mounted bucket); prediction also reads models from HDFS/S3 URLs
(copied locally once per worker). Everything else goes through :mod:`hierarchy.contracts.storage`.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

from hierarchy.contracts import storage
from hierarchy.contracts.errors import Refused, UsageError
from hierarchy.contracts.manifest import Manifest
from hierarchy.contracts.runrecord import (
    Calibration,
    DecisionRule,
    FromRun,
    Lineage,
    ModelConfig,
    ModelEntry,
    RunFileInvalid,
    RunRecord,
)
from hierarchy.contracts.taxonomy import Taxonomy

LEVEL1, FLAT, MULTI, BRANCH = "level1", "flat", "multi", "branch"
EXPERTS, REFIT, FUSION = "experts", "refit", "fusion"
MODES = (FLAT, BRANCH, MULTI, EXPERTS, REFIT, FUSION)  # `hierarchy train --level 3 --mode ...`
SINGLE = (FLAT, MULTI, EXPERTS, REFIT, FUSION)  # level-3 modes that make one model, keyed by mode
HEADS = (EXPERTS, REFIT, FUSION)  # heads trained over another model's cached trunk features
RUN_FILE = "run.json"
TAXONOMY_FILE = "taxonomy.json"
MODEL_FILE = "model.h5"  # HDF5: the .keras format cannot leave out Horovod's optimizer
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"
BEST_FILE = "best.h5"
STATE_FILE = "state.json"
MLRUNS = "mlruns"


class ModelDamaged(Refused, RuntimeError):
    """A saved model file that cannot be whole: not HDF5, or shorter than its header says."""


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def model_file_problem(url: str) -> Optional[str]:
    """What makes a saved model unloadable, read from its first bytes and its size (any
    filesystem, no h5py): not an HDF5 file, or fewer bytes than the end-of-file address its
    superblock records (a copy or a save cut short: h5py would fail minutes later, inside a
    Spark task). None when it looks whole."""
    size = storage.file_info(url).size
    head = storage.read_head(url, 96)
    if not head.startswith(HDF5_SIGNATURE):
        return "not an HDF5 file (Keras saves the pipeline's models as .h5)"
    if len(head) < 24:
        return f"{size} bytes, not even a whole HDF5 superblock: truncated"
    version = head[8]
    if version in (0, 1):    # base, free-space and then end-of-file addresses follow the
        width = head[13]     # fixed fields (4 more bytes in version 1)
        at = 24 + (4 if version == 1 else 0) + 2 * width
    elif version in (2, 3):  # base, superblock extension, then end-of-file address
        width = head[9]
        at = 12 + 2 * width
    else:
        return None
    eof = int.from_bytes(head[at:at + width], "little")
    if len(head) < at + width or size < eof:
        return f"{size} bytes where its header says {eof}: truncated"
    return None


DIGEST = "sha256"  # metrics.json (and run.json's copy): the published model file's digest


_DIGESTS: Dict[tuple, str] = {}


def digest_problem(url: str, expected: Optional[str]) -> Optional[str]:
    """Why a model file is not the one training published: its bytes' digest differs from
    the one recorded when it was written (a copy damaged at the same size, a file swapped).
    None when they agree or nothing was recorded (runs trained before digests were kept)."""
    if not expected:
        return None
    info = storage.file_info(url)
    stamp = (url, info.size, info.mtime_ns)  # evaluate checks a model once per strategy
    got = _DIGESTS.get(stamp) or _DIGESTS.setdefault(stamp, storage.file_digest(url))
    if got != expected:
        return (f"content digest {got[:19]}... is not the {expected[:19]}... recorded when it "
                f"was written: the file changed since")
    return None


class RunMismatch(Refused, RuntimeError):
    """A model would join a run it does not belong to (another taxonomy)."""


def branch_key(branch: int) -> str:
    return f"{BRANCH}/{int(branch)}"


def model_key(level: int, mode: Optional[str] = None, branch: Optional[int] = None) -> str:
    """``level1``, one of :data:`SINGLE` or ``branch/<id>``: how a `hierarchy train` call
    names its model."""
    if level == 1:
        return LEVEL1
    if mode in SINGLE:
        return mode
    if branch is None:
        raise ValueError("a branch model needs its level-1 id")
    return branch_key(branch)


def branch_of(key: str) -> Optional[int]:
    """The level-1 id of a ``branch/<id>`` key, None for the others."""
    head, _, tail = key.partition("/")
    return int(tail) if head == BRANCH else None


def train_command(key: str) -> str:
    """The `hierarchy train` arguments that make the model ``key``."""
    if key == LEVEL1:
        return "--level 1"
    if key in SINGLE:
        return f"--level 3 --mode {key}"
    return f"--level 3 --mode branch --branches {branch_of(key)}"


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_id(run_id: str, flag: str = "--run-id") -> str:
    """A run id names a folder and a table partition: letters, digits, '.', '_', '-'."""
    if not RUN_ID.fullmatch(run_id or ""):
        raise UsageError(f"{flag} {run_id!r}: use letters, digits, '.', '_' and '-' (at "
                         f"most 128, starting with a letter or digit)")
    return run_id


@dataclass(frozen=True)
class Run:
    """One run's folder: the models trained with the same ``--run-id``."""

    store: str
    run_id: str

    def __post_init__(self) -> None:
        check_run_id(self.run_id)

    @property
    def path(self) -> str:
        return storage.join(self.store, self.run_id)

    @property
    def run_file(self) -> str:
        return storage.join(self.path, RUN_FILE)

    def model_dir(self, key: str) -> str:
        return storage.join(self.path, *key.split("/"))

    def model_file(self, key: str) -> str:
        return storage.join(self.model_dir(key), MODEL_FILE)

    def history_file(self, key: str) -> str:
        return storage.join(self.model_dir(key), HISTORY_FILE)

    def metrics_file(self, key: str) -> str:
        return storage.join(self.model_dir(key), METRICS_FILE)

    def checkpoint_dir(self, key: str) -> str:
        return storage.join(self.model_dir(key), CHECKPOINTS)

    def best_file(self, key: str) -> str:
        return storage.join(self.checkpoint_dir(key), BEST_FILE)

    def state_file(self, key: str) -> str:
        return storage.join(self.checkpoint_dir(key), STATE_FILE)

    # ---------------------------------------------------------------- run.json
    def read(self) -> RunRecord:
        """run.json as its typed record (:mod:`hierarchy.contracts.runrecord`), empty for a
        run nothing was recorded in yet."""
        try:
            # no `or {}`: a run.json of [] or null is damage, not a run nothing was recorded in
            raw = storage.read_json(self.run_file, {})
        except ValueError as exc:  # empty, cut short, not JSON
            raise RunFileInvalid(f"{self.run_file}: not JSON ({exc}) — restore the file or "
                                 f"train the run again") from None
        return RunRecord.parse(raw, self.run_file)

    def _write(self, run: RunRecord) -> None:
        run.updated = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        storage.write_json_atomic(self.run_file, run.to_json())

    def exists(self) -> bool:
        return storage.exists(self.run_file)

    def check_taxonomy(self, fingerprint: str) -> None:
        """Refuse a dataset of another taxonomy than the run's (before anything trains)."""
        got = self.read().taxonomy_fingerprint
        if got not in (None, fingerprint):
            raise RunMismatch(
                f"{self.run_file}: run {self.run_id} was trained on taxonomy {got[:19]}, this "
                f"dataset has {fingerprint[:19]}; use another --run-id")

    def record(self, *, key: str, config: dict, fingerprint: str, data: str, manifest: Manifest,
               result: dict, from_run: Optional[FromRun] = None) -> RunRecord:
        """Merge one trained model into run.json (level-1 and level-3 models share a run);
        ``from_run``: the run whose trunk the model sits on, when it is another one."""
        self.check_taxonomy(fingerprint)
        run = self.read()
        if from_run is not None:
            run.from_run = from_run
        run.run_id = self.run_id
        run.taxonomy_fingerprint = fingerprint
        run.dataset = Lineage(path=data if storage.is_remote(data) else storage.local_path(data),
                              manifest_updated=manifest.updated,
                              splits=manifest.splits_json())
        run.models = {**run.models, key: ModelEntry.model_validate(result)}
        run.config = {**run.config, key: ModelConfig.model_validate(config)}
        # a decision rule certifies the distributions of the models it was fitted on: a model
        # trained since makes every rule stale until evaluate fits them again
        run.unset("decisions")
        self._write(run)
        return run

    def record_evaluation(self, *, calibration: Optional[dict] = None,
                          recommended: Optional[str] = None, scores: Optional[dict] = None,
                          decisions: Optional[Dict[str, DecisionRule]] = None,
                          recommendation: Optional[dict] = None,
                          variants: Optional[dict] = None) -> RunRecord:
        """What evaluate fitted and chose on the val split: the ``hierarchical`` strategy's
        ``calibration`` (temperature, w, v, the grid and its val figures), the decision rule
        of each strategy (``decisions``) and the ``recommended_strategy`` that predict uses
        unless told otherwise, with why (``recommendation``: the held-out figures)."""
        run = self.read()
        if calibration is not None:
            run.calibration = Calibration.model_validate(calibration)
        if decisions is not None:
            run.decisions = dict(decisions)
        if recommended is not None:
            run.recommended_strategy = recommended
            run.strategy_scores = scores or {}
            run.recommendation = recommendation or {}
            # the variants evaluated ({name: {strategy, params}}): their rules were fitted on
            # these parameters, whatever the configuration says later
            if variants:
                run.variants = variants
            else:
                run.unset("variants")
        self._write(run)
        return run

    def save_taxonomy(self, taxonomy) -> None:
        """Keep the run's category table beside its models (written once per run)."""
        path = storage.join(self.path, TAXONOMY_FILE)
        if not storage.exists(path):
            storage.write_text_atomic(path, taxonomy.to_json())

    def taxonomy(self):
        """The run's category table: its own copy, else its dataset's (runs trained before
        the copy was kept). RunMismatch when neither exists or it is not the run's."""

        recorded = self.read()
        if recorded.taxonomy_fingerprint is None:
            raise RunMismatch(f"{self.run_file}: records no taxonomy (no model was trained in "
                              f"run {self.run_id}, or the file was emptied) — train it again")
        own = storage.join(self.path, TAXONOMY_FILE)
        dataset = recorded.dataset.path if recorded.dataset else None
        for path in [own] + ([storage.join(dataset, TAXONOMY_FILE)] if dataset else []):
            if storage.exists(path):
                taxonomy = Taxonomy.from_json(storage.read_text(path), source=path)
                if taxonomy.fingerprint != recorded.taxonomy_fingerprint:
                    raise RunMismatch(f"{path}: taxonomy {taxonomy.fingerprint[:19]} is not "
                                      f"the one run {self.run_id} was trained on")
                return taxonomy
        raise RunMismatch(f"run {self.run_id}: no {TAXONOMY_FILE} in {self.path} nor in its "
                          f"dataset ({dataset}); train or evaluate it again to record one")

    def calibration(self) -> Optional[Calibration]:
        return self.read().calibration

    def recommended_strategy(self) -> Optional[str]:
        return self.read().recommended_strategy

    def recorded(self, key: str) -> ModelEntry:
        """What run.json holds of model ``key`` (an empty entry when nothing)."""
        return self.read().model(key)

    # ---------------------------------------------------------------- models present
    def metrics(self, key: str) -> Optional[dict]:
        """The model's own metrics.json (written beside model.h5), else run.json's copy."""
        try:
            own = storage.read_json(self.metrics_file(key), None)
        except ValueError:
            raise ModelDamaged(f"{self.metrics_file(key)}: not JSON — train model {key} "
                               f"again (`hierarchy train ... --run-id {self.run_id} "
                               f"{train_command(key)}`)") from None
        return own if isinstance(own, dict) else self.read().model(key).metrics

    def verified_model_file(self, key: str) -> str:
        """The model's file, refused (:class:`ModelDamaged`, naming it) when it cannot be the
        one training published: cut short, not HDF5, or other bytes than its recorded digest."""
        url = self.model_file(key)
        problem = model_file_problem(url) or digest_problem(
            url, (self.metrics(key) or {}).get(DIGEST))
        if problem:
            raise ModelDamaged(f"{url}: {problem} — copy it again or train it again: delete "
                               f"its folder, then `hierarchy train ... --run-id {self.run_id} "
                               f"{train_command(key)}`")
        return url

    def has_model(self, key: str) -> bool:
        return storage.exists(self.model_file(key))

    def trained(self, key: str) -> bool:
        """The model is on disk or run.json records it as trained (its file then went
        missing: a strategy that needs it must refuse, never fall back to another model)."""
        entry = self.read().models.get(key)
        return self.has_model(key) or (entry is not None and entry.trained)

    def branch_ids(self) -> List[int]:
        """Level-1 ids with a branch folder, ascending."""
        names = [name for name, _, is_file in storage.list_dir(storage.join(self.path, BRANCH))
                 if not is_file and name.isdigit()]
        return sorted(int(n) for n in names)

    def keys(self) -> List[str]:
        """Keys of the models whose folders exist, in report order."""
        found = [k for k in (LEVEL1, *SINGLE) if storage.exists(self.model_dir(k))]
        return found + [branch_key(b) for b in self.branch_ids()]

    def histories(self) -> Dict[str, dict]:
        """{key: history} of the models that have one ({} for a run that does not exist)."""
        out = {}
        for key in self.keys():
            history = storage.read_json(self.history_file(key), None)
            if history is not None:
                out[key] = history
        return out


@dataclass(frozen=True)
class ModelStore:
    root: str

    def run(self, run_id: str) -> Run:
        return Run(self.root, run_id)

    @property
    def mlruns(self) -> str:
        """The default MLflow tracking URI: a file store inside the model store."""
        return storage.to_url(storage.join(self.root, MLRUNS))
