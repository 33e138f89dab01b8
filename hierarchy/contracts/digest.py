"""A product's content digest: what ingest compares to tell a re-sent product that changed from
one sent again unchanged, and what predict compares to tell a row still current from a stale
one. Both must agree on it, so it is defined once, here.

The digest covers the product's category, its usable pictures' MD5s in picture order (the MD5s
ingest computes of the bytes as sent: no JPEG is read again) and its count of unusable ones.
A product re-sent with other pictures, another category, or a picture that no longer decodes
gets another digest; one re-sent byte for byte keeps it. A Spark column expression: computing
it reads the small ``md5`` column of ``images/``, never the JPEG bytes.
"""

from __future__ import annotations

DIGEST = "input_digest"


def product_digests(products, images):
    """(product_id, input_digest) of every row of ``products`` (a DataFrame with product_id,
    category_id, n_bad_images) from ``images`` (product_id, img_idx, md5); a product with no
    picture in ``images`` digests its category and counts alone."""
    from pyspark.sql import functions as F

    md5s = (images.groupBy("product_id")
                  .agg(F.array_sort(F.collect_list(F.struct("img_idx", "md5"))).alias("_p"))
                  .select("product_id",
                          F.concat_ws(",", F.transform("_p", lambda x: x["md5"]))
                          .alias("_md5s")))
    joined = products.select("product_id", "category_id", "n_bad_images") \
        .join(md5s, "product_id", "left")
    text = F.concat_ws("/", F.coalesce(F.col("category_id").cast("string"), F.lit("")),
                       F.col("n_bad_images").cast("string"),
                       F.coalesce(F.col("_md5s"), F.lit("")))
    return joined.select("product_id", F.sha2(text, 256).alias(DIGEST))
