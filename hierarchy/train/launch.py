"""Which models a `hierarchy train` call trains, and how its workers are started.

The same :func:`hierarchy.train.loop.train_model` runs
- under ``horovod.spark.run`` on the configured Spark master when ``--np N`` > 1,
- under ``horovodrun -np N hierarchy train ...`` (each process runs this code; Horovod's
  environment is already set, so it trains in-process),
- or as one plain process (``--np 1``: Horovod with a single worker).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

from hierarchy.contracts import modelstore, storage, versions
from hierarchy.contracts.dataset import TRAIN, Dataset
from hierarchy.contracts.errors import Refused, UsageError
from hierarchy.contracts.manifest import Manifest
from hierarchy.contracts.modelstore import ModelStore
from hierarchy.contracts.runrecord import FromRun
from hierarchy.contracts.settings import Settings
from hierarchy.train import reuse
from hierarchy.train.spec import HEAD, TrainSpec

log = logging.getLogger(__name__)


class TrainError(Refused, RuntimeError):
    """Training refused: nothing to train on..."""


def check_training(cfg: Settings, data: str, models: str, level: int, mode: Optional[str],
                   branches: Optional[Sequence[int]], run_id: Optional[str] = None,
                   from_run: Optional[str] = None) -> Manifest:
    """What can be refused before Spark or Horovod start: the arguments, the folders, a
    dataset that is not complete or has nothing to train on, a run of another taxonomy, a
    ``from_run`` whose trunk cannot be reused. Returns the manifest."""
    if level == 3 and mode not in modelstore.MODES:
        raise UsageError(f"--level 3 needs --mode {' or '.join(modelstore.MODES)}")
    storage.require_dir(data, "--data")
    storage.require_writable_dir(models, "--models")
    manifest = Dataset(data).require_complete(["train"])
    if level == 3 and mode == "branch" and branches:
        n_l1 = manifest.n_l1
        bad = [b for b in branches if not 0 <= b < n_l1]
        if bad:
            raise UsageError(f"--branches {','.join(map(str, bad))}: level-1 ids run from 0 "
                             f"to {n_l1 - 1}")
    if not manifest.images(TRAIN):
        raise TrainError(f"{data}: the train split has no images to train on (see its "
                         f"manifest.json and quarantine/)")
    if from_run is not None:
        check_from_run(cfg, data, models, run_id, from_run, level, mode)
    if run_id is not None:
        ModelStore(models).run(run_id).check_taxonomy(manifest.fingerprint)
    if level == 3 and mode in modelstore.HEADS:
        head_source(cfg, models, from_run or run_id, mode)
    elif cfg.train.weights and not os.path.isfile(cfg.train.weights):
        from hierarchy.train.models import check_weights  # TensorFlow: only to refuse

        check_weights(cfg.train.backbone, cfg.train.weights)
    return manifest


FROM_RUN_MODES = (modelstore.REFIT, modelstore.FUSION, modelstore.BRANCH)


def check_from_run(cfg: Settings, data: str, models: str, run_id: Optional[str],
                   from_run: str, level: int, mode: Optional[str]) -> None:
    """``--from-run``: a run of this dataset's taxonomy version made from another run: a head
    over its frozen trunk (the head's rows carried by leaf id), or its level-1 and branch
    models taken over where the change left their outputs alone. Refused before any work when
    the mode is neither, the run is this one or does not exist, its level-1 model does not
    answer for this version's level-1 nodes, or it has no trunk of the head's source or that
    trunk takes another input than ``train:`` sets."""
    if level != 1 and mode not in FROM_RUN_MODES:
        raise UsageError(f"--from-run makes a run from another run: it needs --level 1, or "
                         f"--level 3 --mode {', '.join(FROM_RUN_MODES)}")
    modelstore.check_run_id(from_run, "--from-run")
    if from_run == run_id:
        raise UsageError(f"--from-run {from_run} is the run being trained: name a new --run-id")
    old = ModelStore(models).run(from_run)
    if not old.exists():
        raise TrainError(f"--from-run {from_run}: {old.run_file} not found — no such run in "
                         f"{models}")
    if level == 1:
        why = ("it has no level-1 model" if not old.has_model(modelstore.LEVEL1) else
               versions.unusable(Dataset(data).taxonomy(), modelstore.LEVEL1,
                                 old.metrics(modelstore.LEVEL1) or {}))
        if why:
            raise TrainError(f"--from-run {from_run}: {why}; train --level 1 on this dataset "
                             f"without --from-run")
    elif mode != modelstore.BRANCH:  # a branch the change touched trains as any other
        _check_trunk(cfg, old, mode)
    old.taxonomy()  # the version its outputs are of: refused here when unreadable


def _check_trunk(cfg: Settings, old: modelstore.Run, mode: str) -> None:
    """The run a head comes from has the head's source, taking the input ``train:`` sets."""
    from_run = old.run_id
    key = next((k for k in source_keys(cfg, mode) if old.has_model(k)), None)
    if key is None:
        raise TrainError(f"--from-run {from_run}: run {from_run} has no "
                         f"{' or '.join(source_keys(cfg, mode))} trunk to reuse ({old.path}); "
                         f"train one there first or name another run")
    got = old.read().config.get(key)
    want = (cfg.train.backbone, cfg.train.image_size)
    if got is None or (got.backbone, got.image_size) != want:
        seen = "no recorded input" if got is None else f"{got.backbone} at {got.image_size} px"
        raise UsageError(f"--from-run {from_run}: its {key} trunk takes {seen}, train: sets "
                         f"{want[0]} at {want[1]} px; set train.backbone and "
                         f"train.image_size to the trunk's")


def source_keys(cfg: Settings, mode: str) -> Tuple[str, ...]:
    """The models a head of ``mode`` may sit on, the first the run has wins: experts on the
    multi-level model (its per-branch head), else the flat one; refit on the flat model; fusion
    on ``train.fusion_source``."""
    if mode == modelstore.EXPERTS:
        return (modelstore.MULTI, modelstore.FLAT)
    if mode == modelstore.REFIT:
        return (modelstore.FLAT,)
    return (cfg.train.fusion_source,)


def head_source(cfg: Settings, models: str, run_id: Optional[str], mode: str) -> str:
    """The model file a head of ``mode`` sits on (:func:`source_keys`)."""
    keys = source_keys(cfg, mode)
    run = ModelStore(models).run(run_id) if run_id is not None else None
    for key in keys:
        if run is not None and run.has_model(key):
            return run.verified_model_file(key)  # a damaged source is refused before work
    raise TrainError(f"--mode {mode} trains a head over a trained model's trunk, and run "
                     f"{run_id} has no {' or '.join(keys)} model: train `--level 3 --mode "
                     f"{keys[0]}` with --run-id {run_id} first, or sit the head on another "
                     f"run's trunk with --from-run")


def _under_horovodrun() -> bool:
    return "HOROVOD_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def plan(cfg: Settings, data: str, models: str, run_id: str, level: int, mode: Optional[str],
         branches: Optional[Sequence[int]], manifest: Manifest, from_run: Optional[str] = None
         ) -> Tuple[List[TrainSpec], Dict[int, dict], Dict[str, str]]:
    """(specs to train, branches recorded without a model, {key: the ``from_run`` model it
    is copied from}): with ``from_run``, a level-1 or branch model whose outputs the new
    taxonomy version left alone is reused, not trained (:mod:`hierarchy.train.reuse`)."""
    taxonomy = Dataset(data).taxonomy()
    specs, skipped = _plan(cfg, data, models, run_id, level, mode, branches, manifest,
                           from_run, taxonomy)
    reused = reuse.reuse_plan(models, from_run, [s.key for s in specs
                                                 if s.label in ("l1", "branch")], taxonomy)
    return [s for s in specs if s.key not in reused], skipped, reused


