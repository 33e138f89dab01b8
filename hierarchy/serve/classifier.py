"""The model side of ``hierarchy serve``: a run's models loaded once, products in, answers out.

The pictures go through exactly what a predict task runs: :class:`BatchScorer` decodes them
(``decode``, the same TensorFlow decode, then the same resize and preprocessing), scores them
under the strategy (``probs``), :func:`score_products` aggregates a product's pictures and
:func:`predicted` makes the answer's columns — so for the same pictures the API and the
predictions table agree to float rounding.

:class:`MicroBatcher` lets concurrent requests share one model call: a request's pictures stay
together, requests that arrive within ``batch_window_ms`` of the first (up to
``max_batch_pictures``) are scored as one batch, one model call at a time, so throughput grows
with load while one request alone waits at most the window.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from hierarchy.contracts.modelstore import ModelStore
from hierarchy.contracts.settings import Settings
from hierarchy.infer import decide
from hierarchy.infer.modelset import ScoringRefused, load_modelset, resolve_strategy
from hierarchy.infer.scoring import BatchScorer, ScoringPlan, plan_params, predicted, score_products

log = logging.getLogger(__name__)
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class Product:
    """One product of a request: its id as the client named it and its decoded pictures."""

    id: str
    images: list


class Classifier:
    """Checks the run at once (missing model, other taxonomy: ScoringRefused, before any
    socket opens); :meth:`load` then loads the models (seconds: the server is up, not ready)."""

    def __init__(self, cfg: Settings, models: str, run_id: str, strategy: Optional[str] = None):
        scfg = cfg.serve
        run = ModelStore(models).run(run_id)
        if not run.exists():
            raise ScoringRefused(f"{run.path}: no run.json — train run {run_id!r} first "
                               f"(hierarchy train --run-id {run_id})")
        self.taxonomy = run.taxonomy()
        spec = resolve_strategy(models, run_id, strategy or scfg.strategy, cfg.variants)
        self.strategy = spec.name
        self.modelset = load_modelset(models, run_id, spec, self.taxonomy)
        self.run_id = run_id
        self.plan = ScoringPlan(
            models=self.modelset, taxonomy_json=self.taxonomy.to_json(), prior_category_id=0,
            prior_share=0.0, params=plan_params(self.modelset, cfg.predict),
            aggregate=cfg.predict.aggregate, tta_flip=cfg.predict.tta_flip,
            top_n=scfg.top_n, threads=cfg.predict.threads)
        self.scorer: Optional[BatchScorer] = None
        self.ready = threading.Event()
        self.error: Optional[str] = None
        self.calls = self.products = 0  # model calls and products answered (micro-batching)

    def load(self) -> None:
        try:
            self.scorer = BatchScorer(self.plan)
            self.ready.set()
        except Exception as exc:  # noqa: BLE001 - reported by /health/ready, not a crash
            # the answer names the kind of failure only: the message holds the server's
            # paths, which stay in its log
            self.error = f"{type(exc).__name__} (the server's log has the details)"
            log.exception("loading the models failed")

    def describe(self) -> dict:
        refs = self.modelset.refs()
        return {"run_id": self.run_id, "strategy": self.strategy,
                "taxonomy_fingerprint": self.taxonomy.fingerprint,
                "categories": self.taxonomy.n_l3, "level1_categories": self.taxonomy.n_l1,
                "models": [r.key for r in refs],
                "backbone": sorted({r.backbone for r in refs}),
                "image_size": sorted({r.image_size for r in refs}), "ready": self.ready.is_set(),
                "decision_rule": None if self.modelset.decision is None else
                self.modelset.decision.to_dict(),  # as run.json holds it
                "model_calls": self.calls, "products_answered": self.products}

    # ------------------------------------------------------------------ work (a worker thread)
    def decode(self, jpegs: Sequence[bytes]) -> list:
        """Decoded pictures (None where TensorFlow cannot decode), as a predict task does
        (called once :attr:`ready`: the decode scale is the loaded models')."""
        return self.scorer.decode_for_models(jpegs)

    def classify(self, products: List[Product]) -> List[dict]:
        """Answers for whole products (every picture decoded), in order."""
        images = [im for p in products for im in p.images]
        pids = np.repeat(np.arange(len(products), dtype=np.int64),
                         [len(p.images) for p in products])
        ids, probs, counts = score_products(self.scorer, images, pids)
        self.calls += 1
        self.products += len(products)
        rows = predicted(self.plan, self.taxonomy, probs)
        out = []
        for i, row, count in zip(ids.tolist(), rows, counts.tolist()):
            top = [{"category_id": int(c), **dict(zip(
                        ("category_level1", "category_level2", "category_level3"),
                        self.taxonomy.names_of_l3(self.taxonomy.l3_of_category(int(c))))),
                    "probability": float(p)}
                   for c, p in zip(row["top_category_id"], row["top_probability"])]
            out.append({"id": products[i].id, "pictures": int(count),
                        "category_id": row["category_id"], "confidence": row["confidence"],
                        "top": top,
                        "level1": {"id": row["level1_id"], "name": row["level1_name"],
                                   "probability": row["level1_probability"]},
                        "decision": decision_of(row)})
        return out


def decision_of(row: dict) -> dict:
    """The answer's decision: the table's decision columns and what the page says of them."""
    return {"level": row["decision_level"], "id": row["decision_id"],
            "name": row["decision_name"], "probability": row["decision_probability"],
            "text": decide.describe(row)}


class MicroBatcher:
    """Groups concurrent requests into model calls (see the module notes). Model calls run one
    at a time, in a worker thread, so the event loop keeps accepting requests meanwhile."""

    def __init__(self, classifier: Classifier, window_ms: float, max_pictures: int):
        self.classifier = classifier
        self.window = window_ms / 1000.0
        self.max_pictures = max_pictures
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    async def submit(self, products: List[Product]) -> tuple:
        """(answers, seconds waited in the queue, seconds of the model call)."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((products, future, time.perf_counter()))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch = [first]
            size = sum(len(p.images) for p in first[0])
            deadline = loop.time() + self.window
            while size < self.max_pictures:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except TimeoutError:
                    break
                batch.append(item)
                size += sum(len(p.images) for p in item[0])
            products = [p for item in batch for p in item[0]]
            started = time.perf_counter()
            try:
                answers = await asyncio.to_thread(self.classifier.classify, products)
                error = None
            except Exception as exc:  # noqa: BLE001 - the requests get a 500, the server stays
                log.exception("model call failed")
                answers, error = None, exc
            took = time.perf_counter() - started
            at = 0
            for items, future, queued in batch:
                if future.cancelled():
                    at += len(items)
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result((answers[at:at + len(items)], started - queued, took))
                at += len(items)
