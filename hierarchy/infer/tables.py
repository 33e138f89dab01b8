"""Where predictions land: the ``predictions`` table and the Kaggle submission file.

One table holds every run: Parquet partitioned by ``run_id``, ``split`` and ``strategy`` at a
location the catalog config owns (``catalog.location``; by default where Spark would put a
managed table: ``<database location>/<table>``, inside the warehouse), registered as an
external table in the Spark catalog (a Hive metastore: embedded Derby locally, PostgreSQL or
the cluster's when configured). ``--output`` only holds the submission and the reports, so
predicting into two outputs fills one table.

A predict replaces only its own partition: Spark's dynamic partition overwrite writes into a
staging folder and renames the partition into place, then the partition is added to the
metastore. A reader going through the catalog (spark.table, the Thrift server) sees a new
partition only once it is whole; the runs already there are never touched.
"""

from __future__ import annotations

import uuid
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import unquote

from hierarchy.contracts import storage
from hierarchy.contracts.errors import UsageError
from hierarchy.contracts.predictions import ADDED_COLUMNS, PARTITIONS, TABLE_COLUMNS
from hierarchy.contracts.settings import Catalog
from hierarchy.infer.modelset import ScoringRefused
from hierarchy.spark import sql_literal, sql_name


def table_name(catalog: Catalog) -> str:
    return f"{catalog.database}.{catalog.table}"


def quoted(catalog: Catalog) -> str:
    """The table's name as SQL text (:func:`table_name` is for the catalog API)."""
    return sql_name(catalog.database, catalog.table)


def _existing_location(spark, name: str) -> str:
    if not spark.catalog.tableExists(name):
        return ""
    rows = spark.sql(f"DESCRIBE TABLE EXTENDED {sql_name(*name.split('.'))}").collect()
    for row in rows:
        if row.col_name == "Location":  # a URI (a space is %20); Spark's paths take it plain
            return unquote(row.data_type)
    return ""


def _table_type(spark, name: str) -> str:
    return spark.catalog.getTable(name).tableType


def table_location(spark, catalog: Catalog) -> str:
    """Where the table's files are: the registered table's own location, else
    ``catalog.location``, else ``<warehouse>/<table>``. Refuses a table registered somewhere
    else than the configuration says (:func:`_placed`)."""
    return _placed(spark, catalog)[0]


def warehouse(spark) -> str:
    """The warehouse this session writes managed tables into (``catalog.warehouse``, or the
    metastore's own when that is empty)."""
    return storage.to_url(unquote(spark.conf.get("spark.sql.warehouse.dir")))


def configured_location(spark, catalog: Catalog) -> str:
    """Where the configuration puts the table: ``catalog.location``, else where Spark puts a
    managed table of the database, inside the warehouse."""
    if catalog.location:
        wanted = storage.to_url(catalog.location)
        storage.require_hadoop_path(wanted, "catalog.location")
        return wanted
    folder = warehouse(spark)
    if catalog.database != "default":
        folder = storage.join(folder, f"{catalog.database}.db")
    return storage.join(folder, catalog.table)


def planned_location(catalog: Catalog) -> str:
    """:func:`configured_location` without a session (what --dry-run prints): the metastore
    may still hold the table elsewhere, which the job itself refuses."""
    if catalog.location:
        return storage.to_url(catalog.location)
    if not catalog.warehouse:
        return f"<the metastore's warehouse>/{catalog.table}"
    folder = storage.to_url(catalog.warehouse)
    if catalog.database != "default":
        folder = storage.join(folder, f"{catalog.database}.db")
    return storage.join(folder, catalog.table)


def _placed(spark, catalog: Catalog) -> Tuple[str, bool]:
    """(:func:`table_location`, whether the table is registered already). A table registered
    elsewhere than :func:`configured_location` is refused, naming both places: two configs
    disagreeing on one table, or a data root copied with its metastore, whose table still
    points into the original project (writing there would replace the original's rows)."""
    name = table_name(catalog)
    existing = _existing_location(spark, name)
    if not existing:
        return configured_location(spark, catalog), False
    existing = storage.to_url(existing)
    if catalog.location:
        wanted = configured_location(spark, catalog)
        if not storage.same_location(existing, wanted):
            raise ScoringRefused(
                f"table {name} lives at {existing}, but catalog.location is {wanted}: set "
                f"catalog.location={existing} (or empty), run `hierarchy runs relocate` to "
                f"register the table at {wanted}, or name another table with "
                f"catalog.table=... / catalog.database=...")
    elif not storage.within(existing, warehouse(spark)):
        raise ScoringRefused(
            f"table {name} is registered at {existing}, outside catalog.warehouse "
            f"{warehouse(spark)} (a data root copied or moved with its metastore?): writing "
            f"would change that other place. Run `hierarchy runs relocate` to register the "
            f"table at {configured_location(spark, catalog)}, or set "
            f"catalog.location={existing} if that place is meant")
    return existing, True


