"""``hierarchy curate``: the flags of every picture of a dataset, as a table, a report and a
review queue.

extract   the pictures of ``images/`` (every committed split), hashed on the executors
          (:mod:`hierarchy.curate.hashing`): the only pass that reads the JPEG bytes, and only
          of pictures no earlier curate hashed (``curation_hashes/``, by MD5 and algorithm)
transform exact groups (ingest's MD5), near groups (:mod:`hierarchy.curate.groups`), group
          statistics, the flags, the reviewers' latest decisions
load      ``curation/`` (replaced whole), the catalog tables, the review queue and the report

Flags, per picture (a *group* is a near-duplicate component; exact copies are in it too):

blank               greyscale pixel std <= ``curate.blank_max_std``
duplicate           its bytes (MD5) occur more than once in the dataset
near_duplicate      its group holds more than one distinct picture (MD5)
placeholder         its group is shown by >= ``placeholder_min_products`` products filed under
                    >= ``placeholder_min_categories`` categories, none holding more than
                    ``placeholder_max_share`` of its labels ("no image", logos; a popular
                    product's picture with a few mislabelled copies is a conflict instead)
conflicting_labels  its group holds pictures of one very hash (the same picture, re-encoded at
                    most) labelled with more than one category, and is no placeholder (a
                    placeholder says nothing about its products: it is not a conflict)
leakage             its group has pictures in both train and val
"""

from __future__ import annotations

import logging
import time
from urllib.parse import unquote

from hierarchy.contracts import curation as ct
from hierarchy.contracts import storage
from hierarchy.contracts.dataset import Dataset, DatasetNotReady
from hierarchy.contracts.errors import Refused, UsageError
from hierarchy.contracts.settings import Catalog, Curate, Settings
from hierarchy.curate.groups import components, near_edges
from hierarchy.curate.hashing import HASHED, algorithm, hash_batch

log = logging.getLogger(__name__)

PICTURE_COLUMNS = ["product_id", "img_idx", "split", "category_id", "l1", "l3", "nbytes", "md5"]


def _hex(col):
    from pyspark.sql import functions as F

    return F.lower(F.lpad(F.hex(col), 16, "0"))


