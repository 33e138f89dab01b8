"""Heads over a frozen trunk: refit and fusion models, their pooling, their training."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from test_train_models import _reloads_with_the_same_answers  # noqa: E402

from hierarchy.contracts import model as cmodel  # noqa: E402
from hierarchy.contracts.config import load_config  # noqa: E402
from hierarchy.infer.combine import ProductAccumulator  # noqa: E402
from hierarchy.train import experts, fusion, models  # noqa: E402
from hierarchy.train import heads as theads  # noqa: E402

N_L3 = 6


def _flat(seed: int):
    model = models.build_model("small_cnn", N_L3, 32)
    rng = np.random.default_rng(seed)
    layer = model.get_layer("logits")  # non-trivial rows: a fresh bias is zero
    layer.set_weights([w + rng.normal(0, 0.5, w.shape).astype(w.dtype)
                       for w in layer.get_weights()])
    return model


def _pool(probs, weights, pids) -> np.ndarray:
    acc = ProductAccumulator(probs.shape[1])
    acc.add(pids, probs, weights)
    return acc.finish()[1]


def test_refit_model_starts_as_the_flat_model_and_reloads(tmp_path):
    flat = _flat(1)
    refit = theads.build_refit_model(flat, hidden=4)
    assert refit.output_names == [cmodel.L3_OUTPUT]
    x = np.random.default_rng(2).random((5, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(refit.predict_on_batch(x), flat.predict_on_batch(x), atol=1e-5)
    _reloads_with_the_same_answers(refit, x, str(tmp_path / "refit.h5"))


def test_untrained_fusion_is_the_flat_model_with_predicts_geometric_mean(tmp_path):
    flat = _flat(3)
    kernel, bias = theads.expert_source_rows(flat, "all")
    head = theads.fusion_view_head(kernel, bias, hidden=8, dropout=0.0, score_hidden=4)
    fused = theads.build_fusion_model(flat, head)
    assert fused.output_names == [cmodel.L3_OUTPUT, cmodel.VIEW_SCORE]
    x = np.random.default_rng(4).random((7, 32, 32, 3), dtype=np.float32)
    probs, scores = fused.predict_on_batch(x)
    np.testing.assert_allclose(probs, flat.predict_on_batch(x), atol=1e-5)
    assert np.abs(scores).max() == 0.0  # every picture weighs the same
    # the product model it is trained as: products of 3, 2 and 2 pictures, padded to 3
    feats = flat.get_layer("backbone").predict_on_batch(x)
    pids = np.array([0, 0, 0, 1, 1, 2, 2])
    batch, mask = np.zeros((3, 3, feats.shape[1]), np.float32), np.zeros((3, 3), bool)
    for p, f in zip(pids, feats):
        k = int(mask[p].sum())
        batch[p, k], mask[p, k] = f, True
    product = theads.fusion_product_model(head).predict_on_batch([batch, mask])
    np.testing.assert_allclose(product, _pool(probs.astype(np.float64), None, pids), atol=1e-5)
    _reloads_with_the_same_answers(fused, x, str(tmp_path / "fusion.h5"))


def test_fusion_over_a_multi_level_trunk_starts_as_its_level_3():
    from hierarchy.contracts.taxonomy import Taxonomy

    tax = Taxonomy.from_rows([(10 + i, f"L1 {i // 3}", f"L2 {i // 3}", f"leaf {i}")
                              for i in range(N_L3)])
    multi = models.build_multi_model("small_cnn", tax, 32)
    kernel, bias = theads.expert_source_rows(multi, "all")  # the level-3 head's rows
    fused = theads.build_fusion_model(
        multi, theads.fusion_view_head(kernel, bias, hidden=4, dropout=0.0, score_hidden=4))
    x = np.random.default_rng(8).random((3, 32, 32, 3), dtype=np.float32)
    want = dict(zip(multi.output_names, multi.predict_on_batch(x)))[cmodel.L3_OUTPUT]
    np.testing.assert_allclose(fused.predict_on_batch(x)[0], want, atol=1e-5)


def test_view_pooling_weighs_pictures_as_predicts_accumulator_does():
    rng = np.random.default_rng(5)
    counts = [1, 4, 2, 3]
    pids = np.repeat(np.arange(len(counts)), counts)
    probs = rng.dirichlet(np.ones(N_L3), size=pids.size)
    scores = rng.uniform(-6, 6, size=pids.size)
    views = max(counts)
    padded = np.full((len(counts) * views, N_L3), 1.0 / N_L3, np.float32)
    padded_scores = np.full(len(counts) * views, 50.0, np.float32)  # padding must not count
    mask = np.zeros((len(counts), views), bool)
    for i, p in enumerate(pids):
        k = int(mask[p].sum())
        padded[p * views + k], padded_scores[p * views + k], mask[p, k] = probs[i], scores[i], True
    pooled = cmodel.ViewPooling()(tf.constant(padded), tf.constant(padded_scores),
                                  tf.constant(mask)).numpy()
    np.testing.assert_allclose(pooled, _pool(probs, np.exp(scores), pids), atol=1e-5)
    # batched in two parts, the accumulator gives the same product
    acc = ProductAccumulator(N_L3)
    acc.add(pids[:3], probs[:3], np.exp(scores[:3]))
    acc.add(pids[3:], probs[3:], np.exp(scores[3:]))
    np.testing.assert_allclose(acc.finish()[1], _pool(probs, np.exp(scores), pids), atol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        ProductAccumulator(N_L3).add(pids, probs, -np.ones(pids.size))


# ----------------------------------------------------------------------------- training
DIM = 8
PACKAGING = 6  # the feature a packaging shot carries: the source reads it as leaf 0


def _products(n: int, rng, views=(0, 1, 2, 3)):
    """Features of products with one front view (its class, clearly) and extra packaging
    shots that the source model reads, confidently, as class 0."""
    rows, labels = [], []
    for pid in range(n):
        c = int(rng.integers(N_L3))
        front = rng.normal(0, 0.3, DIM)
        front[c] += 2.0
        extra = int(rng.choice(views))
        pictures = [front] + [np.r_[rng.normal(0, 0.3, N_L3), 1.0, rng.normal(0, 0.3)]
                              for _ in range(extra)]
        order = rng.permutation(len(pictures))  # the front is not always first
        rows += [(pid, k, c, pictures[j]) for k, j in enumerate(order)]
        labels.append(c)
    return rows, np.array(labels)


def _write(root: str, split: str, rows) -> None:
    """Through experts' own writer, as the feature pass writes them."""
    keys = np.array([(r[0], r[1]) for r in rows], np.int64)
    x = np.stack([r[3] for r in rows]).astype(np.float32)
    y = np.array([r[2] for r in rows], np.int32)
    batches = [(tf.constant(x[i:i + 64]), tf.constant(y[i:i + 64]), tf.constant(keys[i:i + 64]))
               for i in range(0, len(rows), 64)]
    experts._write_features(root, split, 0, lambda t, training: t, batches,
                            np.zeros(N_L3, np.int64))


