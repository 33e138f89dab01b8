"""What every strategy answers (:class:`Strategy`), and what it sees of the model store
(:class:`Models`) and of the scorer (:class:`Scorer`): protocols, so that a strategy imports
neither ``modelset`` nor ``scoring``, which both look strategies up."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, Tuple

import numpy as np

from hierarchy.contracts.modelstore import Run


class Models(Protocol):
    """A run's models, checked as they are asked for (missing, damaged, other taxonomy:
    refused with the command that makes them): what ``hierarchy.infer.modelset`` gives a
    strategy to choose its models from."""

    run: Run

    def ref(self, key: str) -> Any: ...

    def branches(self, strategy: str) -> Tuple[Dict[int, Any], List[int]]: ...

    def calibration(self, key: str) -> Dict[str, float]: ...


class Scorer(Protocol):
    """What a strategy reads of :class:`hierarchy.infer.scoring.BatchScorer`: the plan (its
    models and parameters), the taxonomy, and each model's outputs on this batch."""

    plan: Any
    taxonomy: Any

    def output(self, ref: Any, images: list, cache: dict,
               rows: Optional[np.ndarray] = None) -> np.ndarray: ...

    def outputs(self, ref: Any, images: list, cache: dict) -> Dict[str, np.ndarray]: ...

    def components(self, images: list, cache: Optional[dict] = None
                   ) -> Dict[str, np.ndarray]: ...

    def expert_groups(self) -> Optional[np.ndarray]: ...


class Strategy:
    """A way of turning a run's models into one leaf distribution per picture.

    ``available``: whether the run's models can serve it (evaluate scores those);
    ``models``: the :class:`~hierarchy.infer.modelset.ModelSet` fields it needs, loaded
    through ``models``; ``probs``: float64 [n pictures, n_l3] of decoded pictures (every
    picture of a product in the call), reading the models through ``scorer`` so that a model
    shared with another strategy runs once per batch (``cache``); ``weighted``: those and
    each picture's weight in its product (None: equal); ``pooling``: how a product's pictures
    combine, given ``predict.aggregate``."""

    name = ""
    fits_correction = False  # evaluate fits its (temperature, w, v) on val before scoring it

    def available(self, run: Run) -> bool:
        raise NotImplementedError

    def models(self, models: Models) -> dict:
        raise NotImplementedError

    def probs(self, scorer: Scorer, images: list, product_ids: np.ndarray,
              cache: dict) -> np.ndarray:
        raise NotImplementedError

    def weighted(self, scorer: Scorer, images: list, product_ids: np.ndarray,
                 cache: dict) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        return self.probs(scorer, images, product_ids, cache), None

    def pooling(self, aggregate: str) -> str:
        return aggregate
