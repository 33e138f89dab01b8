"""Fit the decision rule of each strategy on the val split (:mod:`hierarchy.infer.decide`),
and make val's table rows with it, from one scoring pass.

The pass scores val exactly as predict scores (images grouped by product and sorted, each
strategy's per-picture distributions aggregated per product, models loaded once per Python
worker and run once per picture for every strategy: :class:`PartitionPass`). Out of it come
two kinds of row, kept on the executors' disks:
  statistics  each task reduces its products to sums over the temperature and threshold
              grids (:func:`hierarchy.infer.decide.add_stats`): ``partitions`` x strategies
              rows of a few thousand numbers reach the driver, whatever the size of val;
  summaries   per product and strategy, what its table row is made of at every temperature of
              the grid (:func:`hierarchy.infer.columns.at_temperatures`, about 20 numbers a
              temperature), because the rule's temperature is known only once the statistics
              are summed.
The rules are fitted on the driver; :func:`table_rows` then makes each product's row under its
strategy's rule from the summaries, with no model run again: the same code predict runs, so the
same row to the last digit. Val is cut into two parts by a hash of the product id
(``decide.calibration_share`` of the products calibrate): the fit part chooses the
temperature (and, for the ``hierarchical`` strategy, its correction), the calibration part
certifies the threshold."""

from __future__ import annotations

import logging
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd

from hierarchy.contracts import predictions
from hierarchy.contracts.settings import Decide, Settings
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.infer import columns, combine, decide, fit
from hierarchy.infer.scoring import (
    PartitionPass,
    ScoringPlan,
    aggregate_of,
    fallback_row,
    nullable_int,
    product_frame,
    product_record,
    whole_products,
)

log = logging.getLogger(__name__)

HASH_SALT = "hierarchy.decide"   # a hash of its own: independent of calibrate's sampling
HASH_MOD = 1000003


def calibration_part(share: float):
    """Spark column: 1 for a val product of the calibration part, 0 for the fit part."""
    from pyspark.sql import functions as F

    h = F.abs(F.xxhash64(F.lit(HASH_SALT), F.col("product_id"))) % HASH_MOD
    return (h < F.lit(share * HASH_MOD)).cast("int")


def grids_of(dcfg: Decide) -> decide.Grids:
    temps = set(dcfg.temperatures) | {1.0}
    if dcfg.temperature:
        temps.add(dcfg.temperature)
    return decide.Grids(temperatures=tuple(sorted(temps)),
                        support_edges=tuple(dcfg.support_bands))


# what a product's row is made of, its counts and truth typed as the table types them
_KEPT = ("product_id", "image_count", "bad_image_count", *predictions.TRUTH)
SUMMARY_DDL = ("strategy string, scored boolean, "
               + ", ".join(f"{c} {predictions.SCORED_TYPES[c]}" for c in _KEPT)
               + f", {columns.PACKED_DDL}, stats array<double>")
SUMMARY_COLUMNS = [c.split()[0] for c in SUMMARY_DDL.split(", ")]
_TRUTH_DTYPES = {c: predictions.PANDAS_DTYPES[c] for c in predictions.TRUTH}