def extract(spark, data: str, known=None):
    """Pictures of every split with their hash and stats (no JPEG bytes past this point), and
    how many were decoded. ``known``: (md5, hash columns) of pictures hashed before by this
    hash algorithm: those are not decoded again, and only the part files holding another
    picture (found from the small columns) are read for their JPEG bytes."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_type
    from pyspark.sql.types import StructField, StructType

    images = spark.read.parquet(Dataset(data).url("images"))
    fields = [f for f in images.select(*PICTURE_COLUMNS).schema.fields]
    fields += [StructField(f.name, from_arrow_type(f.type), True) for f in HASHED]
    schema = StructType(fields)
    if known is None:
        pics = images.select(*PICTURE_COLUMNS, "jpeg")
        return pics.mapInArrow(lambda batches: map(hash_batch, batches), schema), None
    meta = images.select(*PICTURE_COLUMNS, F.input_file_name().alias("_file"))
    hit = meta.join(known, "md5").select(*schema.names)
    miss = meta.join(known.select("md5"), "md5", "left_anti").localCheckpoint()
    files = sorted(unquote(r._file) for r in miss.select("_file").distinct().collect())
    if not files:
        return hit, 0
    jpegs = (spark.read.option("basePath", Dataset(data).url("images")).parquet(*files)
                  .select(*PICTURE_COLUMNS, "jpeg")
                  .join(miss.select("product_id", "img_idx"), ["product_id", "img_idx"],
                        "left_semi"))
    new = jpegs.mapInArrow(lambda batches: map(hash_batch, batches), schema)
    return hit.unionByName(new), miss.count()


def known_hashes(spark, data: str):
    """(md5, hash columns) of every picture an earlier curate hashed with this version's
    algorithm; None when there is none (the first curate, or the algorithm changed)."""
    from pyspark.sql import functions as F

    path = ct.hashes_path(data)
    if not storage.list_files(path, ".parquet"):
        return None
    known = spark.read.parquet(storage.to_url(path))
    if set(known.columns) < {"md5", "hash_algorithm", *HASHED.names}:
        return None
    known = known.where(F.col("hash_algorithm") == algorithm()).select("md5", *HASHED.names)
    return known if known.take(1) else None


def _group_stats(pics):
    """Per group of near-identical pictures: its size, products, categories, the splits it
    spans and its label counts (a JSON map category -> pictures)."""
    from pyspark.sql import functions as F

    cats = (pics.where(F.col("category_id").isNotNull() & F.col("group_hash").isNotNull())
                .groupBy("group_hash", "category_id").count()
                .groupBy("group_hash")
                .agg(F.to_json(F.map_from_entries(F.collect_list(F.struct(
                    F.col("category_id").cast("string"), F.col("count")))))
                    .alias("category_counts"),
                     (F.max("count") / F.sum("count")).alias("top_category_share")))
    return (pics.where(F.col("group_hash").isNotNull()).groupBy("group_hash")
                .agg(F.count("*").alias("group_pictures"),
                     F.countDistinct("product_id").alias("group_products"),
                     F.countDistinct("category_id").alias("group_categories"),
                     F.countDistinct("md5").alias("group_distinct"),
                     F.max((F.col("split") == "train").cast("int")).alias("in_train"),
                     F.max((F.col("split") == "val").cast("int")).alias("in_val"),
                     F.max("hash_categories").alias("group_hash_categories"))
                .join(cats, "group_hash", "left"))


def _reason():
    """One line saying why a picture is flagged, from its flags and group figures."""
    from pyspark.sql import functions as F

    grouped = F.coalesce(F.col("group_pictures"), F.lit(1)) > 1
    return F.concat_ws("; ", F.filter(F.array(
        F.when(F.col("blank"), F.format_string("near-uniform (pixel std %.1f)", "pixel_std")),
        F.when(F.col("duplicate"), F.format_string("%d exact copies", "exact_copies")),
        F.when(grouped, F.format_string("group of %d pictures (%d distinct), %d products, "
                                        "%d categories", "group_pictures", "group_distinct",
                                        "group_products", "group_categories")),
        F.when(F.col("placeholder") | F.col("conflicting_labels"),
               F.concat(F.lit("labels "), F.col("category_counts"))),
        F.when(F.col("leakage"), F.lit("in train and val")),
        F.when(F.col("hash_error").isNotNull(), F.col("hash_error"))), lambda x: x.isNotNull()))


def _with_reviews(rows, reviews):
    """Each picture's latest review decision (review, its category, who and when), or nulls."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if reviews is None:
        return (rows.withColumn("review", F.lit(None).cast("string"))
                    .withColumn("review_category_id", F.lit(None).cast("long"))
                    .withColumn("reviewed_by", F.lit(None).cast("string"))
                    .withColumn("reviewed_at", F.lit(None).cast("timestamp")))
    latest = (reviews.withColumn("_n", F.row_number().over(
        Window.partitionBy("product_id", "img_idx")
              .orderBy(F.desc("decided_at"), F.desc("review_id"))))
              .where("_n = 1")
              .select("product_id", "img_idx", F.col("decision").alias("review"),
                      F.col("category_id").alias("review_category_id"),
                      F.col("reviewer").alias("reviewed_by"),
                      F.col("decided_at").alias("reviewed_at")))
    return rows.join(latest, ["product_id", "img_idx"], "left")