def _plan(cfg: Settings, data: str, models: str, run_id: str, level: int, mode: Optional[str],
          branches: Optional[Sequence[int]], manifest: Manifest, from_run: Optional[str],
          taxonomy) -> Tuple[List[TrainSpec], Dict[int, dict]]:
    tcfg = cfg.train
    store = ModelStore(models)

    def spec(key: str, label: str, **extra) -> TrainSpec:
        return TrainSpec(data=data, models=models, run_id=run_id, key=key, label=label,
                         level=level, train=tcfg,
                         tracking_uri=tcfg.tracking_uri or store.mlruns,
                         experiment=tcfg.experiment, **extra)

    if level == 1:
        return [spec(modelstore.model_key(1), "l1")], {}
    if mode == modelstore.FLAT:
        return [spec(modelstore.model_key(3, mode), "l3")], {}
    if mode == modelstore.MULTI:
        return [spec(modelstore.model_key(3, mode), "levels")], {}
    if mode in modelstore.HEADS:
        tune = cfg.tune if mode != modelstore.EXPERTS else None  # refit, fusion: tuning.py
        if mode == modelstore.EXPERTS and cfg.tune.trials:
            log.warning("tune.trials applies to --mode refit and fusion: the experts train "
                        "with train.expert_* as configured")
        return [spec(mode, HEAD, init_from=head_source(cfg, models, from_run or run_id, mode),
                     tune=tune, from_run=from_run)], {}
    wanted = list(range(taxonomy.n_l1)) if not branches else list(branches)
    bad = [b for b in wanted if not 0 <= b < taxonomy.n_l1]
    if bad:
        raise UsageError(f"--branches {','.join(map(str, bad))}: level-1 ids run from 0 to "
                         f"{taxonomy.n_l1 - 1}")
    run = store.run(run_id)
    init_from = (run.verified_model_file(modelstore.LEVEL1) if run.has_model(modelstore.LEVEL1)
                 else None)
    specs, skipped = [], {}
    for b in wanted:
        leaves = taxonomy.branch(b)
        if len(leaves) < 2:
            # one leaf: P(l3 | l1) = 1, nothing to learn
            skipped[b] = {"status": "single leaf", "category_id": taxonomy.category_of_l3(
                int(leaves[0])) if len(leaves) else None}
        elif not manifest.images(TRAIN, b):
            skipped[b] = {"status": "no training images"}
        else:
            specs.append(spec(modelstore.model_key(3, "branch", b), "branch", branch=b,
                              init_from=init_from))
    return specs, skipped