def evaluation_partitions(plans: Dict[str, ScoringPlan], grids: decide.Grids,
                          levels: Tuple[int, ...], support: Optional[np.ndarray] = None):
    """``mapInPandas`` function: val image batches (sorted by product, with ``part``) -> the
    summaries of each product under each strategy of ``plans``, then one row of summed
    decision statistics per strategy (see the module notes)."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        scored = PartitionPass(plans)
        nodes = decide.Nodes.of(scored.taxonomy)
        stats = {name: decide.empty_stats(grids) for name in plans}
        for pdf in whole_products(batches):
            got = scored.add(pdf)
            _add_stats(stats, got, pdf, plans, nodes, grids, levels, support)
            out = _summaries(scored, scored.finished(), grids, keep=scored.last)
            if out is not None:
                yield out
        out = _summaries(scored, scored.finished(final=True), grids, keep=None)
        if out is not None:
            yield out
        yield pd.DataFrame({c: [None] * len(stats) for c in SUMMARY_COLUMNS}, dtype=object) \
            .assign(strategy=list(stats), stats=[decide.flatten(s) for s in stats.values()])

    return run


def _add_stats(stats: dict, got: dict, pdf: pd.DataFrame, plans: Dict[str, ScoringPlan],
               nodes: decide.Nodes, grids: decide.Grids, levels: Tuple[int, ...],
               support: Optional[np.ndarray]) -> None:
    """Each strategy's products of this batch (whole: :func:`whole_products`) into its
    statistics; a product no picture of which decoded is never in the fit (it goes to
    review), nor is one without a label."""
    first = pdf.drop_duplicates("product_id").set_index("product_id")
    for name, (pids, weighted) in got.items():
        acc = combine.ProductAccumulator(nodes.taxonomy.n_l3, aggregate_of(plans[name]))
        acc.add(pids, *weighted)
        ids, probs, _ = acc.finish()
        truth, part = first.loc[ids, "l3"], first.loc[ids, "part"]
        labelled = truth.notna().to_numpy()
        if not labelled.all():
            probs, truth, part = probs[labelled], truth[labelled], part[labelled]
        decide.add_stats(stats[name], probs, truth.to_numpy(np.int64), part.to_numpy(np.int64),
                         nodes, grids, levels, support)


def _summaries(scored: PartitionPass, finished: dict, grids: decide.Grids,
               keep: Optional[int]) -> Optional[pd.DataFrame]:
    """The summary rows of the products finished (all but ``keep``) under every strategy, in
    one frame (a frame's fixed cost is paid once a batch, not once a strategy)."""
    records = []
    for name, plan in scored.plans.items():
        ids, probs, _ = finished[name]
        seen = scored.seen[name]
        done = sorted(pid for pid in seen if pid != keep)
        if not done:
            continue
        index = {int(pid): i for i, pid in enumerate(ids.tolist())}
        packed = columns.pack(columns.at_temperatures(scored.taxonomy, probs, plan.top_n,
                                                      grids.temperatures))
        for pid in done:
            meta, i = seen.pop(pid), index.get(pid)
            records.append({"strategy": name, "product_id": pid, "scored": i is not None,
                            "image_count": meta.decoded, "bad_image_count": meta.bad,
                            **dict(zip(predictions.TRUTH, meta.truth)),
                            **{k: None if i is None else v[i] for k, v in packed.items()},
                            "stats": None})
    return pd.DataFrame.from_records(records, columns=SUMMARY_COLUMNS).astype(_TRUTH_DTYPES) \
        if records else None


def score_and_fit(spark, cfg: Settings, plans: Dict[str, ScoringPlan], grouped,
                  support: Optional[np.ndarray] = None
                  ) -> Tuple[object, Dict[str, Tuple[decide.DecisionRule, dict]]]:
    """(the summaries, persisted: unpersist them after :func:`table_rows`' rows are written;
    {strategy: (its rule, its val figures)}) of every plan, from one pass over ``grouped``
    (val's pictures from :func:`hierarchy.infer.pipeline.grouped_split`); ``support``: train
    products per leaf (:func:`hierarchy.infer.pipeline.train_support`), for the figures by
    band."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    dcfg = cfg.decide
    grids = grids_of(dcfg)
    images = grouped.withColumn("part", calibration_part(dcfg.calibration_share))
    summaries = images.mapInPandas(evaluation_partitions(plans, grids, dcfg.levels, support),
                                   SUMMARY_DDL).persist(StorageLevel.DISK_ONLY)
    rows = (summaries.where(F.col("product_id").isNull()).select("strategy", "stats")
            .collect())  # one small row per partition and strategy
    return summaries, fit_rules(rows, plans, dcfg, grids)


def fit_rules(rows, plans: Dict[str, ScoringPlan], dcfg: Decide, grids: decide.Grids
              ) -> Dict[str, Tuple[decide.DecisionRule, dict]]:
    """{strategy: (its rule, its val figures)} from the tasks' statistics rows."""
    stats = {name: decide.empty_stats(grids) for name in plans}
    for r in rows:
        for k, v in decide.unflatten(r.stats, grids).items():
            stats[r.strategy][k] += v
    forced = dcfg.temperature or None
    out = {}
    for name in plans:
        rule, figures = fit.fit_rule(stats[name], grids, dcfg.target_precision,
                                        dcfg.levels, dcfg.confidence, temperature=forced,
                                        certifier=dcfg.rule)
        if rule.threshold is None:
            log.warning("decisions (%s): nothing will be filed — %s", name, rule.reason)
        out[name] = rule, figures
    return out


def table_rows(summaries, plans: Dict[str, ScoringPlan], grids: decide.Grids):
    """Val's scored product rows (:data:`predictions.SCORED_BY_STRATEGY_DDL`) from the summaries of
    :func:`score_and_fit`, each under its strategy's fitted rule (``plans`` carry them)."""
    from pyspark.sql import functions as F

    return (summaries.where(F.col("product_id").isNotNull()).drop("stats")
            .mapInPandas(rows_from_summaries(plans, grids),
                         predictions.SCORED_BY_STRATEGY_DDL))


def rows_from_summaries(plans: Dict[str, ScoringPlan], grids: decide.Grids):
    """``mapInPandas`` function: summary batches -> product rows, as predict makes them
    (:func:`hierarchy.infer.scoring.predicted` at the rule's temperature)."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        tax = Taxonomy.from_json(next(iter(plans.values())).taxonomy_json)
        temps = list(grids.temperatures)
        for pdf in batches:
            records, names = [], []
            for name, part in pdf.groupby("strategy", sort=False):
                records += _strategy_records(name, plans[name], tax, part, temps)
                names += [name] * len(part)
            if records:  # one frame a batch, as the summaries
                yield product_frame(records).assign(strategy=names)

    return run


def _strategy_records(name: str, plan: ScoringPlan, tax: Taxonomy, part: pd.DataFrame,
                      temps: list) -> List[dict]:
    rule = plan.models.decision
    if rule is None or rule.temperature not in temps:
        raise RuntimeError(f"strategy {name}: no rule fitted on the grid "
                           f"temperatures {temps}")
    scored = part[part["scored"].to_numpy(bool)]
    made = iter(columns.records(tax, columns.unpack({k: scored[k].tolist()
                                                  for k in columns.PACKED},
                                                 len(temps), temps.index(rule.temperature)),
                             rule) if len(scored) else [])
    fallback = fallback_row(plan, tax)
    return [product_record(int(r.product_id), next(made) if r.scored else None,
                           int(r.image_count), int(r.bad_image_count),
                           tuple(nullable_int(getattr(r, c)) for c in predictions.TRUTH),
                           fallback)
            for r in part.itertuples(index=False)]


def val_part_filter(dcfg: Decide):
    """Spark column: the val products of the fit part (what calibrate may fit on)."""
    return calibration_part(dcfg.calibration_share) == 0
