"""Which models a `hierarchy train` call trains, and how its workers are started.

The same :func:`hierarchy.train.loop.train_model` runs
- under ``horovod.spark.run`` on the configured Spark master when ``--np N`` > 1,
- under ``horovodrun -np N hierarchy train ...`` (each process runs this code; Horovod's
  environment is already set, so it trains in-process),
- or as one plain process (``--np 1``: Horovod with a single worker).
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

from hierarchy import storage
from hierarchy.errors import Refused, UsageError
from hierarchy.ingest.manifest import load_taxonomy, require_complete
from hierarchy.train import store
from hierarchy.train.tracking import tracking_uri


class TrainError(Refused, RuntimeError):
    """Training refused: nothing to train on, a run of another taxonomy..."""


def check_training(cfg, data: str, models: str, level: int, mode: Optional[str],
                   branches: Optional[Sequence[int]]) -> dict:
    """What can be refused before Spark or Horovod start: the arguments, the folders, a
    dataset that is not complete or has nothing to train on. Returns the manifest."""
    if level == 3 and mode not in ("flat", "branch"):
        raise UsageError("--level 3 needs --mode flat or --mode branch")
    storage.require_dir(data, "--data")
    storage.require_writable_dir(models, "--models")
    manifest = require_complete(data, ["train"])
    if level == 3 and mode == "branch" and branches:
        n_l1 = manifest["taxonomy"]["level1"]
        bad = [b for b in branches if not 0 <= b < n_l1]
        if bad:
            raise UsageError(f"--branches {','.join(map(str, bad))}: level-1 ids run from 0 "
                             f"to {n_l1 - 1}")
    if not manifest["splits"].get("train", {}).get("images"):
        raise TrainError(f"{data}: the train split has no images to train on (see its "
                         f"manifest.json and quarantine/)")
    return manifest


def _under_horovodrun() -> bool:
    return "HOROVOD_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def plan(cfg, data: str, models: str, run_id: str, level: int, mode: Optional[str],
         branches: Optional[Sequence[int]], manifest: dict) -> tuple:
    """(specs to train, branches recorded without a model)."""
    taxonomy = load_taxonomy(data)
    tcfg = dict(cfg["train"])
    base = {"data": data, "models": models, "run_id": run_id, "train": tcfg, "level": level,
            "tracking": {"uri": tracking_uri(tcfg["tracking_uri"], models),
                         "experiment": tcfg["experiment"]}}
    if level == 1:
        return [{**base, "key": "level1", "label": "l1"}], {}
    if mode == "flat":
        return [{**base, "key": "flat", "label": "l3"}], {}
    wanted = list(range(taxonomy.n_l1)) if not branches else list(branches)
    bad = [b for b in wanted if not 0 <= b < taxonomy.n_l1]
    if bad:
        raise UsageError(f"--branches {','.join(map(str, bad))}: level-1 ids run from 0 to "
                         f"{taxonomy.n_l1 - 1}")
    level1 = os.path.join(store.model_dir(models, run_id, "level1"), store.MODEL_FILE)
    init_from = level1 if os.path.exists(level1) else None
    counts = manifest["splits"].get("train", {}).get("images_per_l1", {})
    specs, skipped = [], {}
    for b in wanted:
        leaves = taxonomy.branch(b)
        if len(leaves) < 2:
            # one leaf: P(l3 | l1) = 1, nothing to learn
            skipped[b] = {"status": "single leaf", "category_id": taxonomy.category_of_l3(
                int(leaves[0])) if len(leaves) else None}
        elif not counts.get(str(b)):
            skipped[b] = {"status": "no training images"}
        else:
            specs.append({**base, "key": f"branch/{b}", "label": "branch", "branch": b,
                          "init_from": init_from})
    return specs, skipped


def _run_one(spec: dict, np_: int, spark_factory) -> List[dict]:
    from hierarchy.train.loop import train_model

    if np_ == 1 or _under_horovodrun():
        return [train_model(spec)]
    import horovod.spark

    spark_factory()  # horovod.spark.run runs its tasks on the active session
    env = {k: v for k, v in os.environ.items() if k.startswith(("PYSPARK", "TF_", "PATH"))}
    return horovod.spark.run(train_model, args=(spec,), num_proc=np_, use_gloo=True,
                             start_timeout=spec["train"]["start_timeout"], env=env,
                             verbose=1)


def run_training(cfg, data: str, models: str, run_id: str, level: int,
                 mode: Optional[str] = None, branches: Optional[Sequence[int]] = None,
                 np_: Optional[int] = None, spark_factory=None, echo=print) -> dict:
    """Train every model of the call; returns {model key: rank-0 result}."""
    manifest = check_training(cfg, data, models, level, mode, branches)
    np_ = np_ or cfg["train"]["np"]
    specs, skipped = plan(cfg, data, models, run_id, level, mode, branches, manifest)
    fingerprint = manifest["taxonomy"]["fingerprint"]
    results = {}
    for spec in specs:
        echo(f"training {spec['key']} ({np_} worker{'s' if np_ > 1 else ''}, "
             f"{spec['train']['backbone']})")
        per_rank = _run_one(spec, np_, spark_factory)
        lead = min(per_rank, key=lambda r: r["rank"])
        lead["ranks"] = [{"rank": r["rank"], "checksum": r["checksum"]} for r in per_rank]
        results[spec["key"]] = lead
        if lead.get("status") == "already trained":
            # a re-run of a finished model: run.json keeps what the training recorded
            done = (store.read_json(os.path.join(store.run_dir(models, run_id), "run.json"),
                                    {}) or {}).get("models", {}).get(spec["key"], {})
            lead["metrics"] = done.get("metrics", {})
            continue
        if lead["rank"] == 0:  # under horovodrun the other processes write nothing
            store.update_run(models, run_id, config=spec["train"], fingerprint=fingerprint,
                             data=data, manifest=manifest, key=spec["key"],
                             result={k: v for k, v in lead.items() if k != "ranks"})
    is_lead = int(os.environ.get("HOROVOD_RANK", "0")) == 0
    for b, info in skipped.items():
        results[f"branch/{b}"] = info
        if is_lead:
            store.update_run(models, run_id, config=dict(cfg["train"]),
                             fingerprint=fingerprint, data=data, manifest=manifest,
                             key=f"branch/{b}", result=info)
    return results
