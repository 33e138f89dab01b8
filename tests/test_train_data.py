"""hierarchy.train.data: Petastorm -> tf.data on a small ingested synthetic catalog."""

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

tf = pytest.importorskip("tensorflow")

from hierarchy.contracts import model as cmodel  # noqa: E402
from hierarchy.contracts.manifest import Manifest  # noqa: E402
from hierarchy.train import augment as taug  # noqa: E402
from hierarchy.train import data as tdata  # noqa: E402
from hierarchy.train import pictures as tpic  # noqa: E402
from hierarchy.train import shards as tshards  # noqa: E402

SIZE = 48


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, spark):
    """200 synthetic products ingested with small byte ranges: several row groups per split."""
    from conftest import ingested_synth

    from hierarchy.contracts.dataset import Dataset
    from hierarchy.contracts.taxonomy import Taxonomy

    root = tmp_path_factory.mktemp("train_data")
    out = ingested_synth(spark, root, 200, 1, 20, ["split_mb=0.3"])

    manifest = Dataset(out).require_complete(["train"])
    taxonomy = Taxonomy.from_json((root / "ds" / "taxonomy.json").read_text())
    return out, manifest, taxonomy


def parquet_rows(data, split):
    """{(product_id, img_idx): (l1, l3)} read with plain pyarrow."""
    table = pq.read_table(f"{data}/images/split={split}",
                          columns=["product_id", "img_idx", "l1", "l3"]).to_pydict()
    return {(p, i): (a, b) for p, i, a, b in zip(table["product_id"], table["img_idx"],
                                                   table["l1"], table["l3"])}


def collect(data, split, **kwargs):
    """{key: label} of one pass (repeat=False), keys as (product_id, img_idx); also asserts
    no key comes twice."""
    kwargs = {"image_size": SIZE, "batch_size": 4, "training": False, "repeat": False,
              **kwargs}
    out = {}
    with tdata.make_dataset(data, split, tdata.InputOptions(
            return_keys=True, **kwargs)) as ds:
        for _, labels, keys in ds:
            for key, y in zip(keys.numpy().tolist(), labels.numpy().tolist()):
                assert tuple(key) not in out, f"{key} read twice"
                out[tuple(key)] = y
    return out


# ------------------------------------------------------------------------------ pure
def test_steps_per_epoch():
    manifest = Manifest.parse({"splits": {"train": {"images": 1000, "images_per_l1": {
        "0": 10, "3": 257}}, "val": {"images": 0}}}, "manifest.json")
    assert tdata.steps_per_epoch(manifest, "train", 32, 1) == 32       # ceil(1000 / 32)
    assert tdata.steps_per_epoch(manifest, "train", 32, 4) == 8        # ceil(1000 / 128)
    assert tdata.steps_per_epoch(manifest, "train", 100, 10) == 1
    assert tdata.steps_per_epoch(manifest, "train", 16, 2, branch=3) == 9   # ceil(257 / 32)
    assert tdata.steps_per_epoch(manifest, "train", 16, 2, branch=0) == 1
    assert tdata.steps_per_epoch(manifest, "train", 16, 2, branch=1) == 1   # absent: still 1
    assert tdata.steps_per_epoch(manifest, "val", 16, 2) == 1
    assert tdata.steps_per_epoch(manifest, "test", 16, 2) == 1
    with pytest.raises(ValueError):
        tdata.steps_per_epoch(manifest, "train", 0, 1)


def test_class_count(dataset):
    _, _, tax = dataset
    assert tdata.class_count(tax, "l1") == tax.n_l1 == 4
    assert tdata.class_count(tax, "l3") == tax.n_l3 == 40
    assert sum(tdata.class_count(tax, "branch", b) for b in range(tax.n_l1)) == tax.n_l3
    with pytest.raises(ValueError):
        tdata.class_count(tax, "branch")
    with pytest.raises(ValueError):
        tdata.class_count(tax, "l2")


