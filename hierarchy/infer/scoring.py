"""Scoring inside a Spark task: JPEG bytes in, one row per product out.

:func:`score_partitions` is what ``DataFrame.mapInPandas`` runs, for one strategy (predict) or
all of a run's (evaluate) in one pass: each model runs once per picture. Its input must hold each
product's images contiguously and in ascending ``product_id`` order within a partition (the
predict job repartitions by ``product_id`` and sorts within partitions), so a product whose
images straddle two Arrow batches is carried over and aggregated once; products never straddle
partitions. Models are loaded once per Python worker process and reused by every batch and
every task that worker runs (Spark reuses Python workers by default).

JPEGs are decoded and resized exactly as training's validation input
(:func:`hierarchy.contracts.model.resize_for_model`), then preprocessed for each model's backbone.
A picture TensorFlow cannot decode is counted, not fatal; a product none of whose pictures
decodes gets the training prior's most frequent category and ``fallback = true``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd

from hierarchy import joblog
from hierarchy.contracts import predictions
from hierarchy.contracts import strategies as declared
from hierarchy.contracts.settings import Predict
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.infer import columns, combine, loaded, strategies
from hierarchy.infer.modelset import ModelRef, ModelSet

INPUT_COLUMNS = ["product_id", "img_idx", "jpeg", "category_id", "l1", "l2", "l3"]


@dataclass(frozen=True)
class ScoringPlan:
    """Everything an executor needs, shipped once in the task closure (small: paths, not
    weights)."""

    models: ModelSet
    taxonomy_json: str
    prior_category_id: int      # most frequent category of the training split
    prior_share: float          # its share of training products (the fallback's confidence)
    # the strategy's parameters (hierarchy.contracts.strategies.Declared.params): a variant's
    # own values, else the predict: keys of the same names
    params: Tuple[Tuple[str, float], ...]
    aggregate: str
    tta_flip: bool
    top_n: int
    threads: int

    def param(self, key: str):
        return dict(self.params)[key]


def plan_params(modelset: ModelSet, pcfg: Predict) -> Tuple[Tuple[str, float], ...]:
    """The parameters ``modelset``'s strategy reads: its variant's, else the configuration's."""
    spec = modelset.spec
    names = declared.declared(spec.strategy).params
    return tuple((p, spec.param(p, getattr(pcfg, p))) for p in names)


# ----------------------------------------------------------------------------- per worker
_configured = False  # TensorFlow's threads are set once per worker process


