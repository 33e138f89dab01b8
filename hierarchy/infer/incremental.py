"""Incremental predict: a product whose row is still current is not read, decoded or scored.

A nightly predict after ``ingest --append`` must cost the products that changed. Every row of
the predictions table carries two keys:

``input_digest``  the product's content digest (:mod:`hierarchy.contracts.digest`: category,
                  picture MD5s, unusable pictures), as the snapshot scored held it;
``scored_with``   a fingerprint of everything else that decides a model's answer: the
                  strategy and its parameters, each model file it loads (path, size, time
                  written), the calibration and the decision rule evaluate fitted, the
                  scoring options (aggregate, flips, top n) and the taxonomy.

A row is *current* when its partition (run, split, strategy) holds it with the same
``scored_with`` as this predict's and the same ``input_digest`` as the snapshot's, and the
models answered it. Predict reuses current rows as they are (their ``scored_at`` kept) and
scores the rest: new products, re-sent ones, every row of a partition a new ``evaluate`` or a
retrained model made stale. The pictures read are those of the part files holding a product to
score (found from the small product_id column), so a night's JPEG reads are the night's parts.
Rows not answered by the models are redone every time, because what they depend on moves
with the data, not the run: the training prior (``fallback``) and an exact copy's label
(``predict.duplicate_lookup``, applied again to every row). ``--rescore-all`` scores every
product.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Dict, List, Optional
from urllib.parse import unquote

from hierarchy.contracts import storage
from hierarchy.contracts.dataset import Dataset
from hierarchy.contracts.digest import DIGEST, product_digests
from hierarchy.contracts.predictions import PARTITIONS, SCORED_COLUMNS, TOP
from hierarchy.contracts.settings import Catalog
from hierarchy.infer.scoring import ScoringPlan

log = logging.getLogger(__name__)

SCORED_WITH = "scored_with"


def scored_with(plan: ScoringPlan) -> str:
    """The fingerprint of what decides a model's answer besides the product (module notes)."""
    m = plan.models
    files = []
    for ref in sorted(m.refs(), key=lambda r: r.key):
        info = storage.file_info(ref.path)
        files.append([ref.key, ref.path, info.size,
                      info.mtime.isoformat() if info.mtime else None])
    what = {"strategy": [m.strategy, m.base, [list(p) for p in m.params]],
            "models": files, "calibration": m.calibration,
            "untrained_branches": m.untrained_branches,
            "decision": m.decision.to_dict() if m.decision is not None else None,
            "params": [list(p) for p in plan.params], "aggregate": plan.aggregate,
            "tta_flip": plan.tta_flip, "top_n": plan.top_n,
            "taxonomy": hashlib.sha256(plan.taxonomy_json.encode()).hexdigest()}
    text = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def digests(spark, data: str, split: str, products, scratch: str):
    """(product_id, input_digest) of the split's products, from the small md5 column of
    images/, computed once into ``scratch`` (the reuse test and every row read them)."""
    from pyspark.sql import functions as F

    images = spark.read.parquet(Dataset(data).url("images")) \
        .where(F.col("split") == split).select("product_id", "img_idx", "md5")
    product_digests(products, images).write.parquet(storage.to_url(scratch))
    return spark.read.parquet(storage.to_url(scratch))


def current_rows(spark, catalog: Catalog, run_id: str, split: str, strategy: str, key: str,
                 product_digests_df, scratch: str):
    """The partition's rows still current for this snapshot and ``key`` (module notes),
    copied to ``scratch`` (the write that follows replaces the partition they are read
    from); None when the table does not exist yet or predates the keys."""
    from pyspark.sql import functions as F

    from hierarchy.infer import tables

    name = tables.table_name(catalog)
    if not spark.catalog.tableExists(name):
        return None
    have = {f.name for f in spark.table(name).schema.fields}
    if SCORED_WITH not in have or DIGEST not in have:
        return None  # a table written before rows carried their keys: score everything
    part = spark.table(name).where((F.col("run_id") == run_id) & (F.col("split") == split) &
                                   (F.col("strategy") == strategy))
    rows = (part.where((F.col(SCORED_WITH) == key) & (F.col("answered_by") == "model"))
                .join(product_digests_df, ["product_id", DIGEST], "left_semi"))
    rows.drop(*PARTITIONS).write.mode("overwrite").parquet(storage.to_url(scratch))
    return spark.read.parquet(storage.to_url(scratch))


def as_scored(rows, strategy: str):
    """Table rows back in the scorer's columns (top5 as its two arrays), with their
    ``strategy`` and ``scored_at``: they go through the same finishing as new rows."""
    from pyspark.sql import functions as F

    top = {TOP[0]: F.expr("transform(top5, x -> x.category_id)"),
           TOP[1]: F.expr("transform(top5, x -> x.probability)")}
    return rows.select(*[top[c].alias(c) if c in top else F.col(c) for c in SCORED_COLUMNS],
                       F.lit(strategy).alias("strategy"), "scored_at")


def files_holding(spark, data: str, split: str, ids) -> List[str]:
    """The part files of ``split`` holding a picture of a product of ``ids``: found from the
    product_id column alone, so the JPEG pass reads only these."""
    from pyspark.sql import functions as F

    images = spark.read.parquet(Dataset(data).url("images")).where(F.col("split") == split)
    files = (images.select("product_id", F.input_file_name().alias("_file"))
                   .join(ids, "product_id", "left_semi").select("_file").distinct().collect())
    return sorted(unquote(r._file) for r in files)


def read_image_files(spark, data: str, split: str, files: List[str], columns: List[str]):
    """The pictures of ``split`` in ``files`` only (its partition column kept)."""
    from pyspark.sql import functions as F

    return (spark.read.option("basePath", Dataset(data).url("images")).parquet(*files)
                 .where(F.col("split") == split).select(*columns))


def keyed(rows, product_digests_df, keys: Dict[str, str]):
    """``rows`` with each product's ``input_digest`` and its strategy's ``scored_with``."""
    from pyspark.sql import functions as F

    key = F.create_map(*[F.lit(x) for s, k in keys.items() for x in (s, k)])[F.col("strategy")]
    return rows.join(product_digests_df, "product_id", "left").withColumn(SCORED_WITH, key)


def summary(kept: Optional[int], total: int) -> dict:
    return {"reused": kept or 0, "scored": total - (kept or 0)}