def test_warp_identity_is_resize_and_mirror_is_flip():
    rng = np.random.default_rng(0)
    image = tf.constant(rng.integers(0, 256, (180, 180, 3)), tf.uint8)
    resized = tf.image.resize(image, [SIZE, SIZE]).numpy()
    plain = taug.warp(image, SIZE, 1.0, [0.0, 0.0], 0.0, False).numpy()
    np.testing.assert_allclose(plain, resized, atol=1e-3)
    mirrored = taug.warp(image, SIZE, 1.0, [0.0, 0.0], 0.0, True).numpy()
    np.testing.assert_allclose(mirrored, resized[:, ::-1], atol=1e-3)
    # a crop of the top-left corner: frac 0.5 moved fully up and left = image[:90, :90]
    corner = taug.warp(image, 90, 0.5, [-1.0, -1.0], 0.0, False).numpy()
    np.testing.assert_allclose(corner, image.numpy()[:90, :90].astype(np.float32), atol=1e-3)
    # a quarter turn moves the top row to the left column (either direction: check one)
    turned = taug.warp(image, 180, 1.0, [0.0, 0.0], np.pi / 2, False).numpy()
    src = image.numpy().astype(np.float32)
    assert (np.allclose(turned[:, 0], src[0, ::-1], atol=1e-2)
            or np.allclose(turned[:, 0], src[0], atol=1e-2))


def test_augment_image_is_seeded_and_bounded():
    rng = np.random.default_rng(1)
    image = tf.constant(rng.integers(0, 256, (180, 180, 3)), tf.uint8)
    seed = tf.constant([3, 4], tf.int64)
    a = taug.augment_image(image, SIZE, seed).numpy()
    b = taug.augment_image(image, SIZE, seed).numpy()
    c = taug.augment_image(image, SIZE, tf.constant([3, 5], tf.int64)).numpy()
    assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.min() >= 0.0 and a.max() <= 255.0


def test_resample_is_the_projective_transform_kernel():
    """The XLA resampler computes what ImageProjectiveTransformV3 (bilinear, white constant
    fill) does with the same affine maps, on a padded batch of pictures of different sizes;
    float rounding only (noise pictures: neighbours differ by up to 255 grey levels)."""
    rng = np.random.default_rng(2)
    sizes = [(120, 300), (90, 90), (200, 70)]
    pictures = [rng.integers(0, 256, (h, w, 3)).astype(np.uint8) for h, w in sizes]
    padded = np.zeros((3, 200, 300, 3), np.uint8)
    for i, p in enumerate(pictures):
        padded[i, :p.shape[0], :p.shape[1]] = p
    u = rng.uniform(size=(3, 8)).astype(np.float32)
    u[0, [0, 3]] = 0.999   # the whole height, turned by ~10 degrees: corners outside
    frac, shift, angle, mirror = taug._crop(tf.constant(u))
    transforms = taug._affine(tf.constant(sizes), frac, shift, angle, mirror, SIZE)
    got = taug._resample(tf.constant(padded), tf.constant(sizes), transforms, SIZE).numpy()
    for i, p in enumerate(pictures):
        want = tf.raw_ops.ImageProjectiveTransformV3(
            images=tf.constant(p, tf.float32)[None],
            transforms=tf.pad(transforms[i:i + 1], [[0, 0], [0, 2]]),
            output_shape=tf.constant([SIZE, SIZE]), fill_value=255.0,
            interpolation="BILINEAR", fill_mode="CONSTANT")[0].numpy()
        np.testing.assert_allclose(got[i], want, atol=0.02)
    corners = got[0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 255.0).all(axis=-1).sum() == 2   # two corners outside the picture