def flag(pics, edges_labels, reviews, ccfg: Curate):
    """The curation rows: one per picture, its group, counts, flags and review."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    pics = (pics.join(edges_labels, "phash", "left")
                .withColumn("group_hash", F.coalesce("label", "phash")).drop("label"))
    pics = pics.withColumn("exact_copies", F.count("*").over(Window.partitionBy("md5")))
    # conflicts are judged on identical hashes (the same picture, re-encoded at most), not on
    # the near group: different products that merely look alike are filed apart rightly
    pics = pics.withColumn("hash_categories", F.when(F.col("phash").isNotNull(), F.size(
        F.collect_set("category_id").over(Window.partitionBy("phash")))))
    rows = pics.join(_group_stats(pics), "group_hash", "left")
    grouped = F.coalesce(F.col("group_pictures"), F.lit(1)) > 1
    placeholder = grouped & (F.col("group_products") >= ccfg.placeholder_min_products) & \
        (F.col("group_categories") >= ccfg.placeholder_min_categories) & \
        (F.col("top_category_share") <= ccfg.placeholder_max_share)
    rows = rows.select(
        "*",
        F.coalesce(F.col("pixel_std") <= ccfg.blank_max_std, F.lit(False)).alias("blank"),
        F.coalesce(placeholder, F.lit(False)).alias("placeholder"),
        (F.col("exact_copies") > 1).alias("duplicate"),
        F.coalesce(grouped & (F.col("group_distinct") > 1), F.lit(False)).alias("near_duplicate"),
        F.coalesce(grouped & ~placeholder & (F.col("group_hash_categories") > 1), F.lit(False))
         .alias("conflicting_labels"),
        F.coalesce(grouped & (F.col("in_train") == 1) & (F.col("in_val") == 1), F.lit(False))
         .alias("leakage"))
    flags = F.filter(F.array(*[F.when(F.col(f), F.lit(f)) for f in ct.FLAGS]),
                     lambda x: x.isNotNull())
    rows = rows.withColumn("flags", flags).withColumn("reason", _reason())
    rows = rows.withColumn("group_id", F.when(F.col("group_hash").isNotNull(),
                                              _hex(F.col("group_hash"))))
    rows = rows.withColumn("phash_hex", _hex(F.col("phash")))
    return _with_reviews(rows, reviews).select(
        "product_id", "img_idx", "category_id", "l1", "l3", "nbytes", "md5",
        F.col("phash_hex").alias("phash"), F.lit(algorithm()).alias("hash_algorithm"),
        "pixel_std", "hash_error", "group_id",
        F.coalesce("group_pictures", F.lit(1)).alias("group_pictures"),
        F.coalesce("group_products", F.lit(1)).alias("group_products"),
        F.coalesce("group_categories", F.lit(0)).alias("group_categories"),
        "exact_copies", "category_counts", *ct.FLAGS, "flags", "reason",
        "review", "review_category_id", "reviewed_by", "reviewed_at",
        F.current_timestamp().alias("curated_at"), "split")


def _require_external(spark, catalog: Catalog, name: str) -> None:
    """:func:`_register` re-creates its tables by dropping them, which deletes a managed
    table's files: a table of that name that is not external (another project's, in a shared
    metastore) is refused before any work."""
    full = f"{catalog.database}.{name}"
    if spark.catalog.tableExists(full) and spark.catalog.getTable(full).tableType != "EXTERNAL":
        raise Refused(f"table {full} exists and is not an external table: curate would "
                      f"replace it and delete its files; name another with "
                      f"catalog.{'curation' if name == catalog.curation_table else 'reviews'}"
                      f"_table=... or catalog.database=...")


def _register(spark, catalog: Catalog, name: str, location: str, partitioned: bool,
              schema_ddl: str = "") -> str:
    """An external table over ``location`` (re-pointed when a re-run moved nothing: the
    folder is the same, its partitions are recovered)."""
    from hierarchy.spark import sql_literal, sql_name

    storage.require_hadoop_path(location, "--data")
    full, quoted = f"{catalog.database}.{name}", sql_name(catalog.database, name)
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {sql_name(catalog.database)}")
    if spark.catalog.tableExists(full):
        spark.sql(f"DROP TABLE {quoted}")  # external: the files stay; the schema may have moved
    columns = f"({schema_ddl}) " if schema_ddl else ""
    spark.sql(f"CREATE TABLE {quoted} {columns}USING parquet LOCATION "
              f"{sql_literal(storage.to_url(location))}")
    if partitioned:
        spark.sql(f"ALTER TABLE {quoted} RECOVER PARTITIONS")
    spark.sql(f"REFRESH TABLE {quoted}")
    return full


REVIEWS_DDL = ("review_id STRING, target STRING, group_id STRING, product_id BIGINT, "
               "img_idx INT, decision STRING, category_id BIGINT, reviewer STRING, "
               "decided_at TIMESTAMP, note STRING")

REVIEW_ORDER = ("conflicting_labels", "placeholder", "leakage", "near_duplicate", "duplicate",
                "blank")


def review_queue(spark, rows, data: str, ccfg: Curate, out: str) -> None:
    """``review/groups.parquet`` (flagged groups, most urgent first, with every member) and
    ``review/pictures.parquet`` (up to ``review_pictures`` JPEGs a group, bytes as ingested,
    read from the part files that hold them only)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    flagged = rows.where(F.size("flags") > 0)
    key = F.coalesce("group_id", F.format_string("p%d-%d", "product_id", "img_idx"))
    flagged = flagged.withColumn("review_group", key)
    rank = F.least(*[F.when(F.col(f), F.lit(i)).otherwise(F.lit(99))
                     for i, f in enumerate(REVIEW_ORDER)])
    groups = (flagged.groupBy("review_group")
                     .agg(F.min(rank).alias("priority"), F.count("*").alias("pictures"),
                          F.countDistinct("product_id").alias("products"),
                          F.max("group_categories").alias("categories"),
                          F.first("category_counts", ignorenulls=True).alias("category_counts"),
                          F.array_sort(F.array_distinct(F.flatten(F.collect_list("flags"))))
                          .alias("flags"),
                          F.first("reason").alias("reason"),
                          F.collect_list(F.struct("product_id", "img_idx", "split",
                                                  "category_id")).alias("members")))
    top = groups.orderBy("priority", F.desc("pictures"), "review_group") \
                .limit(ccfg.review_max_groups)
    top = top.withColumn("position", F.monotonically_increasing_id()).localCheckpoint()
    top.coalesce(1).orderBy("priority", F.desc("pictures"), "review_group") \
       .write.mode("overwrite").parquet(storage.to_url(storage.join(out, "groups")))
    shown = (flagged.join(top.select("review_group"), "review_group")
                    .withColumn("_n", F.row_number().over(
                        Window.partitionBy("review_group").orderBy("product_id", "img_idx")))
                    .where(F.col("_n") <= ccfg.review_pictures)
                    .select("review_group", "product_id", "img_idx", "split", "category_id",
                            "flags"))
    shown = shown.localCheckpoint()
    # the JPEG bytes of only the part files holding a shown picture (found from the small
    # columns): a nightly curate must not read the whole catalog's pictures for a few hundred
    images = spark.read.parquet(Dataset(data).url("images"))
    files = sorted(unquote(r._file) for r in images.select(
        "product_id", "img_idx", F.input_file_name().alias("_file"))
        .join(F.broadcast(shown.select("product_id", "img_idx")), ["product_id", "img_idx"])
        .select("_file").distinct().collect())
    if files:
        images = spark.read.option("basePath", Dataset(data).url("images")).parquet(*files)
    (images.select("product_id", "img_idx", "jpeg")
           .join(F.broadcast(shown), ["product_id", "img_idx"]).coalesce(1)
           .write.mode("overwrite").parquet(storage.to_url(storage.join(out, "pictures"))))