def _lineage(models: str, from_run: Optional[str], specs: List[TrainSpec]
             ) -> Optional[FromRun]:
    if from_run is None:
        return None
    old = ModelStore(models).run(from_run)
    key = next((k for k in modelstore.SINGLE if specs and specs[0].init_from ==
                old.model_file(k)), None)
    return FromRun(run_id=from_run, taxonomy_fingerprint=old.read().taxonomy_fingerprint,
                   model=key)


def _run_one(spec: TrainSpec, np_: int, spark_factory) -> List[dict]:
    from hierarchy.train.loop import train_model
    from hierarchy.train.memory import one_model

    if np_ == 1 or _under_horovodrun():
        # every model of the call trains in this process, one after the other: each leaves
        # its graphs, readers and Horovod traces behind unless released (hierarchy.train.memory)
        with one_model():
            return [train_model(spec)]
    import horovod.spark

    sc = spark_factory().sparkContext  # horovod.spark.run runs its tasks on this session
    env = {k: v for k, v in os.environ.items() if k.startswith(("PYSPARK", "TF_", "PATH"))}
    # The workers start where the Spark tasks run, so with the executors' interpreter (a
    # shipped ./environment/bin/python on a cluster), not the driver's sys.executable
    executable = sc.getConf().get("spark.pyspark.python", None) or sc.pythonExec
    return horovod.spark.run(train_model, args=(spec,), num_proc=np_, use_gloo=True,
                             start_timeout=spec.train.start_timeout, env=env, verbose=1,
                             executable=executable)


def run_training(cfg: Settings, data: str, models: str, run_id: str, level: int,
                 mode: Optional[str] = None, branches: Optional[Sequence[int]] = None,
                 np_: Optional[int] = None, spark_factory=None,
                 manifest: Optional[Manifest] = None, from_run: Optional[str] = None) -> dict:
    """Train every model of the call; returns {model key: rank-0 result}. ``manifest``:
    what :func:`check_training` already returned for these arguments; ``from_run``: the run
    whose trunk a head sits on (:func:`check_from_run`)."""
    manifest = manifest or check_training(cfg, data, models, level, mode, branches, run_id,
                                          from_run)
    np_ = np_ or cfg.train.np
    specs, skipped, reused = plan(cfg, data, models, run_id, level, mode, branches, manifest,
                                  from_run)
    lineage = _lineage(models, from_run, specs)
    fingerprint = manifest.fingerprint
    run = ModelStore(models).run(run_id)
    results = {}
    if int(os.environ.get("HOROVOD_RANK", "0")) == 0:
        run.save_taxonomy(Dataset(data).taxonomy())
        for key, old_key in reused.items():  # copied before the branches train on level 1
            results[key], config = reuse.reuse(models, from_run, old_key, run_id, key)
            run.record(key=key, config=config, fingerprint=fingerprint, data=data,
                       manifest=manifest, result=results[key], from_run=lineage)
    for spec in specs:
        log.info("training %s (%d worker%s, %s)", spec.key, np_, "s" if np_ > 1 else "",
                 spec.train.backbone)
        per_rank = _run_one(spec, np_, spark_factory)
        lead = min(per_rank, key=lambda r: r["rank"])
        lead["ranks"] = [{"rank": r["rank"], "checksum": r["checksum"]} for r in per_rank]
        results[spec.key] = lead
        if lead.get("status") == "already trained":
            # a re-run of a finished model: run.json keeps what the training recorded
            lead["metrics"] = run.recorded(spec.key).metrics or {}
            continue
        if lead["rank"] == 0:  # under horovodrun the other processes write nothing
            run.record(key=spec.key, config=spec.config(), fingerprint=fingerprint,
                       data=data, manifest=manifest,
                       result={k: v for k, v in lead.items() if k != "ranks"},
                       from_run=lineage)
    is_lead = int(os.environ.get("HOROVOD_RANK", "0")) == 0
    for b, info in skipped.items():
        key = modelstore.branch_key(b)
        results[key] = info
        if is_lead:
            run.record(key=key, config=cfg.train.model_dump(mode="json"),
                       fingerprint=fingerprint, data=data, manifest=manifest, result=info)
    return results