def test_the_window_holds_every_pixel_the_augmentation_reads():
    """Cutting a picture to its crop_window before batching changes no output pixel (beyond
    float rounding of the moved origin: on noise, a 1e-5 px shift is a few 1e-3 grey levels;
    a pixel missing from the window would be tens)."""
    rng = np.random.default_rng(3)
    for h, w in [(120, 300), (300, 90), (80, 80)]:
        image = tf.constant(rng.integers(0, 256, (h, w, 3)), tf.uint8)
        longest = 0
        for k in range(20):
            u = taug.draws(tf.constant([k, h], tf.int64))
            window, meta = taug.cut_for_augmentation(image, u)
            whole = tf.constant([h, w, 0, 0, h, w], tf.int32)
            a = taug.augment_batch(window[None], meta[None], u[None], SIZE)[0].numpy()
            b = taug.augment_batch(image[None], whole[None], u[None], SIZE)[0].numpy()
            np.testing.assert_allclose(a, b, atol=0.01)
            assert window.shape[0] <= h and window.shape[1] <= w
            longest = max(longest, *window.shape[:2])
        # a panorama is cut to about its crop (at most ~1.16 x the shorter side, + margins)
        assert longest <= 1.16 * min(h, w) + 6


# ------------------------------------------------------------------------------ dataset
def test_batch_shapes_and_dtypes(dataset):
    data, _, _ = dataset
    with tdata.make_dataset(data, "train", tdata.InputOptions(
            label="l3", image_size=SIZE, batch_size=8, training=True, seed=3)) as ds:
        images_spec, labels_spec = ds.element_spec
        assert images_spec.shape.as_list() == [8, SIZE, SIZE, 3]   # static: drop_remainder
        assert images_spec.dtype == tf.float32 and labels_spec.dtype == tf.int32
        batches = list(ds.take(3))
    for images, labels in batches:
        assert images.shape == (8, SIZE, SIZE, 3) and labels.shape == (8,)
        assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
        assert 0 <= int(tf.reduce_min(labels)) and int(tf.reduce_max(labels)) < 40
    # a custom preprocess sees [0, 255] float pixels
    with tdata.make_dataset(data, "val", tdata.InputOptions(
            label="l1", image_size=SIZE, batch_size=4, training=False, repeat=False,
            preprocess=lambda x: x - 127.5)) as ds:
        images, _ = next(iter(ds))
    assert float(tf.reduce_min(images)) >= -127.5 and float(tf.reduce_max(images)) > 1.0


@pytest.mark.parametrize("label", ["l1", "l3"])
def test_one_pass_labels_match_parquet(dataset, label):
    data, manifest, _ = dataset
    expected = parquet_rows(data, "val")
    got = collect(data, "val", label=label)
    assert len(got) == len(expected) == manifest.images("val")
    column = 0 if label == "l1" else 1
    assert got == {k: v[column] for k, v in expected.items()}


def test_branch_reads_only_its_rows_with_local_labels(dataset):
    data, manifest, tax = dataset
    per_l1 = manifest.split("val").images_per_l1
    branch = int(max(per_l1, key=per_l1.get))
    local = tax.local_of_l3()
    expected = {k: int(local[l3]) for k, (l1, l3) in parquet_rows(data, "val").items()
                if l1 == branch}
    got = collect(data, "val", label="branch", branch=branch, taxonomy=tax)
    assert got == expected and len(got) == per_l1[str(branch)]
    n_leaves = tdata.class_count(tax, "branch", branch)
    # training stream of another branch: only its rows, local labels in range
    train_branch = int(max(manifest.split("train").images_per_l1,
                           key=manifest.split("train").images_per_l1.get))
    n_leaves = tdata.class_count(tax, "branch", train_branch)
    with tdata.make_dataset(data, "train", tdata.InputOptions(
            label="branch", branch=train_branch, taxonomy=tax, image_size=SIZE, batch_size=8,
            training=True)) as ds:
        labels = np.concatenate([y.numpy() for _, y in ds.take(10)])
    assert labels.min() >= 0 and labels.max() < n_leaves
    # level-3 labels of a branch reader are leaves of that branch
    got_l3 = collect(data, "train", label="l3", branch=train_branch, taxonomy=tax)
    assert set(got_l3.values()) <= set(tax.branch(train_branch).tolist())
    assert len(got_l3) == manifest.split("train").images_per_l1[str(train_branch)]