def _source_rows():
    kernel = np.zeros((DIM, N_L3), np.float32)
    kernel[np.arange(N_L3), np.arange(N_L3)] = 2.0
    kernel[PACKAGING, 0] = 4.0
    return kernel, np.zeros(N_L3, np.float32)


def test_fusion_answers_from_the_front_view_where_the_geometric_mean_fails(tmp_path):
    rng = np.random.default_rng(7)
    root = str(tmp_path / "features")
    _write(root, "train", _products(1500, rng)[0])
    _write(root, "val", _products(200, rng)[0])
    # the gathering: every product whole, padded and masked, at most max_views pictures
    feats, mask, y = fusion.product_arrays(experts.feature_files(root, "val")[0], None, None)
    assert feats.shape[2] == DIM and mask.sum(axis=1).min() >= 1 and mask.sum(axis=1).max() == 4
    capped = fusion.product_arrays(experts.feature_files(root, "val")[0], 2,
                                   np.random.default_rng(0))
    assert capped[1].shape[1] == 2 and (capped[2] == y).all()

    kernel, bias = _source_rows()
    tcfg = load_config(overrides=[
        "train.fusion_hidden=16", "train.fusion_dropout=0.0", "train.fusion_score_hidden=8",
        "train.fusion_learning_rate=0.01", "train.fusion_label_smoothing=0.0",
        "train.fusion_epochs=8", "train.fusion_max_views=4", "train.batch_size=64",
        "train.shuffle_buffer=512"]).train
    trained = fusion.train_fusion_head(root, kernel, bias, tcfg, seed=1)
    head = trained["head"]
    assert trained["val_product_accuracy"] > trained["val_product_accuracy_initial"]

    # unseen products with packaging shots, nine pictures for some (training saw four)
    rows, labels = _products(300, rng, views=(2, 3, 8))
    pids = np.array([r[0] for r in rows])
    x = np.stack([r[3] for r in rows]).astype(np.float32)
    source = tf.nn.softmax(x @ kernel + bias).numpy().astype(np.float64)
    geometric = _pool(source, None, pids).argmax(axis=1)
    probs, scores = head.predict_on_batch(x)
    fused = _pool(probs.astype(np.float64), np.exp(scores.astype(np.float64)), pids)
    assert np.allclose(fused.sum(axis=1), 1.0)
    assert (geometric == labels).mean() < 0.4  # the packaging shots outvote the front
    assert (fused.argmax(axis=1) == labels).mean() > 0.9
    nine = np.bincount(pids) == 9
    assert nine.any() and (fused.argmax(axis=1)[nine] == labels[nine]).all()


