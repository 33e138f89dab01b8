"""Near-duplicate groups (hierarchy.curate.groups.components): the large-star / small-star
connected components against a union-find in plain Python on random graphs, against the
min-label propagation it replaced on a planted catalog's edges, and its rounds on a long chain
(where propagation needed one round per link)."""

import logging
import math
import random

import bson
import numpy as np
import pytest

from hierarchy.curate.groups import EDGES, close_pairs, components, near_edges

pytestmark = pytest.mark.spark

BITS = 2**63


def union_find(pairs) -> dict:
    """phash -> the smallest hash of its component, for every hash of ``pairs``."""
    parent = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: root(x) for x in parent}


def propagation(spark, edges, max_rounds: int = 50):
    """The min-label propagation ``components`` did before issue 31 (one round per link of
    the longest chain), kept as a reference."""
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
    return labels.withColumnRenamed("v", "phash"), rounds


def hashes(rng: random.Random, n: int) -> list:
    """``n`` distinct random signed 64-bit hashes (negative ones included, as phash gives)."""
    out = set()
    while len(out) < n:
        out.add(rng.randrange(-BITS, BITS))
    return list(out)


def path(ids) -> list:
    return list(zip(ids[:-1], ids[1:]))


def mixture(seed: int) -> list:
    """Stars (hub anywhere in the order), a random-order chain, trees, cycles, dense random
    components, many isolated edges and triangles, some edges given twice or reversed."""
    rng = random.Random(seed)
    pairs = []
    for size in (2, 7, 60):
        ids = hashes(rng, size)
        pairs += [(ids[rng.randrange(size)], x) for x in ids]
    pairs += path(hashes(rng, 120))
    for size in (30, 200):
        ids = hashes(rng, size)
        pairs += [(ids[i], ids[rng.randrange(i)]) for i in range(1, size)]
    ids = hashes(rng, 40)
    pairs += path(ids) + [(ids[-1], ids[0])]
    for _ in range(5):
        ids = hashes(rng, 25)
        pairs += [(rng.choice(ids), rng.choice(ids)) for _ in range(60)]
    for _ in range(150):
        pairs.append(tuple(hashes(rng, 2)))
    for _ in range(40):
        a, b, c = hashes(rng, 3)
        pairs += [(a, b), (b, c), (c, a)]
    pairs += [(b, a) for a, b in rng.sample(pairs, 50)]
    rng.shuffle(pairs)
    return [(min(a, b), max(a, b)) for a, b in pairs if a != b]


def edges_df(spark, pairs):
    return spark.createDataFrame([(a, b, 1) for a, b in pairs], EDGES)


def labels_of(df) -> dict:
    rows = df.collect()
    out = {r["phash"]: r["label"] for r in rows}
    assert len(out) == len(rows), "one label per hash"
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_components_match_a_union_find(spark, seed):
    pairs = mixture(seed)
    labels, rounds = components(spark, edges_df(spark, pairs))
    truth = union_find(pairs)
    assert len(set(truth.values())) > 200
    assert labels_of(labels) == truth
    assert rounds <= 2 * math.log2(len(truth)) + 4, rounds


@pytest.mark.parametrize("order", ["ascending", "descending", "random"])
def test_a_long_chain_takes_logarithmic_rounds(spark, order):
    # ascending: the smallest hash at one end, 199 links from the other end, so min-label
    # propagation took 199 rounds to settle it
    ids = sorted(hashes(random.Random(5), 200))
    if order == "descending":
        ids.reverse()
    elif order == "random":
        random.Random(6).shuffle(ids)
    pairs = path(ids)
    labels, rounds = components(spark, edges_df(spark, pairs))
    assert labels_of(labels) == union_find(pairs) == {x: min(ids) for x in ids}
    print(f"200-hash chain, {order} hashes: {rounds} rounds")
    assert rounds <= 2 * math.log2(200) + 4, rounds


def test_no_edges_and_too_few_rounds(spark, caplog):
    labels, _ = components(spark, edges_df(spark, []))
    assert labels.count() == 0
    pairs = path(sorted(hashes(random.Random(7), 50)))
    with caplog.at_level(logging.WARNING, logger="hierarchy.curate.groups"):
        labels, rounds = components(spark, edges_df(spark, pairs), max_rounds=1)
    assert rounds == 1 and "did not settle in 1 rounds" in caplog.text
    # unsettled, each hash is still labelled with a hash of its component
    assert set(labels_of(labels)) == {x for p in pairs for x in p}