def test_branch_without_rows(dataset):
    data, manifest, tax = dataset
    present = {int(b) for b, n in manifest.split("val").images_per_l1.items() if n}
    missing = sorted(set(range(tax.n_l1)) - present)
    if not missing:
        pytest.skip("every branch has validation images in this catalog")
    kwargs = dict(label="branch", branch=missing[0], taxonomy=tax, image_size=SIZE,
                  batch_size=4)
    with tdata.make_dataset(data, "val", tdata.InputOptions(
            training=False, **kwargs)) as ds:   # repeat=True
        assert list(ds) == []
    with pytest.raises(tdata.EmptySplitError, match="no images"):
        with tdata.make_dataset(data, "val", tdata.InputOptions(
                training=True, **kwargs)):
            pass


@pytest.mark.parametrize("world_size", [2, 5])
def test_shards_cover_the_split_once(dataset, world_size):
    data, _, _ = dataset
    expected = parquet_rows(data, "val")
    groups = tshards.split_row_groups(data, "val")
    # world 2: Petastorm shards row groups; world 5 > row groups: every worker reads all
    # and tf.data keeps 1/5 of the rows
    assert tshards.petastorm_can_shard(groups, world_size) == (world_size <= len(groups))
    shards = [collect(data, "val", label="l3", rank=r, world_size=world_size)
              for r in range(world_size)]
    seen = Counter(k for shard in shards for k in shard)
    assert set(seen) == set(expected) and max(seen.values()) == 1
    assert sum(len(s) for s in shards) == len(expected)


def test_training_shards_are_disjoint_row_groups(dataset):
    data, _, _ = dataset
    shards = [collect(data, "train", label="l1", rank=r, world_size=2, training=True,
                      augment=False) for r in range(2)]
    assert not set(shards[0]) & set(shards[1])
    # drop_remainder drops at most batch_size - 1 rows per worker
    assert len(parquet_rows(data, "train")) - sum(map(len, shards)) < 2 * 4


def test_augmentation_in_training_only(dataset):
    data, _, _ = dataset
    common = dict(label="l3", image_size=SIZE, batch_size=8, shuffle_buffer=1,
                  reader_workers=1, repeat=False, return_keys=True, seed=5)

    def first(split, **kwargs):
        with tdata.make_dataset(data, split, tdata.InputOptions(
                **{**common, **kwargs})) as ds:
            images, labels, keys = next(iter(ds))
        return images.numpy(), keys.numpy()

    plain, keys_a = first("train", training=True, augment=False)
    augmented, keys_b = first("train", training=True, augment=True)
    again, keys_c = first("train", training=True, augment=True)
    np.testing.assert_array_equal(keys_a, keys_b)          # same rows, same order
    assert np.abs(plain - augmented).mean() > 0.01         # pixels changed
    np.testing.assert_array_equal(keys_b, keys_c)
    np.testing.assert_allclose(augmented, again)           # same seed, same pictures
    other, keys_d = first("train", training=True, augment=True, seed=6)
    assert keys_d.tolist() != keys_b.tolist() or not np.allclose(other, augmented)

    # validation: no augmentation, same output on every pass (with several reader threads
    # the row order may change, so compare per key)
    def val_pass():
        out = {}
        with tdata.make_dataset(data, "val", tdata.InputOptions(
                label="l3", image_size=SIZE, batch_size=3, training=False, repeat=False,
                return_keys=True)) as ds:
            for images, _, keys in ds:
                for image, key in zip(images.numpy(), keys.numpy().tolist()):
                    out[tuple(key)] = image
        return out

    one, two = val_pass(), val_pass()
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_array_equal(one[key], two[key])


def test_bad_arguments(dataset):
    data, _, tax = dataset
    common = dict(image_size=SIZE, batch_size=4, training=False)
    with pytest.raises(ValueError, match="unknown label"):
        with tdata.make_dataset(data, "val", tdata.InputOptions(
                label="l2", **common)):
            pass
    with pytest.raises(ValueError, match="needs branch"):
        with tdata.make_dataset(data, "val", tdata.InputOptions(
                label="branch", **common)):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with tdata.make_dataset(data, "val", tdata.InputOptions(
                label="branch", branch=99, taxonomy=tax, **common)):
            pass
    with pytest.raises(ValueError, match="no labels"):
        with tdata.make_dataset(data, "test", tdata.InputOptions(
                label="l1", **common)):
            pass


