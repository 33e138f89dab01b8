"""Where predictions land: the ``predictions`` table and the Kaggle submission file.

The table is Parquet under ``<output>/predictions``, partitioned by ``run_id``, ``split`` and
``strategy``, registered as an external table in the Spark catalog (a Hive metastore: embedded
Derby locally, the cluster's when configured). Writes use dynamic partition overwrite, so
re-running a run id replaces exactly its own partition and never duplicates rows.
"""

from __future__ import annotations

from typing import Tuple

from hierarchy import storage
from hierarchy.infer.modelset import PredictError
from hierarchy.infer.schema import PARTITIONS, TABLE_COLUMNS


def table_name(catalog: dict) -> str:
    return f"{catalog['database']}.{catalog['table']}"


def predictions_path(output: str) -> str:
    return storage.to_url(storage.join(output, "predictions"))


def _location(spark, name: str) -> str:
    rows = spark.sql(f"DESCRIBE TABLE EXTENDED {name}").collect()
    for row in rows:
        if row.col_name == "Location":
            return row.data_type
    return ""


def _same_place(a: str, b: str) -> bool:
    strip = lambda u: u.replace("file://", "").replace("file:", "").rstrip("/")  # noqa: E731
    return strip(a) == strip(b)


def write_predictions(spark, df, output: str, catalog: dict) -> str:
    """Write ``df`` (one run_id/split/strategy) and make the catalog see it; returns the
    table name."""
    path = predictions_path(output)
    name = table_name(catalog)
    if spark.catalog.tableExists(name):
        where = _location(spark, name)
        if where and not _same_place(where, path):
            raise PredictError(
                f"table {name} lives at {where}, not {path}: score into that --output, or "
                f"name another table with catalog.table=... / catalog.database=...")
    (df.select(*TABLE_COLUMNS).write.mode("overwrite")
       .option("partitionOverwriteMode", "dynamic")
       .partitionBy(*PARTITIONS).parquet(path))
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {catalog['database']}")
    # schema and partition columns are inferred from the files just written
    spark.sql(f"CREATE TABLE IF NOT EXISTS {name} USING parquet LOCATION '{path}'")
    spark.sql(f"ALTER TABLE {name} RECOVER PARTITIONS")
    spark.sql(f"REFRESH TABLE {name}")
    return name


SAMPLE_IDS = 10  # ids named in a failed check's message


def _sample(df, column: str) -> str:
    """Up to SAMPLE_IDS values of ``column``, ascending, for a message (never a whole set)."""
    from pyspark.sql import functions as F

    ids = [r[0] for r in df.select(column).orderBy(F.asc(column)).limit(SAMPLE_IDS).collect()]
    return ", ".join(str(i) for i in ids)


def check_unique_products(products, what: str) -> None:
    """Refuse products/ rows that repeat a product id (a dataset ingested before duplicate ids
    were quarantined): the submission could not hold one row per product."""
    from pyspark.sql import functions as F

    dups = products.groupBy("product_id").count().where(F.col("count") > 1)
    n = dups.count()
    if n:
        raise PredictError(
            f"{what}: {n} product id(s) appear more than once (e.g. {_sample(dups, 'product_id')})"
            f"; re-ingest that dump: ingest keeps the first occurrence and quarantines the "
            f"others as duplicate_id")


def check_submission_rows(sub, products) -> Tuple[int, int]:
    """Exactly one row per product of the input: (rows, products), else PredictError naming
    the offending ids."""
    from pyspark.sql import functions as F

    ids = products.select(F.col("product_id").alias("_id")).distinct()
    stats = sub.agg(F.count("*").alias("rows"), F.countDistinct("_id").alias("ids")).first()
    n_products = ids.count()
    duplicated = sub.groupBy("_id").count().where(F.col("count") > 1)
    missing = ids.join(sub, "_id", "left_anti")
    extra = sub.join(ids, "_id", "left_anti")
    problems = []
    for name, df in (("duplicated", duplicated), ("missing", missing), ("unknown", extra)):
        n = df.count()
        if n:
            problems.append(f"{n} {name} (e.g. {_sample(df, '_id')})")
    if problems:
        raise PredictError(
            f"submission check failed: {stats.rows} rows for {n_products} products: "
            + "; ".join(problems) + "; nothing was published")
    return stats.rows, n_products


def write_submission(sub, output: str, gzip: bool) -> str:
    """One CSV file ``_id,category_id`` sorted by ``_id`` (as Kaggle's sample is), written
    by Spark to a staging folder and moved into place, so a reader never sees half a file."""
    import uuid

    name = "submission.csv.gz" if gzip else "submission.csv"
    staging = storage.join(output, f"_staging-submission-{uuid.uuid4().hex}")
    writer = (sub.select("_id", "category_id").orderBy("_id").coalesce(1)
                 .write.option("header", True))
    if gzip:
        writer = writer.option("compression", "gzip")
    writer.csv(storage.to_url(staging))
    parts = [loc for name_, loc, _ in storage.list_dir(staging) if name_.startswith("part-")]
    if len(parts) != 1:
        raise PredictError(f"{staging}: expected one CSV part, found {len(parts)}")
    # a rename: a reader never sees a half-written file (HDFS cannot rename onto a file,
    # so the old one is removed first)
    storage.replace(parts[0], storage.join(output, name))
    storage.remove(staging)
    return storage.join(output, name)
