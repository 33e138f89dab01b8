"""The predict job as extract / transform / load.

extract    the split's images from ``images/`` (Parquet; JPEG bytes stay in the executors),
           its products from ``products/``, the training prior;
transform  images repartitioned by product and sorted, scored per partition with the models
           loaded once per Python worker (:mod:`hierarchy.infer.scoring`), plus a fallback row
           for every product that has no usable picture at all;
load       the ``predictions`` table partition of (run id, split, strategy), then — for the
           test split — ``submission.csv``, published only after it has been checked to hold
           exactly one row per product.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import numpy as np

from hierarchy.contracts import predictions, storage
from hierarchy.contracts.dataset import TEST, TRAIN, VAL, Dataset, kind_of_split
from hierarchy.contracts.errors import UsageError
from hierarchy.contracts.manifest import Manifest
from hierarchy.contracts.settings import Decide, Settings
from hierarchy.contracts.strategies import Spec
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.infer import decide, tables
from hierarchy.infer import incremental as incremental_
from hierarchy.infer.modelset import ModelSet, ScoringRefused, load_modelset
from hierarchy.infer.scoring import INPUT_COLUMNS, ScoringPlan, plan_params, score_partitions

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- extract
def read_images(spark, data: str, split: str):
    from pyspark.sql import functions as F

    df = spark.read.parquet(Dataset(data).url("images"))
    return df.where(F.col("split") == split).select(*INPUT_COLUMNS)


def read_products(spark, data: str, split: str, kind: Optional[str] = None):
    """Products of one split (of ingest kind ``kind``, by default the split's own)."""
    from pyspark.sql import functions as F

    df = spark.read.parquet(Dataset(data).url("products"))
    return df.where((F.col("kind") == (kind or kind_of_split(split))) & (F.col("split") == split))


def training_prior(spark, data: str):
    """(most frequent training category, its share of training products): the answer for a
    product with no usable picture. An aggregate: nothing but one row reaches the driver."""
    from pyspark.sql import functions as F

    counts = read_products(spark, data, TRAIN).groupBy("category_id").count()
    best = counts.orderBy(F.desc("count"), F.asc("category_id")).first()
    if best is None:
        raise ScoringRefused(f"{data}: no training products, so no prior for products without "
                           f"a usable picture — ingest the train dump first")
    total = counts.agg(F.sum("count")).first()[0]
    return int(best.category_id), float(best["count"]) / float(total)


def train_support(spark, data: str, taxonomy: Taxonomy) -> np.ndarray:
    """Train products per leaf [n_l3], in the taxonomy's leaf order: what the decisions'
    figures band products by. An aggregate of one row per category reaches the driver."""
    counts = np.zeros(taxonomy.n_l3, dtype=np.int64)
    known = set(taxonomy.category_ids)
    for row in read_products(spark, data, TRAIN).groupBy("category_id").count().collect():
        if row.category_id is not None and int(row.category_id) in known:
            counts[taxonomy.l3_of_category(int(row.category_id))] += int(row["count"])
    return counts


# ----------------------------------------------------------------------------- transform
def by_product(images, partitions: int):
    """Image rows whatever their partitioning on input -> every product's pictures in one
    task (repartition by product_id), contiguous and in order (sorted), so a scorer can
    aggregate a product that spans Arrow batches exactly once. ``partitions`` 0: as read."""
    parts = partitions or max(1, images.rdd.getNumPartitions())
    return images.repartition(parts, "product_id").sortWithinPartitions("product_id", "img_idx")


def grouped_split(spark, data: str, split: str, partitions: int, persist: bool = True):
    """A split's pictures grouped by product (:func:`by_product`); ``persist``: grouped once
    and kept on the executors' disks for several passes (evaluate's two when it fits the
    hierarchical strategy), each pass then skipping the read and the shuffle of the JPEG
    bytes. ``unpersist()`` it after the last."""
    from pyspark import StorageLevel

    grouped = by_product(read_images(spark, data, split), partitions)
    return grouped.persist(StorageLevel.DISK_ONLY) if persist else grouped


def score(images, plans: Dict[str, ScoringPlan], partitions: int):
    """Product rows of every strategy of ``plans`` from image rows, in one pass
    (:func:`by_product`, then the scorer), with a ``strategy`` column."""
    return by_product(images, partitions).mapInPandas(score_partitions(plans),
                                                      predictions.SCORED_BY_STRATEGY_DDL)


def fallback_rows(products, images, taxonomy: Taxonomy, prior: tuple,
                  strategies: Sequence[str] = ()):
    """Products of the split with no row in images/ (every picture quarantined at ingest):
    the same row the scorer gives a product none of whose pictures decodes
    (:func:`hierarchy.contracts.predictions.fallback_prediction`), once per strategy of
    ``strategies`` (with a ``strategy`` column) when given. Only the product_id column of
    images/ is read."""
    from pyspark.sql import functions as F

    row = predictions.fallback_prediction(taxonomy, *prior)
    per_product = {"product_id": F.col("product_id"),
                   "bad_image_count": F.col("n_bad_images"),
                   "true_category_id": F.col("category_id"), "true_l1": F.col("l1"),
                   "true_l2": F.col("l2"), "true_l3": F.col("l3")}
    missing = products.join(images.select("product_id").distinct(), "product_id", "left_anti")
    rows = missing.select(*[
        (per_product[name] if name in per_product else F.lit(row[name]))
        .cast(predictions.SCORED_TYPES[name]).alias(name)
        for name in predictions.SCORED_COLUMNS])
    if not strategies:
        return rows
    return rows.crossJoin(F.broadcast(products.sparkSession.createDataFrame(
        [(s,) for s in strategies], "strategy string")))


def finish_rows(rows, run_id: str, split: str, taxonomy: Taxonomy,
                strategy: Optional[str] = None):
    """The table's columns; ``strategy`` None: the rows carry their own. Every row names
    ``taxonomy``'s version: a reused row is current only under the same table
    (:mod:`hierarchy.infer.incremental`), so it is this one too."""
    from pyspark.sql import functions as F

    top5 = F.expr("transform(arrays_zip(top_category_id, top_probability), "
                  "x -> named_struct('category_id', x.top_category_id, "
                  "'probability', x.top_probability))")
    if "answered_by" not in rows.columns:
        rows = rows.withColumn("answered_by", F.when(F.col("fallback"), F.lit("prior"))
                               .otherwise(F.lit("model")))
    # a reused row keeps the time it was scored
    scored_at = F.coalesce(F.col("scored_at"), F.current_timestamp()) \
        if "scored_at" in rows.columns else F.current_timestamp()
    return (rows.withColumn("top5", top5)
                .withColumn("scored_at", scored_at)
                .withColumn("taxonomy_version", F.lit(taxonomy.fingerprint))
                .withColumn("run_id", F.lit(run_id))
                .withColumn("split", F.lit(split))
                .withColumn("strategy", F.col("strategy") if strategy is None
                            else F.lit(strategy))
                .select(*predictions.TABLE_COLUMNS))


def duplicate_answers(spark, data: str, split: str, taxonomy: Taxonomy):
    """Products of ``split`` one of whose pictures is an exact copy (same MD5) of a training
    picture, when every such copy carries one and the same category: that category's
    prediction columns, confidence 1. Copies flagged placeholder or conflicting_labels, and
    pictures a reviewer dropped, never answer; a reviewer's relabel does. Reads the curation
    table's key columns only."""
    from pyspark.sql import functions as F

    from hierarchy.contracts import curation as ct

    cur = spark.read.parquet(storage.to_url(ct.curation_path(data)))
    usable = ~F.col("placeholder") & ~F.col("conflicting_labels") & \
        (F.coalesce(F.col("review"), F.lit("")) != "drop")
    label = F.when(F.col("review") == "relabel", F.col("review_category_id")) \
        .otherwise(F.col("category_id"))
    train = (cur.where((F.col("split") == TRAIN) & usable)
                .select("md5", label.alias("answer")).where(F.col("answer").isNotNull())
                .distinct())
    mine = cur.where(F.col("split") == split).select("product_id", "md5")
    answers = (mine.join(train, "md5").groupBy("product_id")
                   .agg(F.countDistinct("answer").alias("n"), F.first("answer").alias("answer"))
                   .where("n = 1").select("product_id", "answer"))
    def answer(l3: int) -> dict:
        # an exact copy of a training picture with one label: filed at that leaf
        cat = int(taxonomy.category_of_l3(l3))
        return {**predictions.leaf_prediction(taxonomy, l3, 1.0, [cat], [1.0],
                                         int(taxonomy.l1_of_l3[l3]), 1.0),
                "decision_level": 3, "decision_id": cat,
                "decision_name": decide.Nodes.of(taxonomy).name(3, l3),
                "decision_probability": 1.0}

    rows = [answer(l3) for l3 in range(taxonomy.n_l3)]
    leaves = spark.createDataFrame(
        [(int(taxonomy.category_of_l3(l3)), *row.values()) for l3, row in enumerate(rows)],
        ", ".join(["answer long"] + [f"{k} {predictions.SCORED_TYPES[k]}" for k in rows[0]]))
    return answers.join(F.broadcast(leaves), "answer").drop("answer")


def apply_duplicates(rows, answers):
    """``rows`` with the predicted columns of the products ``answers`` has replaced, and
    ``answered_by`` saying who answered each product."""
    from pyspark.sql import functions as F

    predicted = [c for c in answers.columns if c != "product_id"]
    joined = rows.join(answers.select("product_id", *[F.col(c).alias(f"_dup_{c}")
                                                      for c in predicted],
                                      F.lit(True).alias("_dup")), "product_id", "left")
    out = joined.select(
        *[F.when(F.col("_dup"), F.col(f"_dup_{c}")).otherwise(F.col(c)).alias(c)
          if c in predicted else
          # a product whose pictures did not decode is no longer on the prior once answered
          (F.col(c) & F.col("_dup").isNull()).alias(c) if c == "fallback" else F.col(c)
          for c in rows.columns],
        F.when(F.col("_dup"), F.lit("duplicate")).when(F.col("fallback"), F.lit("prior"))
         .otherwise(F.lit("model")).alias("answered_by"))
    return out


# ----------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class CheckedPredict:
    manifest: Manifest
    taxonomy: Taxonomy
    modelset: ModelSet


def check_predict(data: str, models: str, run_id: str, split: str, strategy: Union[str, Spec],
                  output: str, duplicate_lookup: bool = False) -> CheckedPredict:
    """Everything predict can refuse without Spark: the folders (exit 2), a dataset that is
    not complete, a missing model or one of another taxonomy (exit 3)."""
    if split not in (TEST, VAL):
        raise UsageError(f"--split {split!r}: expected test or val")
    if duplicate_lookup:
        from hierarchy.contracts.curation import has_curation

        if not has_curation(data):
            raise ScoringRefused(f"{data}: predict.duplicate_lookup needs the curation table — "
                               f"run `hierarchy curate --data {data}` first (or set "
                               f"predict.duplicate_lookup=false)")
    storage.require_dir(data, "--data")
    storage.require_dir(models, "--models")
    storage.require_writable_dir(output, "--output")
    dataset = Dataset(data)
    manifest = dataset.require_complete([kind_of_split(split)])
    taxonomy = dataset.taxonomy()
    if manifest.fingerprint != taxonomy.fingerprint:
        raise ScoringRefused(f"{data}: taxonomy.json does not match manifest.json")
    return CheckedPredict(manifest, taxonomy, load_modelset(models, run_id, strategy, taxonomy))


def scoring_plan(spark, cfg: Settings, data: str, taxonomy: Taxonomy, modelset: ModelSet,
                 prior: Optional[tuple] = None) -> ScoringPlan:
    """What every scoring task gets (and sets the Arrow batch size it is fed with).
    ``prior``: :func:`training_prior`, when the caller already has it."""
    pcfg = cfg.predict
    prior = prior or training_prior(spark, data)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(pcfg.batch_size))
    return ScoringPlan(models=modelset, taxonomy_json=taxonomy.to_json(),
                       prior_category_id=prior[0], prior_share=prior[1],
                       params=plan_params(modelset, pcfg), aggregate=pcfg.aggregate,
                       tta_flip=pcfg.tta_flip,
                       top_n=pcfg.top_n, threads=pcfg.threads)