def check_curate(cfg: Settings, data: str) -> dict:
    """{split: pictures} of the dataset's committed splits; refusals before Spark starts."""

    ccfg = cfg.curate
    if ccfg.hash_blocks <= ccfg.near_distance:
        raise UsageError(f"curate.hash_blocks ({ccfg.hash_blocks}) must exceed "
                         f"curate.near_distance ({ccfg.near_distance}): two hashes within "
                         f"the distance must agree on at least one block")
    storage.require_dir(data, "--data")
    manifest = Dataset(data).manifest()
    # a kind whose append is committing is refused, not skipped: the table is rewritten whole
    pending = [k for k, e in manifest.kinds.items() if e.plan is not None]
    if pending:
        Dataset(data).require_complete(pending)
    done = manifest.complete_kinds()
    if not done:
        raise DatasetNotReady(f"{data}: no committed ingest — run `hierarchy ingest` first")
    for kind in done:
        Dataset(data).verify(manifest, kind)
    return {s: c.images for s, c in manifest.splits.items()}


def _hash(spark, data: str, scratch: str, rehash: bool):
    """(every picture with its hash, read back from ``scratch``; pictures decoded), and
    ``curation_hashes/`` rewritten with every distinct picture's hash for the next run."""
    from pyspark.sql import functions as F

    pics, decoded = extract(spark, data, None if rehash else known_hashes(spark, data))
    pics.write.parquet(storage.to_url(scratch))
    pics = spark.read.parquet(storage.to_url(scratch))
    with Dataset(data).replacing(ct.hashes_path(data)) as staged:
        (pics.select("md5", F.lit(algorithm()).alias("hash_algorithm"), *HASHED.names)
             .dropDuplicates(["md5"]).write.parquet(storage.to_url(staged)))
    return pics, decoded