@pytest.fixture(scope="module")
def planted_edges(tmp_path_factory, spark):
    """The near-duplicate edges of a fast-preset catalog with every problem planted: the
    preset draws a leaf's products nearly alike, so its look-alikes chain."""
    from hierarchy.curate.hashing import picture_hash
    from hierarchy.synth import generate
    from hierarchy.synth.plant import Plants

    root = tmp_path_factory.mktemp("groups")
    plants = Plants(duplicates=0.05, near_duplicates=0.05, relabelled=0.02, placeholders=2,
                    placeholder_share=0.02, blank=0.02)
    generate(str(root), products=400, seed=3, preset="fast", test_products=0, workers=1,
             progress=False, plants=plants)
    with open(root / "train.bson", "rb") as fh:
        values = [picture_hash(img["picture"])[0] for doc in bson.decode_file_iter(fh)
                  for img in doc["imgs"]]
    pics = spark.createDataFrame([(int(v),) for v in values] + [(None,)], "phash long")
    edges, stats = near_edges(spark, pics, d=4, m=6)
    return edges.localCheckpoint(), stats, np.array(values, np.int64)


def test_near_edges_are_every_close_pair(planted_edges):
    edges, stats, values = planted_edges
    distinct = np.unique(values)
    a, b, dist = close_pairs(distinct, 4)
    assert sorted(tuple(r) for r in edges.select("a", "b", "distance").collect()) == \
        sorted(zip(a.tolist(), b.tolist(), dist.tolist()))
    assert stats["distinct_hashes"] == len(distinct) < len(values)
    assert stats["all_pairs"] > 10 * stats["comparisons"] > 0 and stats["largest_bucket"] > 2


def test_components_match_label_propagation_on_a_planted_catalog(spark, planted_edges):
    planted_edges = planted_edges[0]
    new, rounds = components(spark, planted_edges)
    old, old_rounds = propagation(spark, planted_edges, max_rounds=1000)
    pairs = [(r.a, r.b) for r in planted_edges.select("a", "b").collect()]
    truth = union_find(pairs)
    assert len(pairs) > 100 and max(np.unique(list(truth.values()),
                                              return_counts=True)[1]) > 5
    assert labels_of(new) == labels_of(old) == truth
    print(f"planted catalog: {len(pairs)} edges over {len(truth)} hashes, {rounds} rounds "
          f"(min-label propagation: {old_rounds})")
    assert rounds <= old_rounds


def test_batch_hashes_are_imagehash_phash_bit_for_bit(real_bson):
    """hash_batch's phash (one scipy DCT call per batch) is imagehash.phash of the same
    greyscale picture, bit for bit: on the real Cdiscount sample's pictures, on noise, on flat
    and on nearly flat pictures (where coefficients tie with the median), and a bad picture in
    the middle changes none of its neighbours."""
    import io

    import imagehash
    import pyarrow as pa
    from PIL import Image

    from hierarchy.curate.hashing import DRAFT, hash_batch, picture_hash

    with open(real_bson, "rb") as fh:
        jpegs = [img["picture"] for doc in bson.decode_file_iter(fh) for img in doc["imgs"]]
    rng = np.random.default_rng(5)

    def jpeg_of(pixels) -> bytes:
        out = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(out, "JPEG", quality=90)
        return out.getvalue()

    jpegs += [jpeg_of(rng.integers(0, 256, (120, 90, 3))), jpeg_of(np.full((64, 64, 3), 200)),
              jpeg_of(np.full((180, 180, 3), 255) - (rng.random((180, 180, 3)) < 0.01))]
    rows = [{"product_id": i, "img_idx": 0, "jpeg": j} for i, j in enumerate(jpegs)]
    rows.insert(3, {"product_id": -1, "img_idx": 0, "jpeg": b"\xff\xd8broken"})
    out = hash_batch(pa.RecordBatch.from_pylist(rows)).to_pydict()
    got = [h for h, p in zip(out["phash"], out["product_id"]) if p != -1]
    assert out["phash"][3] is None and len(got) == len(jpegs) > 100
    for jpeg, value in zip(jpegs, got):
        with Image.open(io.BytesIO(jpeg)) as im:
            im.draft("L", DRAFT)
            want = int(str(imagehash.phash(im.convert("L"))), 16)
        assert value & (2**64 - 1) == want
        assert picture_hash(jpeg)[0] == value