def run_predict(spark, cfg: Settings, data: str, models: str, run_id: str, split: str,
                strategy: str, output: str, checked: Optional[CheckedPredict] = None,
                rescore_all: bool = False) -> dict:
    """``checked``: what :func:`check_predict` already returned for these arguments;
    ``rescore_all``: score every product, even one whose row is current
    (:mod:`hierarchy.infer.incremental`)."""
    checked = checked or check_predict(data, models, run_id, split, strategy, output,
                                       cfg.predict.duplicate_lookup)
    return run_scoring(spark, cfg, data, models, run_id, split, {strategy: checked},
                       output, incremental=not rescore_all)[strategy]


def run_scoring(spark, cfg: Settings, data: str, models: str, run_id: str, split: str,
                checked: Dict[str, CheckedPredict], output: str,
                prior: Optional[tuple] = None, grouped=None, scored=None,
                incremental: bool = False) -> Dict[str, dict]:
    """Score ``split`` under every strategy of ``checked`` (each :func:`check_predict`ed) in
    one pass over its pictures, each model run once per picture, into the strategies'
    partitions of the predictions table; {strategy: its result}. A test split also gets
    its submission (predict scores one strategy). ``prior``: :func:`training_prior`, when
    the caller has it; ``grouped``: the split's pictures from :func:`grouped_split`;
    ``scored``: the split's scored product rows when the caller already made them (evaluate,
    :func:`hierarchy.evaluate.decisions.table_rows`), written instead of scoring again;
    ``incremental``: a single strategy's current rows reused (predict's default)."""
    t0 = time.time()
    strategies = list(checked)
    if split == TEST and len(strategies) != 1:
        raise UsageError("the test split is scored one strategy at a time (one submission)")
    first = checked[strategies[0]]
    taxonomy = first.taxonomy
    for strategy in strategies:
        note_decision_rule(cfg.decide, checked[strategy].modelset, data, models, run_id)
    tables.table_location(spark, cfg.catalog)  # a table registered elsewhere: refused first
    products = read_products(spark, data, split)
    # before any scoring: a submission must hold one row per product id
    tables.check_unique_products(products, f"{data} products of split {split}")
    prior = prior or training_prior(spark, data)
    plans = {s: scoring_plan(spark, cfg, data, taxonomy, checked[s].modelset, prior)
             for s in strategies}
    keys = {s: incremental_.scored_with(plans[s]) for s in strategies}
    with storage.scratch_folder(output, "predict") as scratch:
        digests = incremental_.digests(spark, data, split, products,
                                       storage.join(scratch, "digests"))
        kept = None
        if incremental and scored is None and grouped is None and len(strategies) == 1:
            kept = incremental_.current_rows(spark, cfg.catalog, run_id, split, strategies[0],
                                             keys[strategies[0]], digests,
                                             storage.join(scratch, "current"))
        rows = _split_rows(spark, cfg, data, split, plans, products, taxonomy, prior, grouped,
                           scored, kept)
        final = finish_rows(incremental_.keyed(rows, digests, keys), run_id, split,
                            taxonomy)
        return _publish(spark, cfg, run_id, split, checked, output, final, products, plans,
                        kept, t0)


