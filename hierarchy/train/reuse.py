"""Models a new run takes over unchanged from the run it comes from (``train --from-run``).

A model stays valid under a new taxonomy version when its outputs stand for the very ids the
new version has for it (:func:`hierarchy.contracts.versions.unusable`): the level-1 model when
no level-1 node was added or removed, a branch model when its branch holds the same leaves.
Such a model is copied into the new run (its file checked against its recorded digest first,
then streamed) with its metrics and a ``reused_from`` note, and recorded in the new run's
run.json as trained; only the branches the change touched train. Branches are matched by
their level-1 name: a new level-1 node shifts the positions (``branch/<l1>``) of the nodes
after it, not their identity.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from hierarchy.contracts import modelstore, storage, versions
from hierarchy.contracts.modelstore import ModelStore
from hierarchy.contracts.taxonomy import Taxonomy


def _old_key(key: str, old: Taxonomy, new: Taxonomy) -> Optional[str]:
    """The key of the model in the old run that would answer for ``key`` of the new one."""
    b = modelstore.branch_of(key)
    if b is None:
        return key
    name = new.l1_names[b]
    return modelstore.branch_key(old.l1_names.index(name)) if name in old.l1_names else None


def reuse_plan(models: str, from_run: Optional[str], keys: List[str], taxonomy: Taxonomy
               ) -> Dict[str, str]:
    """{new key: the old run's key it is copied from} for the ``keys`` whose old model can
    stand under ``taxonomy`` unchanged."""
    if from_run is None or not keys:
        return {}
    old = ModelStore(models).run(from_run)
    old_tax = old.taxonomy()
    found = {}
    for key in keys:
        old_key = _old_key(key, old_tax, taxonomy)
        if old_key is not None and old.has_model(old_key) and versions.unusable(
                taxonomy, key, old.metrics(old_key) or {}) is None:
            found[key] = old_key
    return found


def reuse(models: str, from_run: str, old_key: str, run_id: str, key: str
          ) -> Tuple[dict, dict]:
    """Copy the old run's ``old_key`` into run ``run_id`` as ``key``; (its worker-style result
    for run.json, its recorded config)."""
    store = ModelStore(models)
    old, new = store.run(from_run), store.run(run_id)
    storage.copy_file(old.verified_model_file(old_key), new.model_file(key))
    metrics = {**(old.metrics(old_key) or {}),
               "reused_from": {"run_id": from_run, "model": old_key}}
    storage.write_json_atomic(new.metrics_file(key), metrics)
    config = old.read().config.get(old_key)
    return ({"rank": 0, "key": key, "checksum": None, "metrics": metrics,
             "reused_from": metrics["reused_from"]},
            config.to_json() if config is not None else {})
