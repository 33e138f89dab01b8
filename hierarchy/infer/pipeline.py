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

import time
from dataclasses import dataclass
from typing import Optional

from hierarchy import storage
from hierarchy.errors import UsageError
from hierarchy.infer import tables
from hierarchy.infer.modelset import ModelSet, PredictError, load_modelset
from hierarchy.infer.scoring import INPUT_COLUMNS, SCORED_SCHEMA, ScoringPlan, score_partitions
from hierarchy.ingest.manifest import load_taxonomy, require_complete
from hierarchy.taxonomy import Taxonomy

SPLIT_KIND = {"test": "test", "val": "train"}


# ----------------------------------------------------------------------------- extract
def read_images(spark, data: str, split: str):
    from pyspark.sql import functions as F

    df = spark.read.parquet(storage.to_url(storage.join(data, "images")))
    return df.where(F.col("split") == split).select(*INPUT_COLUMNS)


def read_products(spark, data: str, split: str, kind: Optional[str] = None):
    """Products of one split (of ingest kind ``kind``, by default the split's own)."""
    from pyspark.sql import functions as F

    df = spark.read.parquet(storage.to_url(storage.join(data, "products")))
    return df.where((F.col("kind") == (kind or SPLIT_KIND[split])) & (F.col("split") == split))


def training_prior(spark, data: str):
    """(most frequent training category, its share of training products): the answer for a
    product with no usable picture. An aggregate: nothing but one row reaches the driver."""
    from pyspark.sql import functions as F

    counts = read_products(spark, data, "train", kind="train").groupBy("category_id").count()
    best = counts.orderBy(F.desc("count"), F.asc("category_id")).first()
    if best is None:
        raise PredictError(f"{data}: no training products, so no prior for products without "
                           f"a usable picture — ingest the train dump first")
    total = counts.agg(F.sum("count")).first()[0]
    return int(best.category_id), float(best["count"]) / float(total)


# ----------------------------------------------------------------------------- transform
def score(images, plan: ScoringPlan, partitions: int):
    """Product rows from image rows, whatever their partitioning on input: repartitioning by
    product_id puts all of a product's pictures in one task, sorting makes them contiguous so
    the scorer can aggregate a product that spans Arrow batches exactly once."""
    parts = partitions or max(1, images.rdd.getNumPartitions())
    return (images.repartition(parts, "product_id")
                  .sortWithinPartitions("product_id", "img_idx")
                  .mapInPandas(score_partitions(plan), SCORED_SCHEMA))


def fallback_rows(products, images, taxonomy: Taxonomy, prior: tuple):
    """Products of the split with no row in images/ (every picture quarantined at ingest):
    the training prior, flagged. Only the product_id column of images/ is read."""
    from pyspark.sql import functions as F

    cid, share = prior
    l3 = taxonomy.l3_of_category(cid)
    n1, n2, n3 = taxonomy.names_of_l3(l3)
    l1, l2 = int(taxonomy.l1_of_l3[l3]), int(taxonomy.l2_of_l3[l3])
    missing = products.join(images.select("product_id").distinct(), "product_id", "left_anti")
    return missing.select(
        "product_id", F.lit(cid).cast("long").alias("category_id"),
        F.lit(n1).alias("category_level1"), F.lit(n2).alias("category_level2"),
        F.lit(n3).alias("category_level3"), F.lit(l1).alias("l1"), F.lit(l2).alias("l2"),
        F.lit(l3).alias("l3"), F.lit(share).alias("confidence"),
        F.array(F.lit(cid).cast("long")).alias("top_category_id"),
        F.array(F.lit(share)).alias("top_probability"), F.lit(l1).alias("level1_id"),
        F.lit(n1).alias("level1_name"), F.lit(share).alias("level1_probability"),
        F.lit(0).alias("image_count"), F.col("n_bad_images").alias("bad_image_count"),
        F.lit(True).alias("fallback"), F.col("category_id").alias("true_category_id"),
        F.col("l1").alias("true_l1"), F.col("l2").alias("true_l2"),
        F.col("l3").alias("true_l3"))


def finish_rows(rows, run_id: str, split: str, strategy: str):
    from pyspark.sql import functions as F

    top5 = F.expr("transform(arrays_zip(top_category_id, top_probability), "
                  "x -> named_struct('category_id', x.top_category_id, "
                  "'probability', x.top_probability))")
    return (rows.withColumn("top5", top5)
                .withColumn("scored_at", F.current_timestamp())
                .withColumn("run_id", F.lit(run_id))
                .withColumn("split", F.lit(split))
                .withColumn("strategy", F.lit(strategy))
                .select(*tables.COLUMNS))