def _publish(spark, cfg: Settings, run_id: str, split: str, checked: Dict[str, CheckedPredict],
             output: str, final, products, plans: Dict[str, ScoringPlan], kept,
             t0: float) -> Dict[str, dict]:
    """Write the rows into the strategies' partitions, check and write the submission;
    {strategy: its result}."""
    from pyspark.sql import functions as F

    from hierarchy.spark import run_with_progress

    pcfg = cfg.predict
    strategies = list(checked)
    branches = sorted({dict(p.params)["top_branches"] for p in plans.values()
                       if "top_branches" in dict(p.params)})
    log.info("scoring split %s with run %s (%s%s)", split, run_id, ", ".join(strategies),
             f", top-{'/'.join(map(str, branches))} branches" if any(branches) else "")
    partitions = [{"run_id": run_id, "split": split, "strategy": s} for s in strategies]
    name, location = run_with_progress(spark, f"predict {split}",
                                       lambda: tables.write_predictions(spark, final,
                                                                        cfg.catalog,
                                                                        partitions),
                                       enabled=pcfg.progress)
    review_view = tables.create_review_view(spark, cfg.catalog)
    written = spark.table(name).where(
        (F.col("run_id") == run_id) & (F.col("split") == split) &
        F.col("strategy").isin(strategies))
    stats = _written_stats(written)
    reused = kept.count() if kept is not None else 0
    results = {s: {"run_id": run_id, "split": split, "strategy": s, "table": name,
                   "review_view": review_view, "table_path": location,
                   **_result_counts(stats.get(s), checked[s].modelset)} for s in strategies}
    for r in results.values():
        r["reused"], r["scored"] = reused, r["products"] - reused
    if split == TEST:
        (strategy,) = strategies
        sub = written.select(F.col("product_id").alias("_id"), "category_id")
        tables.check_submission_rows(sub, products)
        results[strategy]["submission"] = tables.write_submission(
            sub, output, pcfg.submission_gzip)
    seconds = round(time.time() - t0, 2)
    for result in results.values():
        result["seconds"] = seconds
    return results