def test_the_tuning_holdout_is_a_stable_share_of_products():
    from hierarchy.train.tuning import in_holdout

    ids = np.arange(200_000, dtype=np.int64) * 7 + 3
    held = in_holdout(ids, 0.1)
    assert 0.095 < held.mean() < 0.105
    assert (in_holdout(ids[::-1], 0.1) == held[::-1]).all()  # per id, not per position
    assert (in_holdout(ids, 0.05) <= held).all()  # a smaller share is inside a larger one


@pytest.mark.parametrize("kind", ["fusion", "refit"])
def test_a_search_trains_beside_a_train_holdout_and_never_reads_val(tmp_path, monkeypatch,
                                                                    kind):
    import types

    import pyarrow.parquet as pq

    rng = np.random.default_rng(11)
    root = str(tmp_path / "features")
    _write(root, "train", _products(600, rng)[0])
    _write(root, "val", _products(100, rng)[0])
    kernel, bias = _source_rows()
    cfg = load_config(overrides=[
        "train.fusion_hidden=8", "train.fusion_dropout=0.0", "train.fusion_score_hidden=8",
        "train.fusion_learning_rate=0.01", "train.fusion_label_smoothing=0.0",
        "train.fusion_epochs=2", "train.fusion_max_views=4", "train.expert_hidden=8",
        "train.expert_dropout=0.0", "train.expert_learning_rate=0.01", "train.expert_epochs=2",
        "train.batch_size=64", "train.shuffle_buffer=256", "train.seed=1",
        "tune.trials=3", "tune.holdout=0.2", "tune.seed=3", "tune.learning_rate=[0.001, 0.03]",
        "tune.hidden=[0, 8]", "tune.dropout=[0.0, 0.3]", "tune.epochs=[1, 3]",
        "tune.label_smoothing=[0.0, 0.1]"])
    tcfg, space = cfg.train, cfg.tune
    opened = []
    for name in ("read_table",):
        real = getattr(pq, name)
        monkeypatch.setattr(pq, name, lambda path, *a, _r=real, **k: (opened.append(path),
                                                                      _r(path, *a, **k))[1])
    real_open = pq.ParquetFile.__init__
    monkeypatch.setattr(pq.ParquetFile, "__init__",
                        lambda self, path, *a, **k: (opened.append(path),
                                                     real_open(self, path, *a, **k))[1])
    taxonomy = types.SimpleNamespace(n_l3=N_L3, n_l1=1)
    got = experts.tune(kind, root, kernel, bias, taxonomy, tcfg, space)
    monkeypatch.undo()
    assert opened and not [p for p in opened if "split=val" in str(p)]
    assert len(got["trials"]) == 3 and got["holdout"] == 0.2
    # the configured values are the first trial: other values win only by scoring better
    prefix = "fusion_" if kind == "fusion" else "expert_"
    assert got["trials"][0]["values"] == got["untuned"] == {
        k: v for k, v in tcfg.model_dump().items() if k in got["untuned"]}
    assert got["untuned_holdout_accuracy"] == got["trials"][0]["holdout_accuracy"]
    best = max(got["trials"], key=lambda t: t["holdout_accuracy"])
    assert got["best"] == best["values"]
    assert got["best_holdout_accuracy"] == best["holdout_accuracy"] > 0
    assert all(k.startswith(prefix) for k in got["best"])
    assert 1 <= got["best"][prefix + "epochs"] <= 3 and got["best"][prefix + "hidden"] in (0, 8)
    # a hold-out with no product scores nothing: the configured values stay
    empty = experts.tune(kind, root, kernel, bias, taxonomy, tcfg,
                         space.model_copy(update={"holdout": 1e-12, "trials": 2}))
    assert empty["best"] == empty["untuned"] and empty["best_holdout_accuracy"] is None