# ----------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class CheckedPredict:
    manifest: dict
    taxonomy: Taxonomy
    modelset: ModelSet


def check_predict(data: str, models: str, run_id: str, split: str, strategy: str,
                  output: str) -> CheckedPredict:
    """Everything predict can refuse without Spark: the folders (exit 2), a dataset that is
    not complete, a missing model or one of another taxonomy (exit 3)."""
    if split not in SPLIT_KIND:
        raise UsageError(f"--split {split!r}: expected test or val")
    storage.require_dir(data, "--data")
    storage.require_dir(models, "--models")
    storage.require_writable_dir(output, "--output")
    manifest = require_complete(data, [SPLIT_KIND[split]])
    taxonomy = load_taxonomy(data)
    if manifest["taxonomy"]["fingerprint"] != taxonomy.fingerprint:
        raise PredictError(f"{data}: taxonomy.json does not match manifest.json")
    return CheckedPredict(manifest, taxonomy, load_modelset(models, run_id, strategy, taxonomy))


def run_predict(spark, cfg, data: str, models: str, run_id: str, split: str, strategy: str,
                output: str, echo=print) -> dict:
    from pyspark.sql import functions as F

    from hierarchy.spark import run_with_progress

    pcfg = cfg["predict"]
    t0 = time.time()
    checked = check_predict(data, models, run_id, split, strategy, output)
    taxonomy, modelset = checked.taxonomy, checked.modelset
    products = read_products(spark, data, split)
    # before any scoring: a submission must hold one row per product id
    tables.check_unique_products(products, f"{data} products of split {split}")
    prior = training_prior(spark, data)
    plan = ScoringPlan(models=modelset, taxonomy_json=taxonomy.to_json(),
                       prior_category_id=prior[0], prior_share=prior[1],
                       top_k=int(pcfg["top_k"]), blend_weight=float(pcfg["blend_weight"]),
                       aggregate=pcfg["aggregate"], tta_flip=bool(pcfg["tta_flip"]),
                       top_n=int(pcfg["top_n"]), threads=int(pcfg["threads"]))
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(pcfg["batch_size"]))
    images = read_images(spark, data, split)
    rows = score(images, plan, int(pcfg["partitions"])).unionByName(
        fallback_rows(products, images, taxonomy, prior))
    final = finish_rows(rows, run_id, split, strategy)
    echo(f"scoring split {split} with run {run_id} ({strategy}"
         + (f", top-{plan.top_k} branches" if strategy != "flat" and plan.top_k else "")
         + ")")
    name = run_with_progress(spark, f"predict {split}",
                             lambda: tables.write_predictions(spark, final, output,
                                                              cfg["catalog"]),
                             enabled=bool(pcfg["progress"]))
    written = spark.table(name).where(
        (F.col("run_id") == run_id) & (F.col("split") == split) &
        (F.col("strategy") == strategy))
    stats = written.agg(F.count("*").alias("products"),
                        F.sum(F.col("fallback").cast("int")).alias("fallback"),
                        F.sum("image_count").alias("images"),
                        F.sum("bad_image_count").alias("bad_images")).first()
    result = {"run_id": run_id, "split": split, "strategy": strategy, "table": name,
              "table_path": tables.predictions_path(output),
              "products": int(stats.products), "images": int(stats.images or 0),
              "bad_images": int(stats.bad_images or 0), "fallback": int(stats.fallback or 0),
              "untrained_branches": modelset.untrained_branches}
    if split == "test":
        sub = written.select(F.col("product_id").alias("_id"), "category_id")
        tables.check_submission_rows(sub, products)
        result["submission"] = tables.write_submission(sub, output,
                                                       bool(pcfg["submission_gzip"]))
    result["seconds"] = round(time.time() - t0, 2)
    return result


def summary(result: dict) -> str:
    lines = [f"predictions: {result['products']} products ({result['images']} images, "
             f"{result['bad_images']} undecodable, {result['fallback']} on the training prior)"
             f" -> table {result['table']} at {result['table_path']}"
             f" (run_id={result['run_id']}, split={result['split']}, "
             f"strategy={result['strategy']})"]
    if result.get("submission"):
        lines.append(f"submission: {result['submission']}")
    if result.get("untrained_branches"):
        lines.append(f"note: branches {result['untrained_branches']} had no training images; "
                     f"their leaves share the branch's probability evenly")
    return "\n".join(lines)