def _split_rows(spark, cfg: Settings, data: str, split: str, plans: Dict[str, ScoringPlan],
                products, taxonomy: Taxonomy, prior: tuple, grouped, scored=None, kept=None):
    """Every product's row under every strategy of ``plans``: scored from its pictures
    (unless ``scored`` already holds these rows, or ``kept`` a current one: then only the
    part files holding the other products are read), the fallback row for a product with
    none, an exact copy's training label first when ``predict.duplicate_lookup`` is on."""
    from pyspark.sql import functions as F

    if kept is not None:
        products = products.join(kept.select("product_id"), "product_id", "left_anti")
        todo = products.select("product_id")
        files = incremental_.files_holding(spark, data, split, todo)
        images = incremental_.read_image_files(spark, data, split, files, INPUT_COLUMNS) \
            .join(todo, "product_id", "left_semi") if files else \
            read_images(spark, data, split).limit(0)
    else:
        images = read_images(spark, data, split)
    if scored is None:
        scored = score(images, plans, cfg.predict.partitions) if grouped is None else \
            grouped.mapInPandas(score_partitions(plans), predictions.SCORED_BY_STRATEGY_DDL)
    rows = scored.unionByName(fallback_rows(products, images, taxonomy, prior, list(plans)))
    rows = rows.withColumn("scored_at", F.lit(None).cast("timestamp"))
    if kept is not None:
        rows = rows.unionByName(incremental_.as_scored(kept, next(iter(plans))))
    if cfg.predict.duplicate_lookup:
        rows = apply_duplicates(rows, duplicate_answers(spark, data, split, taxonomy))
    return rows


