"""Experiment tracking with MLflow: every trained model is a run with its parameters, metrics
per epoch and artifacts, so experiments are compared in MLflow, not in a spreadsheet. The
default is a file store under ``<models>/mlruns`` (``mlflow ui --backend-store-uri`` on it,
see :attr:`hierarchy.contracts.modelstore.ModelStore.mlruns`); ``train.tracking_uri`` points at a
tracking server instead."""

from __future__ import annotations

from typing import Iterable, Optional

from hierarchy.contracts import storage


def _flat(prefix: str, obj, out: dict) -> dict:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj
    return out


class Tracker:
    """No-op on ranks other than 0 (``enabled=False``)."""

    def __init__(self, uri: str, experiment: str, enabled: bool = True):
        self.uri, self.experiment, self.enabled = uri, experiment, enabled
        self.run_id: Optional[str] = None

    def start(self, spec, resumed_at: int = 0, resume: bool = True) -> None:
        """``spec``: the :class:`hierarchy.train.spec.TrainSpec` being trained. ``resume``
        False: a new MLflow run even if one for this model exists (a head trained again from
        scratch is a new experiment, not the continuation of the old one)."""
        if not self.enabled:
            return
        import mlflow

        from hierarchy import joblog

        joblog.quiet("mlflow")
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.experiment)
        name = f"{spec.run_id}/{spec.key}"
        # a resumed training continues its MLflow run instead of opening a second one
        found = mlflow.search_runs(filter_string=f"tags.hierarchy_model = '{name}'",
                                   output_format="list", max_results=1) if resume else []
        run = mlflow.start_run(run_id=found[0].info.run_id if found else None,
                               run_name=None if found else name)
        self.run_id = run.info.run_id
        if not found:
            mlflow.set_tags({"hierarchy_model": name, "hierarchy_run_id": spec.run_id,
                             "level": spec.level, "label": spec.label})
            params = _flat("", {"train": spec.config(), "branch": spec.branch,
                                "data": spec.data}, {})
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        if resumed_at:
            mlflow.set_tag(f"resumed_at_epoch_{resumed_at}", "true")

    def log_epoch(self, epoch: int, logs: dict) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in logs.items()}, step=epoch)

    def log_final(self, metrics: dict, artifacts: Iterable[str]) -> None:
        if not self.enabled:
            return
        import mlflow

        mlflow.log_metrics({f"best_{k}": float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for path in artifacts:
            if storage.exists(path):
                mlflow.log_artifact(storage.copy_to_local(path))

    def log_trials(self, trials: Iterable[dict]) -> None:
        """A tuning search's trials, each a nested run (its values and hold-out figure)."""
        if not self.enabled:
            return
        import mlflow

        for t in trials:
            with mlflow.start_run(run_name=f"trial {t['number']}", nested=True):
                mlflow.log_params({k: str(v) for k, v in t["values"].items()})
                if t["holdout_accuracy"] is not None:
                    mlflow.log_metric("holdout_accuracy", float(t["holdout_accuracy"]))

    def end(self, failed: bool = False) -> None:
        if self.enabled and self.run_id:
            import mlflow

            mlflow.end_run(status="FAILED" if failed else "FINISHED")