def _task_cpus() -> int:
    """The cores Spark gave this task (spark.task.cpus), 1 when unknown."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        return max(1, int(ctx.cpus())) if ctx is not None else 1
    except Exception:  # noqa: BLE001 - older Spark or outside a task: be conservative
        return 1


def _configure_tf(threads: int) -> None:
    """Spark runs one Python worker per concurrent task: left to itself, TensorFlow in each
    would use every core of the machine, cores x cores threads in all. By default
    (``predict.threads: 0``) each worker gets the cores Spark gave its task."""
    global _configured
    if _configured:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if os.environ.get(joblog.LOG_ENV):  # a quiet job: its workers' TF notes are not the user's
        tf.get_logger().setLevel("ERROR")
    threads = threads or _task_cpus()
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # this worker already ran TensorFlow with its own setting
    _configured = True


# ----------------------------------------------------------------------------- one batch
class BatchScorer:
    """Leaf probabilities [n_decoded, n_l3] for a batch of JPEGs under the plan's strategy
    (:mod:`hierarchy.infer.strategies`), which reads the models through :meth:`outputs`."""

    def __init__(self, plan: ScoringPlan):
        _configure_tf(plan.threads)
        self.plan = plan
        self.strategy = strategies.get(plan.models.spec.strategy)
        self.taxonomy = Taxonomy.from_json(plan.taxonomy_json)
        for ref in plan.models.refs():
            loaded.load(ref)  # now: a broken model file fails the first task, not the 1000th
        # decoded once for every model, at the DCT scale the largest input still fits (what
        # validation does: hierarchy.contracts.model.decode_for_model)
        self.min_side = max((ref.image_size for ref in plan.models.refs()), default=None)

    @staticmethod
    def decode(jpegs, min_side: Optional[int] = None) -> List[Optional[object]]:
        """Decoded uint8 pictures (None where TensorFlow cannot decode); with ``min_side``, at
        the largest DCT scale that keeps the shorter side >= min_side."""
        import tensorflow as tf

        from hierarchy.contracts.model import decode_scaled

        out = []
        for raw in jpegs:
            try:
                if isinstance(raw, (bytearray, memoryview)):  # toPandas() gives bytearray
                    raw = bytes(raw)
                out.append(decode_scaled(raw, min_side) if min_side else
                           tf.io.decode_jpeg(raw, channels=3))
            except (tf.errors.InvalidArgumentError, ValueError, TypeError):
                out.append(None)
        return out

    def decode_for_models(self, jpegs) -> List[Optional[object]]:
        """:meth:`decode` at the scale these models are fed: every caller that scores
        pictures (predict, the calibration that fits predict's ``hierarchical`` strategy,
        serve) decodes through here, so that they all score the same pixels."""
        return self.decode(jpegs, self.min_side)

    def _inputs(self, images: list, ref: ModelRef, cache: dict) -> np.ndarray:
        key = ("inputs", ref.image_size, ref.backbone)
        if key not in cache:
            import tensorflow as tf

            from hierarchy.contracts.model import preprocess_for, resize_for_model

            x = tf.stack([resize_for_model(im, ref.image_size) for im in images])
            cache[key] = tf.cast(preprocess_for(ref.backbone)(x), tf.float32).numpy()
        return cache[key]

    def outputs(self, ref: ModelRef, images: list, cache: dict,
                rows: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
        """:meth:`_outputs` of ``ref`` on ``images`` (or the ``rows`` of them), computed once
        per batch: ``cache`` is shared by the scorers of every strategy scored in one pass
        (flat, blend and a head over the flat trunk read the same flat outputs)."""
        picked = None if rows is None else rows.tobytes()
        key = ("outputs", ref.path, picked)
        if key not in cache:
            x = self._inputs(images, ref, cache)
            cache[key] = self._outputs(ref, x if rows is None else x[rows], cache,
                                       (ref.image_size, ref.backbone, picked))
        return cache[key]

    def _outputs(self, ref: ModelRef, x: np.ndarray, cache: dict,
                 input_key: tuple) -> Dict[str, np.ndarray]:
        """{output name: probabilities} of one model (a flat model has one output, named
        ``probs`` like a multi-level model's level 3). Models on the same trunk share its
        features through ``cache`` (:mod:`hierarchy.infer.loaded`)."""
        # compiled functions (loaded._compiled): ~30% faster than an eager model(x) call
        # here (bench/predict_throughput.py)
        names = loaded.load(ref).output_names
        out = dict(zip(names, loaded.outputs(ref, x, cache, input_key)))
        if self.plan.tta_flip:
            flipped = loaded.outputs(ref, np.ascontiguousarray(x[:, :, ::-1, :]), cache,
                                     (*input_key, "flipped"))
            # a fusion model's view scores are [N] log-weights: their plain mean
            out = {n: combine.flip_average(out[n], f) if np.ndim(f) == 2 else
                   0.5 * (np.asarray(out[n]) + np.asarray(f)) for n, f in zip(names, flipped)}
        return out

    def output(self, ref: ModelRef, images: list, cache: dict,
               rows: Optional[np.ndarray] = None) -> np.ndarray:
        """The first (a single-output model's only) output of :meth:`outputs`."""
        return next(iter(self.outputs(ref, images, cache, rows).values()))

    def components(self, images: list, cache: Optional[dict] = None) -> Dict[str, np.ndarray]:
        """The multi-level model's level-3, level-1 head and per-branch conditional outputs
        (float64) for decoded pictures: what the ``multi`` and ``hierarchical`` strategies, and
        the calibration that fits the latter, are computed from."""
        from hierarchy.contracts.model import CONDITIONAL, L1_HEAD, L3_OUTPUT

        out = self.outputs(self.plan.models.multilevel, images, {} if cache is None else cache)
        return {name: np.asarray(out[name], dtype=np.float64)
                for name in (L3_OUTPUT, L1_HEAD, CONDITIONAL)}

    def expert_groups(self) -> Optional[np.ndarray]:
        """The group of every leaf in the ``conditional`` output the hierarchical strategy
        reads: an experts model's own (:func:`hierarchy.train.heads.expert_groups`), None
        (level-1 branches) for a multi-level model's per-branch head."""
        from hierarchy.contracts.model import EXPERTS_LAYER

        if not hasattr(self, "_expert_groups"):
            model = loaded.load(self.plan.models.multilevel)
            names = {layer.name for layer in model.layers}
            self._expert_groups = None if EXPERTS_LAYER not in names else np.asarray(
                model.get_layer(EXPERTS_LAYER).groups, dtype=np.int64)
        return self._expert_groups

    def weighted(self, images: list, product_ids: np.ndarray, cache: Optional[dict] = None
                 ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(:meth:`probs`, each picture's weight in its product or None when all weigh the
        same, as a fusion model does). ``cache``: model outputs of this batch shared with
        other strategies' scorers (see :meth:`outputs`)."""
        return self.strategy.weighted(self, images, product_ids, {} if cache is None else cache)

    def probs(self, images: list, product_ids: np.ndarray,
              cache: Optional[dict] = None) -> np.ndarray:
        """``images``: decoded pictures (no None), with the product of each; every picture
        of a product is in the call (two-stage picks a product's branches from all of them).
        Returns float64 [len(images), n_l3]."""
        return self.strategy.probs(self, images, product_ids, {} if cache is None else cache)


# ----------------------------------------------------------------------------- partitions
@dataclass
class _Product:
    decoded: int = 0
    bad: int = 0
    truth: Tuple = (None, None, None, None)


def aggregate_of(plan: ScoringPlan) -> str:
    """How a product's pictures combine: ``predict.aggregate`` unless the strategy pools its
    own way (a fusion model's weights belong to the geometric mean it was trained with)."""
    return strategies.get(plan.models.spec.strategy).pooling(plan.aggregate)


class PartitionPass:
    """One partition's products scored under every strategy of ``plans``, batch by batch:
    each model runs once per picture whatever the number of strategies that read it
    (:meth:`BatchScorer.outputs`), and each strategy's products are aggregated as it gives
    them scored alone. :func:`score_partitions` makes table rows of them; evaluate's pass
    (:mod:`hierarchy.evaluate.decisions`) also its decision statistics."""

    def __init__(self, plans: Dict[str, ScoringPlan]):
        self.plans = plans
        self.scorers = {name: BatchScorer(plan) for name, plan in plans.items()}
        self.taxonomy = next(iter(self.scorers.values())).taxonomy
        self.accs = {name: combine.ProductAccumulator(self.taxonomy.n_l3, aggregate_of(plan))
                     for name, plan in plans.items()}
        self.seen: Dict[str, Dict[int, _Product]] = {name: {} for name in plans}
        self.last: Optional[int] = None

    def add(self, pdf: pd.DataFrame) -> Dict[str, Tuple[np.ndarray, tuple]]:
        """Score a batch of whole products (sorted, after the previous batch's); {strategy:
        (the product of each decoded picture, :meth:`BatchScorer.weighted` of them)}, for
        the strategies with a decoded picture in the batch."""
        pids = pdf["product_id"].to_numpy(np.int64)
        if (np.diff(pids) < 0).any() or (self.last is not None and pids[0] < self.last):
            raise RuntimeError("scoring input must be sorted by product_id within each "
                               "partition (repartition + sortWithinPartitions)")
        truth = pdf[["category_id", "l1", "l2", "l3"]].to_numpy(object)
        decoded: Dict[Optional[int], list] = {}
        cache: dict = {}  # this batch's model outputs, shared by the strategies
        out = {}
        for name, scorer in self.scorers.items():
            if scorer.min_side not in decoded:
                decoded[scorer.min_side] = scorer.decode_for_models(pdf["jpeg"])
            got = _score_batch(scorer, decoded[scorer.min_side], pids, truth, self.seen[name],
                               self.accs[name], cache)
            if got is not None:
                out[name] = got
        self.last = int(pids[-1])
        return out

    def finished(self, final: bool = False) -> dict:
        """{strategy: (ids, distributions, counts)} of the products no later batch can add
        to (all of them when ``final``)."""
        return {name: acc.finish() if final else acc.pop_all_except(self.last)
                for name, acc in self.accs.items()}


def score_partitions(plans: Dict[str, ScoringPlan]):
    """The function ``mapInPandas`` runs: an iterator of image batches (sorted by product
    within the partition) -> an iterator of product rows
    (:data:`hierarchy.contracts.predictions.SCORED_DDL` and ``strategy``), one per product and
    strategy of ``plans`` (:class:`PartitionPass`)."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        scored = PartitionPass(plans)
        for pdf in whole_products(batches):
            scored.add(pdf)
            out = _strategy_rows(plans, scored.taxonomy, scored.finished(), scored.seen,
                                 keep=scored.last)
            if out is not None:
                yield out
        out = _strategy_rows(plans, scored.taxonomy, scored.finished(final=True), scored.seen,
                             keep=None)
        if out is not None:
            yield out

    return run


def _score_batch(scorer: BatchScorer, images: list, pids: np.ndarray, truth: np.ndarray,
                 seen: Dict[int, _Product], acc, cache: dict
                 ) -> Optional[Tuple[np.ndarray, tuple]]:
    ok = np.array([im is not None for im in images], dtype=bool)
    for i, pid in enumerate(pids.tolist()):
        p = seen.get(pid)
        if p is None:
            p = seen[pid] = _Product(truth=tuple(nullable_int(v) for v in truth[i]))
        if ok[i]:
            p.decoded += 1
        else:
            p.bad += 1
    if not ok.any():
        return None
    weighted = scorer.weighted([im for im in images if im is not None], pids[ok], cache)
    acc.add(pids[ok], *weighted)
    return pids[ok], weighted


def _strategy_rows(plans: Dict[str, ScoringPlan], tax: Taxonomy, finished: dict,
                   seen: Dict[str, Dict[int, _Product]], keep: Optional[int]
                   ) -> Optional[pd.DataFrame]:
    frames = []
    for name, plan in plans.items():
        rows = _finished_frame(plan, tax, finished[name], seen[name], keep)
        if rows is not None:
            frames.append(rows.assign(strategy=name))
    return pd.concat(frames, ignore_index=True) if frames else None


def whole_products(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Re-cut Arrow batches (sorted by product) so that no product straddles two: the rows of
    a batch's last product wait for the next batch. A product has a handful of pictures, so
    batches keep about their size."""
    pending: Optional[pd.DataFrame] = None
    for pdf in batches:
        if pdf.empty:
            continue
        if pending is not None:
            pdf = pd.concat([pending, pdf], ignore_index=True)
        pids = pdf["product_id"].to_numpy(np.int64)
        cut = int(np.searchsorted(pids, pids[-1], side="left"))
        pending = pdf.iloc[cut:]
        if cut:
            yield pdf.iloc[:cut].reset_index(drop=True)
    if pending is not None and len(pending):
        yield pending.reset_index(drop=True)


def nullable_int(v):
    """A label as Arrow hands it to pandas (an int, or NaN / None / NA for null)."""
    return None if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA else int(v)


def predicted(plan: ScoringPlan, tax: Taxonomy, probs: np.ndarray) -> List[dict]:
    """The predicted columns (:func:`hierarchy.contracts.predictions.leaf_prediction`) and the
    decision (:mod:`hierarchy.infer.decide`) of each product distribution: what the predictions
    table holds and what the HTTP API answers, from the same code. With a fitted rule every column
    comes from the distribution at the rule's temperature (the leaf ranking is unchanged)."""
    rule = plan.models.decision
    if rule is not None and len(probs):
        probs = combine.apply_temperature(probs, rule.temperature)
    return columns.records(tax, columns.columns_of(tax, probs, plan.top_n, rule is not None),
                        rule)


def score_products(scorer: BatchScorer, images: list, product_ids: np.ndarray,
                   cache: Optional[dict] = None):
    """(product ids, distributions, picture counts) of whole products' decoded pictures:
    the scorer's per-picture distributions aggregated as the predict job does."""
    acc = combine.ProductAccumulator(scorer.taxonomy.n_l3, aggregate_of(scorer.plan))
    acc.add(product_ids, *scorer.weighted(images, product_ids, cache))
    return acc.finish()


def _finished_frame(plan: ScoringPlan, tax: Taxonomy, finished, seen: Dict[int, _Product],
          keep: Optional[int]) -> Optional[pd.DataFrame]:
    """Product rows for every product seen and finished (all but ``keep``)."""
    ids, probs, _ = finished
    done = [pid for pid in seen if pid != keep]
    if not done:
        return None
    scored = {int(pid): i for i, pid in enumerate(ids.tolist())}
    made = predicted(plan, tax, probs)
    fallback = fallback_row(plan, tax)
    records = []
    for pid in sorted(done):
        meta = seen.pop(pid)
        i = scored.get(pid)
        records.append(product_record(pid, None if i is None else made[i], meta.decoded,
                                      meta.bad, meta.truth, fallback))
    return product_frame(records)


def fallback_row(plan: ScoringPlan, tax: Taxonomy) -> dict:
    return predictions.fallback_prediction(tax, plan.prior_category_id, plan.prior_share)


def product_record(pid: int, made: Optional[dict], decoded: int, bad: int, truth: tuple,
                   fallback: dict) -> dict:
    """A product's row: its predicted columns ``made`` (:func:`predicted`), or ``fallback``
    (the training prior) when no picture of it decoded (None)."""
    row = fallback if made is None else {**made, "image_count": decoded, "fallback": False}
    return {"product_id": pid, **row, "bad_image_count": bad,
            **dict(zip(predictions.TRUTH, truth))}


def product_frame(records: List[dict]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records, columns=predictions.SCORED_COLUMNS)
    return df.astype(predictions.PANDAS_DTYPES)