def _written_stats(written) -> dict:
    """{strategy: a Row of its counts} of the partitions just written (one small job)."""
    from pyspark.sql import functions as F

    return {r.strategy: r for r in written.groupBy("strategy").agg(
        F.count("*").alias("products"),
        F.sum((F.col("answered_by") == "duplicate").cast("int")).alias("duplicates"),
        F.sum(F.col("fallback").cast("int")).alias("fallback"),
        *[F.sum((F.col("decision_level") == level).cast("int")).alias(f"decided_{level}")
          for level in (3, 2, 1, 0)],
        F.sum("image_count").alias("images"),
        F.sum("bad_image_count").alias("bad_images")).collect()}  # a row per strategy


def _result_counts(st, modelset: ModelSet) -> dict:
    return {"products": int(st.products) if st else 0,
            "images": int(st.images or 0) if st else 0,
            "bad_images": int(st.bad_images or 0) if st else 0,
            "fallback": int(st.fallback or 0) if st else 0,
            "answered_by_duplicate": int(st.duplicates or 0) if st else 0,
            "untrained_branches": modelset.untrained_branches,
            "decisions": None if modelset.decision is None else
            {str(level): int((st[f"decided_{level}"] if st else 0) or 0)
             for level in (3, 2, 1, 0)}}


def note_decision_rule(dcfg: Decide, modelset: ModelSet, data: str, models: str,
                       run_id: str) -> None:
    """One line when the table's decision columns will be null (no rule fitted for this
    strategy) or follow a rule fitted for another target than the configuration's."""
    rule = modelset.decision
    if rule is None:
        log.warning("run %s has no decision rule for strategy %s: the decision columns stay "
                    "null — fit one with `hierarchy evaluate --data %s --models %s --run-id %s "
                    "--output DIR`", run_id, modelset.strategy, data, models, run_id)
    elif (rule.target, set(rule.levels)) != (dcfg.target_precision,
                                             set(dcfg.levels)):
        log.warning("run %s's decision rule was fitted for precision %g at levels %s, not the "
                    "configured %g at %s: it is applied as fitted — run evaluate again to fit "
                    "the configured one", run_id, rule.target, list(rule.levels),
                    dcfg.target_precision, list(dcfg.levels))


def summary(result: dict) -> str:
    lines = [f"predictions: {result['products']} products ({result['images']} images, "
             f"{result['bad_images']} undecodable, {result['fallback']} on the training prior"
             f", {result.get('answered_by_duplicate', 0)} by a duplicate of a training picture)"
             f" -> table {result['table']} at {result['table_path']}"
             f" (run_id={result['run_id']}, split={result['split']}, "
             f"strategy={result['strategy']})"]
    d = result.get("decisions")
    if d:
        lines.append(f"decisions: {d['3']} filed at a leaf, {d['2']} at level 2, {d['1']} at "
                     f"level 1, {d['0']} to review (view {result.get('review_view', '')})")
    if "reused" in result:
        lines.append(f"scored {result['scored']} product(s), reused {result['reused']} "
                     f"current row(s)")
    if result.get("submission"):
        lines.append(f"submission: {result['submission']}")
    if result.get("untrained_branches"):
        lines.append(f"note: branches {result['untrained_branches']} had no training images; "
                     f"their leaves share the branch's probability evenly")
    return "\n".join(lines)