def _counts(table) -> dict:
    """The curation table's pictures, flags, groups and reviews (one aggregate row)."""
    from pyspark.sql import functions as F

    return table.agg(F.count("*").alias("pictures"),
                     F.sum(F.col("hash_error").isNotNull().cast("int")).alias("undecodable"),
                     F.sum((F.size("flags") > 0).cast("int")).alias("flagged"),
                     F.countDistinct(F.when(F.col("group_pictures") > 1, F.col("group_id")))
                     .alias("groups"),
                     *[F.sum(F.col(f).cast("int")).alias(f) for f in ct.FLAGS],
                     F.sum(F.col("review").isNotNull().cast("int")).alias("reviewed")
                     ).first().asDict()


def run_curate(spark, cfg: Settings, data: str, rehash: bool = False) -> dict:
    """The whole job; returns its summary (counts per flag, the work the grouping did, the
    pictures decoded and reused). ``rehash``: decode every picture, whatever was hashed."""
    ccfg, catalog = cfg.curate, cfg.catalog
    timings = {}
    t0 = time.perf_counter()
    ds = Dataset(data)
    for name in (catalog.curation_table, catalog.reviews_table):
        _require_external(spark, catalog, name)
    with ds.scratch("curate") as staging:
        pics, decoded = _hash(spark, data, staging.path("hashes"), rehash)
        timings["hash"] = time.perf_counter() - t0

        t = time.perf_counter()
        edges, grouping = near_edges(spark, pics, ccfg.near_distance,
                                     ccfg.hash_blocks)
        edges = edges.localCheckpoint()
        grouping["edges"] = edges.count()
        labels, rounds = components(spark, edges, ccfg.max_rounds)
        grouping["rounds"] = rounds
        timings["group"] = time.perf_counter() - t

        t = time.perf_counter()
        reviews = None
        if storage.list_files(ct.reviews_path(data), ".parquet"):
            reviews = spark.read.parquet(storage.to_url(ct.reviews_path(data)))
        rows = flag(pics, labels, reviews, ccfg)
        with ds.replacing(ct.curation_path(data)) as staged:
            rows.write.partitionBy("split").parquet(storage.to_url(staged))
        timings["flag"] = time.perf_counter() - t

        t = time.perf_counter()
        table = spark.read.parquet(storage.to_url(ct.curation_path(data)))
        counts = _counts(table)
        tables = {"curation": _register(spark, catalog, catalog.curation_table,
                                        ct.curation_path(data), partitioned=True)}
        storage.make_dir(ct.reviews_path(data))
        tables["reviews"] = _register(spark, catalog, catalog.reviews_table,
                                      ct.reviews_path(data), partitioned=False,
                                      schema_ddl=REVIEWS_DDL)
        report_dir = ct.report_path(data)
        review_queue(spark, table, data, ccfg, storage.join(report_dir, "review"))
        timings["write"] = time.perf_counter() - t

    from hierarchy.curate.report import write_report

    pictures = int(counts["pictures"] or 0)
    summary = {"data": data, "counts": {k: int(v or 0) for k, v in counts.items()},
               "hashing": {"decoded": pictures if decoded is None else int(decoded),
                           "reused": 0 if decoded is None else pictures - int(decoded)},
               "grouping": grouping, "hash_algorithm": algorithm(),
               "config": ccfg.model_dump(mode="json"), "tables": tables,
               "seconds": {k: round(v, 2) for k, v in timings.items()}}
    summary["report"] = write_report(report_dir, summary)
    return summary