def test_an_undecodable_picture_is_dropped_not_fatal(tmp_path, spark):
    """JPEG markers around no picture pass ingest's default check (markers only): training and
    validation skip that picture and go on with every other one."""
    import bson
    from corrupt import JPEG_OK

    from hierarchy.contracts.config import load_config
    from hierarchy.ingest.pipeline import run_ingest
    from hierarchy.synth import generate

    generate(str(tmp_path / "syn"), products=40, seed=2, taxonomy="small", test_products=0,
             workers=1, progress=False)
    dump = tmp_path / "syn" / "train.bson"
    first_category = int((tmp_path / "syn" / "category_names.csv").read_text()
                         .splitlines()[1].split(",")[0])
    broken = {"_id": 999999, "category_id": first_category, "imgs": [{"picture": JPEG_OK}]}
    dump.write_bytes(bson.encode(broken) + dump.read_bytes())
    cfg = load_config(overrides=["spark.master=local[2]", "ingest.progress=false",
                                 "ingest.val_fraction=0.0"])
    data = str(tmp_path / "ds")
    run_ingest(spark, cfg, [str(dump)], str(tmp_path / "syn" / "category_names.csv"), data,
               "train")
    rows = parquet_rows(data, "train")
    assert (999999, 0) in rows  # it did reach images/
    with tdata.make_dataset(data, "train", tdata.InputOptions(
            label="l1", image_size=SIZE, batch_size=8, training=True, seed=1)) as ds:
        seen = sum(int(labels.shape[0]) for _, labels in ds.take(2 * len(rows) // 8 + 2))
    assert seen > len(rows)  # more than one pass over the split, no error
    got = collect(data, "train", label="l1")
    assert set(got) == set(rows) - {(999999, 0)}


# ------------------------------------------------------------------ DCT-scaled decode
def _real_jpegs(real_bson):
    import bson

    with open(real_bson, "rb") as fh:
        return [p["picture"] for d in bson.decode_file_iter(fh) for p in d["imgs"]]


def _mean_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def test_dct_ratio_keeps_the_shorter_side():
    assert cmodel.dct_ratio(180, 180, 64) == 2    # 90 >= 64, 45 < 64
    assert cmodel.dct_ratio(180, 180, 45) == 4    # ceil(180 / 4) = 45
    assert cmodel.dct_ratio(180, 180, 22) == 8    # ceil(180 / 8) = 23
    assert cmodel.dct_ratio(180, 180, 91) == 1
    assert cmodel.dct_ratio(500, 181, 46) == 4    # ceil(181 / 4) = 46: the shorter side rules
    assert cmodel.dct_ratio(500, 181, 47) == 2


@pytest.mark.parametrize("size", [45, 64, 80, 90, 128])
def test_scaled_decode_is_as_faithful_as_the_full_decode(real_bson, size):
    """Validation (and predict) pixels, DCT-scaled decode vs the reference full decode, both
    resized bilinearly to ``size``, over the official sample's 180 px pictures. The tolerance:
    the reference is itself an approximation — a bilinear resize from 180 px skips pixels
    (aliasing). Against the alias-free downscale (an area resize of the full decode) the fast
    path must be at least as close as the reference (or within one grey level where the
    reference is exact: a 2:1 bilinear resize is a box filter, libjpeg's scaled IDCT is not
    quite), and within 3 grey levels on average — a half-pixel shift, a flip or a channel swap
    is 10-40. Where no DCT scale fits (ratio 1) the pixels must be identical. Measured: fast
    0.8-2.5 from the ideal, reference 0-4.9 (45-128 px)."""
    import tensorflow as tf

    fast_err = ref_err = diff = 0.0  # mean absolute differences, grey levels of 255
    jpegs = _real_jpegs(real_bson)
    for jpeg in jpegs:
        ref = cmodel.decode_for_model(jpeg, size, dct_scaling=False).numpy()
        fast = cmodel.decode_for_model(jpeg, size, dct_scaling=True).numpy()
        area = tf.image.resize(tf.io.decode_jpeg(jpeg, channels=3), [size, size],
                               method="area").numpy()
        if cmodel.dct_ratio(180, 180, size) == 1:
            assert np.array_equal(fast, ref)
        fast_err += _mean_abs(fast, area) / len(jpegs)
        ref_err += _mean_abs(ref, area) / len(jpegs)
        diff += _mean_abs(fast, ref) / len(jpegs)
    assert fast_err <= max(ref_err, 1.0) and fast_err <= 3.0, (fast_err, ref_err, diff)


def test_batched_colour_is_the_per_picture_augmentation(real_bson):
    """The input pipeline's split of augment_image (decode and window per picture, geometry and
    colour per padded batch) gives augment_image's pixels."""
    import tensorflow as tf

    jpegs = _real_jpegs(real_bson)[:8]
    decode = tpic._decode_fn(64, True, 5, dct_scaling=False)
    ds = tf.data.Dataset.from_tensor_slices((tf.range(8, dtype=tf.int64), jpegs))
    ds = tpic._batch(ds.map(lambda i, j: decode(i, (j,))), 8, False, True)
    batch = next(iter(ds.map(tpic._per_batch(True, lambda x: x, 64))))[0]
    base = tf.constant([5, 0x5EED], dtype=tf.int64)
    for i, jpeg in enumerate(jpegs):
        one = taug.augment_image(tf.io.decode_jpeg(jpeg, channels=3), 64,
                                  tf.random.experimental.stateless_fold_in(
                                      base, tf.constant(i, tf.int64)))
        assert np.abs(batch[i].numpy() - one.numpy()).max() < 1e-3


@pytest.mark.parametrize("size", [64, 90])
def test_scaled_decode_keeps_the_training_augmentation(real_bson, size):
    """Training pixels with the same seeds: the warp's geometry is in units of the decoded
    picture, so a DCT-scaled decode gives the same crop, flip, rotation and colours; only the
    resampling differs, by about what the validation path differs (ratio 1: identically)."""
    import tensorflow as tf

    finish = tpic._per_batch(True, lambda x: x, size)

    def picture(dct: bool, i: int, jpeg: bytes):
        window, meta, u = tpic._decode_fn(size, True, 0, dct_scaling=dct)(
            tf.constant(i, tf.int64), (tf.constant(jpeg),))
        return finish(window[None], meta[None], u[None])[0][0]

    diffs, val = [], []
    for i, jpeg in enumerate(_real_jpegs(real_bson)):
        diffs.append(_mean_abs(picture(True, i, jpeg), picture(False, i, jpeg)))
        val.append(_mean_abs(cmodel.decode_for_model(jpeg, size, True),
                             cmodel.decode_for_model(jpeg, size, False)))
    if cmodel.dct_ratio(180, 180, size / taug.CROP_MIN) == 1:
        assert max(diffs) == 0.0
    else:
        assert np.mean(diffs) <= 1.25 * np.mean(val) + 0.5, (np.mean(diffs), np.mean(val))


def _smallest_train_branch(manifest):
    per_l1 = manifest.split("train").images_per_l1
    branch = min((int(b) for b, n in per_l1.items() if n >= 2), key=lambda b: per_l1[str(b)])
    return branch, per_l1[str(branch)]


@pytest.mark.parametrize("cache_mb", [256, 0])
def test_small_stream_is_read_once_then_repeated_from_memory(dataset, tmp_path, cache_mb):
    # with the cache the stream goes on once the files are gone (nothing is read after the
    # first pass); without it (the control) the reader's next pass must fail
    import shutil

    data, manifest, tax = dataset
    copy = tmp_path / "ds"
    shutil.copytree(data, copy)
    branch, rows = _smallest_train_branch(manifest)
    expected = {k for k, (l1, _) in parquet_rows(data, "train").items() if l1 == branch}
    groups = tshards.split_row_groups(str(copy), "train", branch)
    assert 0 < tshards.shard_jpeg_bytes(groups, 0, 1, False) < 1 << 20
    seen = Counter()
    with tdata.make_dataset(str(copy), "train", tdata.InputOptions(
            label="branch", branch=branch, taxonomy=tax, image_size=SIZE, batch_size=2,
            training=True, shuffle_buffer=4, return_keys=True, cache_mb=cache_mb)) as ds:
        it = iter(ds)
        for _ in range(rows):  # two passes of the branch
            seen.update(map(tuple, next(it)[2].numpy().tolist()))
        (copy / "images").rename(tmp_path / "moved")
        try:
            if cache_mb:
                for _ in range(20 * rows):
                    seen.update(map(tuple, next(it)[2].numpy().tolist()))
            else:
                with pytest.raises(tf.errors.OpError):  # the reader's error, via tf.data
                    for _ in range(2000):
                        next(it)
        finally:
            (tmp_path / "moved").rename(copy / "images")
    assert set(seen) == expected
    if cache_mb:
        # 42 passes' worth of rows, each pass every picture once (a 4-row shuffle buffer
        # only moves a few across a pass boundary)
        assert sum(seen.values()) == 42 * rows
        assert max(seen.values()) - min(seen.values()) <= 4


def test_a_cached_stream_serves_every_iterator(dataset):
    # Keras iterates a stream anew for each fit phase and each validation run, often stopping
    # before a whole pass: each new iterator must still get the whole stream
    data, manifest, _ = dataset
    rows = manifest.images("val")
    with tdata.make_dataset(data, "val", tdata.InputOptions(
            label="l1", image_size=SIZE, batch_size=4, training=False, return_keys=True,
            cache_mb=256)) as ds:
        first = [tuple(k) for _, _, keys in ds.take(1) for k in keys.numpy().tolist()]
        for _ in range(3):
            keys = [tuple(k) for _, _, ks in ds.take(-(-2 * rows // 4))
                    for k in ks.numpy().tolist()][:2 * rows]
            assert len(keys) == 2 * rows and Counter(Counter(keys).values()) == {2: rows}
            assert keys[:4] == first  # validation: the same order on every run


def test_cached_stream_shards_like_the_endless_one(dataset):
    # a branch with fewer validation rows than workers: tf.data shards the stream; cached or
    # not, each worker gets the same rows in the same order (and none gets nothing)
    data, manifest, tax = dataset
    per_l1 = manifest.split("val").images_per_l1
    branch = min((int(b) for b, n in per_l1.items() if n), key=lambda b: per_l1[str(b)])
    world = per_l1[str(branch)] + 2

    def keys(rank, cache_mb):
        with tdata.make_dataset(data, "val", tdata.InputOptions(
                label="l1", branch=branch, taxonomy=tax, image_size=SIZE, batch_size=2,
                training=False, return_keys=True, rank=rank, world_size=world,
                cache_mb=cache_mb)) as ds:
            return [tuple(k) for _, _, ks in ds.take(6) for k in ks.numpy().tolist()]

    for rank in range(world):
        cached = keys(rank, 256)
        assert len(cached) == 12 and cached == keys(rank, 0), rank


def test_cached_training_passes_change_row_group_order(dataset):
    # the endless reader gives each pass its own row-group order; the cached stream must too
    # (the row shuffle is off here, so only the row-group order can change)
    data, manifest, _ = dataset
    rows = manifest.images("train")
    assert len(tshards.split_row_groups(data, "train")) > 2
    with tdata.make_dataset(data, "train", tdata.InputOptions(
            label="l1", image_size=SIZE, batch_size=1, training=True, augment=False,
            shuffle_buffer=1, return_keys=True, cache_mb=256)) as ds:
        keys = [tuple(k) for _, _, ks in ds.take(3 * rows) for k in ks.numpy().tolist()]
    passes = [keys[i * rows:(i + 1) * rows] for i in range(3)]
    assert len(set(keys)) == rows, (len(set(keys)), rows, [len(set(p)) for p in passes])
    assert all(sorted(p) == sorted(passes[0]) and len(set(p)) == rows for p in passes)
    assert len({tuple(p) for p in passes}) > 1