def relocate(spark, catalog: Catalog, dry_run: bool = False) -> Tuple[str, str]:
    """Register the table at :func:`configured_location` (where a copied or moved data root
    keeps its files): the old registration is dropped (an external table: no file is
    touched, here or there) and the partitions found in the new place are recovered.
    Returns (old location or "", new location)."""
    name = table_name(catalog)
    old, new = _existing_location(spark, name), configured_location(spark, catalog)
    if old and storage.same_location(old, new):
        return old, new
    if not storage.exists(new):
        raise ScoringRefused(f"table {name}: nothing at {new} to register (catalog.location "
                             f"or catalog.warehouse names the place its files are)")
    if old and _table_type(spark, name) != "EXTERNAL":
        # dropping a managed table deletes its files, the very rows the copy came from
        raise ScoringRefused(f"table {name} at {old} is not an external table: relocating "
                             f"it would delete its files; name another table with "
                             f"catalog.table=... / catalog.database=...")
    if dry_run:
        return old, new
    if old:
        spark.sql(f"DROP TABLE {quoted(catalog)}")
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {sql_name(catalog.database)}")
    spark.sql(f"CREATE TABLE {quoted(catalog)} USING parquet LOCATION {sql_literal(new)}")
    spark.sql(f"ALTER TABLE {quoted(catalog)} RECOVER PARTITIONS")
    spark.sql(f"REFRESH TABLE {quoted(catalog)}")
    return old, new


def partition_spec(**values: Optional[str]) -> str:
    """``run_id='a', split='val'`` for the values given, in table order."""
    return ", ".join(f"{k}={sql_literal(values[k])}" for k in PARTITIONS if values.get(k))


def write_predictions(spark, df, catalog: Catalog,
                      partitions: Sequence[Dict[str, str]]) -> Tuple[str, str]:
    """Write ``df`` into its partitions of the table (``partitions``: the run_id / split /
    strategy values it holds, named so that no Spark job recomputes ``df`` to find them) and
    register them; returns (table name, table location)."""
    name = table_name(catalog)
    location, existed = _placed(spark, catalog)
    (df.select(*TABLE_COLUMNS).write.mode("overwrite")
       .option("partitionOverwriteMode", "dynamic")
       .partitionBy(*PARTITIONS).parquet(location))
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {sql_name(catalog.database)}")
    if not existed:
        # schema and partition columns are inferred from the files just written
        spark.sql(f"CREATE TABLE IF NOT EXISTS {quoted(catalog)} USING parquet LOCATION "
                  f"{sql_literal(location)}")
        spark.sql(f"ALTER TABLE {quoted(catalog)} RECOVER PARTITIONS")
    else:
        have = {f.name for f in spark.table(name).schema.fields}
        missing = [f"{c} {kind}" for c, kind in ADDED_COLUMNS.items() if c not in have]
        if missing:  # a table written before these columns existed
            spark.sql(f"ALTER TABLE {quoted(catalog)} ADD COLUMNS ({', '.join(missing)})")
        specs = " ".join(f"PARTITION ({partition_spec(**p)})" for p in partitions)
        if specs:
            spark.sql(f"ALTER TABLE {quoted(catalog)} ADD IF NOT EXISTS {specs}")
    spark.sql(f"REFRESH TABLE {quoted(catalog)}")
    return name, location


# The review queue: every product the rule did not file at a leaf (to review, or filed at a
# level-2 / level-1 node where a person picks the leaf), the ones a person settles fastest first:
# ``review_priority`` is the probability that confirming the suggested leaf settles the
# product, so an hour of review confirms the most products. A view, so it is always the
# table's current partitions and never a second copy of them.
REVIEW_COLUMNS = ("run_id", "split", "strategy", "product_id", "decision_level",
                  "decision_id", "decision_name", "decision_probability", "category_id",
                  "category_level1", "category_level2", "category_level3", "top5",
                  "image_count", "answered_by", "taxonomy_version", "scored_at")


