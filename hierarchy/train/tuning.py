"""Cheap tuning: a head over cached features trains in seconds, so its hyper-parameters are
searched for real before the final head trains.

``tune.trials`` > 0 with ``--mode refit`` or ``fusion``: an Optuna study (TPE sampler, seeded)
tries learning rate, width, dropout, epochs (and, for fusion, label smoothing) within the
``tune:`` ranges. Each trial trains on the train products outside a hold-out (``tune.holdout``
of them, chosen by a hash of the product id, the same on every worker and run) and is scored
on the hold-out: product accuracy for fusion, picture accuracy for refit (what each head
optimises). The configured values are the first trial, so a search adopts other values only
when they score better; a hold-out with no product keeps the configured values. Val is never
touched, so the figures evaluate chooses the default strategy on stay out of sample. The
best values then train the final head on every train product. The trials are recorded in
the run (``metrics.json`` -> ``tuning``) and, each as a nested MLflow run, under the model's
MLflow run.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np

from hierarchy.contracts.settings import Train, Tune

# knob of the search -> (train.* key of each head kind)
KEYS = {
    "refit": {"learning_rate": "expert_learning_rate", "hidden": "expert_hidden",
              "dropout": "expert_dropout", "epochs": "expert_epochs"},
    "fusion": {"learning_rate": "fusion_learning_rate", "hidden": "fusion_hidden",
               "dropout": "fusion_dropout", "epochs": "fusion_epochs",
               "label_smoothing": "fusion_label_smoothing"},
}
SALT = np.uint64(0x9E3779B97F4A7C15)


def in_holdout(product_ids: np.ndarray, share: float) -> np.ndarray:
    """Whether each product is in the tuning hold-out: a splitmix64 hash of its id, so the
    choice is stable across workers, files and runs and needs no table of ids."""
    z = np.asarray(product_ids).astype(np.uint64) + SALT
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < share


def suggest(trial, kind: str, space: Tune, configured: Dict[str, object]) -> Dict[str, object]:
    """One trial's ``train.*`` values drawn from the ``tune:`` ranges, widened to hold the
    ``configured`` ones (the first trial tries those)."""
    def span(knob: str):
        lo, hi = getattr(space, knob)
        v = configured[KEYS[kind][knob]]
        return min(lo, v), max(hi, v)

    values = {"learning_rate": trial.suggest_float("learning_rate", *span("learning_rate"),
                                                   log=True),
              "hidden": trial.suggest_categorical("hidden", sorted(
                  {int(h) for h in space.hidden} | {int(configured[KEYS[kind]["hidden"]])})),
              "dropout": trial.suggest_float("dropout", *span("dropout")),
              "epochs": trial.suggest_int("epochs", *(int(v) for v in span("epochs")))}
    if kind == "fusion":
        values["label_smoothing"] = trial.suggest_float("label_smoothing",
                                                        *span("label_smoothing"))
    return {KEYS[kind][k]: v for k, v in values.items()}


def search(kind: str, tcfg: Train, space: Tune,
           score: Callable[[dict], Optional[float]], log_trial=None) -> dict:
    """Run ``space.trials`` trials; ``score(train_cfg)`` trains one head and returns its
    hold-out figure. Returns the best ``train.*`` values and every trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=space.seed))
    untuned = {k: getattr(tcfg, k) for k in KEYS[kind].values()}
    # the configured values are trial 0: the search adopts other values only if they beat them
    study.enqueue_trial({k: untuned[KEYS[kind][k]] for k in KEYS[kind]},
                        skip_if_exists=True)
    trials = []

    def objective(trial) -> float:
        values = suggest(trial, kind, space, untuned)
        got = score(tcfg.model_copy(update=values))
        trials.append({"number": trial.number, "values": values, "holdout_accuracy": got})
        if log_trial is not None:
            log_trial(trial.number, values, got)
        return float("-inf") if got is None else float(got)

    study.optimize(objective, n_trials=max(1, space.trials))
    scored = [t for t in trials if t["holdout_accuracy"] is not None]
    if not scored:  # an empty hold-out: nothing to choose by, the configured values stay
        return {"trials": trials, "best": untuned, "best_holdout_accuracy": None,
                "untuned": untuned, "holdout": space.holdout, "sampler": "TPE",
                "seed": space.seed, "reason": "no hold-out product scored"}
    best = trials[study.best_trial.number]
    return {"trials": trials, "best": best["values"], "best_holdout_accuracy":
            best["holdout_accuracy"], "untuned": untuned,
            "untuned_holdout_accuracy": trials[0]["holdout_accuracy"],
            "holdout": space.holdout, "sampler": "TPE", "seed": space.seed}
