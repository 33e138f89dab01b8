"""Near-duplicate groups without comparing all pairs.

Two hashes within Hamming distance ``d`` differ in at most ``d`` of ``m`` bit blocks, so they
agree on at least ``m - d`` blocks (the pigeonhole principle; Manku, Jain & Das Sarma, WWW
2007). For every choice of ``m - d`` blocks out of ``m`` (a *table*) each distinct hash gets
one key, those blocks' bits; only hashes sharing a key in some table are ever compared. Every
pair within ``d`` shares at least one key, so nothing within the threshold is missed, and a
key of ``(m - d) * 64 / m`` bits keeps buckets small: the comparisons made are counted and
reported beside the all-pairs number.

Groups are the connected components of the "within d" graph over distinct hashes, found by
min-label propagation in Spark (each round a join over the edges; rounds = the longest chain).
"""

from __future__ import annotations

import itertools
import logging
from typing import List, Tuple

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each int64/uint64 (numpy 1.26 has no bitwise_count)."""
    x = np.ascontiguousarray(x).view(np.uint64)
    return _POPCOUNT[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.int32)


def blocks(m: int, bits: int = 64) -> List[Tuple[int, int]]:
    """(shift, width) of ``m`` nearly equal blocks covering ``bits`` bits."""
    edges = np.linspace(0, bits, m + 1).round().astype(int)
    return [(int(a), int(b - a)) for a, b in zip(edges[:-1], edges[1:])]


def tables(m: int, d: int) -> List[Tuple[int, ...]]:
    """The block subsets whose agreement is looked up: every ``m - d`` of ``m``."""
    if not 0 <= d < m:
        raise ValueError(f"hash_blocks ({m}) must exceed the near-duplicate distance ({d})")
    return list(itertools.combinations(range(m), m - d))


def band_keys(hashes: np.ndarray, m: int, d: int) -> Tuple[np.ndarray, np.ndarray]:
    """(table index, key) per (table, hash): arrays of length len(tables) * len(hashes),
    table-major."""
    h = np.asarray(hashes, dtype=np.int64).view(np.uint64)
    parts = [(h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
             for shift, width in blocks(m)]
    widths = [w for _, w in blocks(m)]
    table_ids, keys = [], []
    for t, subset in enumerate(tables(m, d)):
        key = np.zeros(len(h), np.uint64)
        for j in subset:
            key = (key << np.uint64(widths[j])) | parts[j]
        table_ids.append(np.full(len(h), t, np.int32))
        keys.append(key.view(np.int64))
    return np.concatenate(table_ids), np.concatenate(keys)


def close_pairs(hashes: np.ndarray, d: int, chunk: int = 2048) -> Tuple[np.ndarray, ...]:
    """(a, b, distance) of the pairs a < b of distinct ``hashes`` within ``d`` bits."""
    h = np.unique(np.asarray(hashes, dtype=np.int64))
    out_a, out_b, out_d = [], [], []
    for start in range(0, len(h), chunk):
        block = h[start:start + chunk]
        dist = popcount(block[:, None] ^ h[None, :])
        i, j = np.nonzero(dist <= d)
        keep = j > i + start
        out_a.append(block[i[keep]])
        out_b.append(h[j[keep]])
        out_d.append(dist[i[keep], j[keep]])
    if not out_a:
        return (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.int32),)
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_d)


EDGES = "a long, b long, distance int"


def near_edges(spark, hashes_df, d: int, m: int):
    """(edges DataFrame a < b within d bits, stats dict) over the distinct non-null hashes of
    ``hashes_df`` (one column ``phash``)."""
    from pyspark.sql import functions as F

    nodes = hashes_df.select("phash").where(F.col("phash").isNotNull()).distinct()

    def keyed(batches):
        for pdf in batches:
            t, k = band_keys(pdf["phash"].to_numpy(), m, d)
            yield pd.DataFrame({"band": t, "key": k,
                                "phash": np.tile(pdf["phash"].to_numpy(), len(tables(m, d)))})

    keys = nodes.mapInPandas(keyed, "band int, key long, phash long")
    keys = keys.localCheckpoint()  # both uses below read it; never recompute the hashes

    def pairs(pdf: pd.DataFrame) -> pd.DataFrame:
        if len(pdf) < 2:
            return pd.DataFrame({"a": [], "b": [], "distance": []})
        a, b, dist = close_pairs(pdf["phash"].to_numpy(), d)
        return pd.DataFrame({"a": a, "b": b, "distance": dist})

    edges = keys.groupBy("band", "key").applyInPandas(pairs, EDGES).distinct()
    sizes = keys.groupBy("band", "key").count()
    stats = sizes.agg(F.sum(F.col("count") * (F.col("count") - 1) / 2).alias("comparisons"),
                      F.max("count").alias("largest_bucket")).first()
    n = nodes.count()
    return edges, {"distinct_hashes": n, "tables": len(tables(m, d)),
                   "key_bits": int(sum(w for _, w in blocks(m)) * (m - d) // m),
                   "comparisons": int(stats.comparisons or 0),
                   "all_pairs": n * (n - 1) // 2,
                   "largest_bucket": int(stats.largest_bucket or 0)}


def components(spark, edges, max_rounds: int = 50):
    """(DataFrame phash -> label, the smallest hash of its component; rounds run) for every
    hash that has an edge. Min-label propagation: each round a node takes the smallest label
    among itself and its neighbours, until no label changes."""
    from pyspark.sql import functions as F

    both = (edges.select(F.col("a").alias("v"), F.col("b").alias("u"))
                 .union(edges.select(F.col("b").alias("v"), F.col("a").alias("u"))))
    both = both.localCheckpoint()
    labels = both.groupBy("v").agg(F.least(F.min("u"), F.first("v")).alias("label"))
    labels = labels.localCheckpoint()
    rounds = 0
    for rounds in range(1, max_rounds + 1):  # noqa: B007 - the count is returned
        moved = (both.join(labels.withColumnRenamed("v", "u"), "u")
                     .groupBy("v").agg(F.min("label").alias("seen")))
        new = (labels.join(moved, "v", "left")
                     .select("v", F.least("label", F.coalesce("seen", "label")).alias("label"),
                             (F.col("seen") < F.col("label")).alias("changed")))
        new = new.localCheckpoint()
        changed = new.where("changed").count()
        labels = new.drop("changed")
        if not changed:
            break
    else:
        log.warning("curate: near-duplicate groups did not settle in %d rounds "
                    "(curate.max_rounds); a long chain may be split in two groups", max_rounds)
    return labels.withColumnRenamed("v", "phash"), rounds