def create_review_view(spark, catalog: Catalog) -> str:
    """(Re)define the review queue view over the predictions table; returns its name."""
    name = f"{catalog.database}.{catalog.review_view}"
    cols = ", ".join(REVIEW_COLUMNS)
    spark.sql(f"CREATE OR REPLACE VIEW {sql_name(catalog.database, catalog.review_view)} "
              f"AS SELECT {cols}, confidence AS review_priority "
              f"FROM {quoted(catalog)} WHERE decision_level < 3 "
              f"ORDER BY run_id, split, strategy, review_priority DESC, product_id")
    return name


def list_runs(spark, catalog: Catalog, run_id: Optional[str] = None) -> List[dict]:
    """One dict per partition: its rows, pictures, when it was scored and, on val, its
    level-3 accuracy. A small aggregate (partitions, not rows) comes back to the driver."""
    from pyspark.sql import functions as F

    name = table_name(catalog)
    if not spark.catalog.tableExists(name):
        return []
    df = spark.table(name)
    if run_id:
        df = df.where(F.col("run_id") == run_id)
    hit = F.when(F.col("true_l3").isNotNull(), (F.col("l3") == F.col("true_l3")).cast("int"))
    rows = (df.groupBy(*PARTITIONS)
              .agg(F.count("*").alias("products"), F.sum("image_count").alias("images"),
                   F.max("scored_at").alias("scored_at"), F.avg(hit).alias("accuracy_l3"))
              .orderBy("scored_at", *PARTITIONS).collect())
    return [r.asDict() for r in rows]


def drop_runs(spark, catalog: Catalog, run_id: str, split: Optional[str] = None,
              strategy: Optional[str] = None, dry_run: bool = False) -> List[dict]:
    """Remove a run's partitions (all, or one split / strategy) from the catalog first, then
    their files: a reader never sees a partition whose files are gone. Returns what was
    dropped (empty when nothing matched: dropping twice is not an error); ``dry_run``: what
    would be, touching nothing."""
    if strategy and not split:
        raise UsageError("--strategy needs --split (partitions nest run_id/split/strategy)")
    gone = [r for r in list_runs(spark, catalog, run_id)
            if (not split or r["split"] == split) and (not strategy or r["strategy"] == strategy)]
    if not gone or dry_run:
        return gone
    location = table_location(spark, catalog)
    spec = partition_spec(run_id=run_id, split=split, strategy=strategy)
    spark.sql(f"ALTER TABLE {quoted(catalog)} DROP IF EXISTS PARTITION ({spec})")
    folder = storage.join(location, f"run_id={run_id}",
                          *([f"split={split}"] if split else []),
                          *([f"strategy={strategy}"] if strategy else []))
    if storage.exists(folder):
        storage.remove(folder)
    spark.sql(f"REFRESH TABLE {quoted(catalog)}")
    return gone


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
        raise ScoringRefused(
            f"{what}: {n} product id(s) appear more than once (e.g. {_sample(dups, 'product_id')})"
            f"; re-ingest that dump: ingest keeps the first occurrence and quarantines the "
            f"others as duplicate_id")


def check_submission_rows(sub, products) -> Tuple[int, int]:
    """Exactly one row per product of the input: (rows, products), else ScoringRefused naming
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
        raise ScoringRefused(
            f"submission check failed: {stats.rows} rows for {n_products} products: "
            + "; ".join(problems) + "; nothing was published")
    return stats.rows, n_products


def write_submission(sub, output: str, gzip: bool) -> str:
    """One CSV file ``_id,category_id`` sorted by ``_id`` (as Kaggle's sample is), written
    by Spark to a staging folder and moved into place, so a reader never sees half a file."""

    name = "submission.csv.gz" if gzip else "submission.csv"
    staging = storage.join(output, f"_staging-submission-{uuid.uuid4().hex}")
    writer = (sub.select("_id", "category_id").orderBy("_id").coalesce(1)
                 .write.option("header", True))
    if gzip:
        writer = writer.option("compression", "gzip")
    with storage.single_part_file(storage.join(output, name), staging) as folder:
        writer.csv(storage.to_url(folder))
    return storage.join(output, name)
