"""Model builders: backbones, local-only weights, training phases, backbone copy, loss, saving."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from hierarchy.contracts import model as cmodel  # noqa: E402
from hierarchy.train import heads as theads  # noqa: E402
from hierarchy.train import models  # noqa: E402

APPS = ["mobilenet_v2", "efficientnet_b0", "resnet50", "inception_v3"]
SIZE = {"inception_v3": 75}  # the others build at 32


pytestmark = pytest.mark.usefixtures("fresh_keras")  # conftest.py


def _weights_equal(a, b) -> bool:
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb))


# ---------------------------------------------------------------- building


def test_backbones_listed():
    assert set(models.BACKBONES) >= {"small_cnn", *APPS}
    assert all(callable(b) for b in models.BACKBONES.values())


@pytest.mark.parametrize("backbone", ["small_cnn", *APPS])
def test_every_backbone_builds_offline(backbone):
    size = SIZE.get(backbone, 32)
    model = models.build_model(backbone, 7, size, name=f"m_{backbone}")
    assert model.name == f"m_{backbone}"
    body = model.get_layer("backbone")
    assert isinstance(body, tf.keras.Model)
    assert len(body.output_shape) == 2  # pooled features
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    y = model(cmodel.preprocess_for(backbone)(tf.constant(x)), training=False)
    assert y.shape == (2, 7) and y.dtype == tf.float32
    np.testing.assert_allclose(y.numpy().sum(axis=1), 1.0, rtol=1e-5)


def test_small_cnn_is_small():
    body = models.build_model("small_cnn", 3, 32).get_layer("backbone")
    assert 50_000 < body.count_params() < 200_000


def test_minimum_image_sizes():
    with pytest.raises(ValueError, match="inception_v3.*75"):
        models.build_model("inception_v3", 3, 74)
    with pytest.raises(ValueError, match="32"):
        models.build_model("mobilenet_v2", 3, 31)
    with pytest.raises(ValueError, match="unknown backbone"):
        models.build_model("vgg16", 3, 64)


def test_mixed_precision_keeps_float32_output():
    assert models.enable_mixed_precision_if_gpu("on") == "mixed_float16"
    model = models.build_model("small_cnn", 5, 32)
    assert model.get_layer("logits").compute_dtype == "float16"
    y = model(tf.zeros((1, 32, 32, 3)), training=False)
    assert y.dtype == tf.float32
    assert models.enable_mixed_precision_if_gpu("off") == "float32"
    expected = "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    assert models.enable_mixed_precision_if_gpu("auto") == expected
    assert tf.keras.mixed_precision.global_policy().name == expected
    with pytest.raises(ValueError):
        models.enable_mixed_precision_if_gpu("maybe")


@pytest.mark.parametrize("backbone", ["small_cnn", *APPS])
def test_preprocess_runs_in_tf_data(backbone):
    pre = cmodel.preprocess_for(backbone)
    img = tf.fill((4, 4, 3), 255.0)
    ds = tf.data.Dataset.from_tensors(img).map(pre)
    out = next(iter(ds)).numpy()
    assert out.dtype == np.float32 and out.shape == (4, 4, 3)
    expected = {"small_cnn": 1.0, "mobilenet_v2": 1.0, "inception_v3": 1.0,
                "efficientnet_b0": 255.0}  # EfficientNet rescales inside the model
    if backbone in expected:
        np.testing.assert_allclose(out, expected[backbone], rtol=1e-6)
    else:  # resnet50: caffe mode, BGR minus the ImageNet means
        np.testing.assert_allclose(out[0, 0], [255 - 103.939, 255 - 116.779, 255 - 123.68],
                                   rtol=1e-5)


# ---------------------------------------------------------------- weights


def test_check_weights_none_ok():
    for backbone in models.BACKBONES:
        models.check_weights(backbone, None)


@pytest.mark.parametrize("backbone,expected", [
    ("mobilenet_v2", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
    ("efficientnet_b0", "efficientnetb0_notop.h5"),
    ("resnet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ("inception_v3", "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
])
@pytest.mark.parametrize("weights", ["imagenet", "/nonexistent/dir/w.h5"])
def test_check_weights_refuses_downloads_and_missing_files(backbone, expected, weights):
    with pytest.raises(models.WeightsUnavailable) as info:
        models.check_weights(backbone, weights)
    msg = str(info.value)
    assert backbone in msg and expected in msg and "train.weights" in msg
    assert "no network" in msg
    # build_model checks first: nothing is built, nothing is downloaded
    with pytest.raises(models.WeightsUnavailable):
        models.build_model(backbone, 3, SIZE.get(backbone, 32), weights=weights)


def test_check_weights_small_cnn_and_bad_types(tmp_path):
    with pytest.raises(models.WeightsUnavailable, match="train.weights"):
        models.check_weights("small_cnn", "imagenet")
    with pytest.raises(models.WeightsUnavailable, match="efficientnetb0_notop.h5"):
        models.check_weights("efficientnet_b0", True)
    with pytest.raises(models.WeightsUnavailable):
        models.check_weights("resnet50", str(tmp_path))  # a directory is not a weights file


def test_local_weights_file_loads(tmp_path):
    # stand-in for Keras' no-top file: saved from the plain application (its own layer and
    # model names, as in the real file), loaded into our renamed "backbone" sub-model
    app = tf.keras.applications.MobileNetV2(include_top=False, weights=None,
                                            input_shape=(32, 32, 3), pooling="avg")
    rng = np.random.default_rng(1)
    app.set_weights([rng.normal(size=w.shape).astype("float32") for w in app.get_weights()])
    path = tmp_path / models.expected_weights_file("mobilenet_v2")
    app.save_weights(str(path))

    models.check_weights("mobilenet_v2", str(path))
    model = models.build_model("mobilenet_v2", 4, 32, weights=str(path))
    assert _weights_equal(model.get_layer("backbone"), app)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model.get_layer("backbone")(x, training=False),
                               app(x, training=False), rtol=1e-5, atol=1e-5)


def test_mismatched_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "small.h5"
    models.build_model("small_cnn", 3, 32).get_layer("backbone").save_weights(str(path))
    tf.keras.backend.clear_session()
    with pytest.raises(ValueError, match="train.weights must be resnet50_weights"):
        models.build_model("resnet50", 3, 32, weights=str(path))


# ---------------------------------------------------------------- phases and copying


def _trainable_count(model) -> int:
    return len(model.trainable_weights)


def test_set_phase_mobilenet():
    model = models.build_model("mobilenet_v2", 5, 32)
    body = model.get_layer("backbone")
    head = 2  # Dense kernel + bias

    models.set_phase(model, "head", 20)
    assert not body.trainable and _trainable_count(model) == head

    models.set_phase(model, "fine_tune", 20)
    top = body.layers[-20:]
    expected = sum(len(layer.trainable_weights) for layer in top
                   if not isinstance(layer, tf.keras.layers.BatchNormalization))
    assert expected > 0
    assert _trainable_count(model) == head + expected
    assert not any(layer.trainable for layer in body.layers[:-20])
    bns = [la for la in body.layers if isinstance(la, tf.keras.layers.BatchNormalization)]
    assert bns and not any(bn.trainable for bn in bns)
    assert any(isinstance(la, tf.keras.layers.BatchNormalization) for la in top)

    models.set_phase(model, "full", 20)
    all_trainable = sum(len(la.trainable_weights) for la in body.layers)
    assert all(bn.trainable for bn in bns)
    assert _trainable_count(model) == head + all_trainable
    # full -> head -> fine_tune again: a phase does not depend on the one before
    models.set_phase(model, "head", 20)
    models.set_phase(model, "fine_tune", 20)
    assert _trainable_count(model) == head + expected

    with pytest.raises(ValueError, match="unknown phase"):
        models.set_phase(model, "warmup", 3)


def test_set_phase_small_cnn_full():
    model = models.build_model("small_cnn", 3, 32)
    models.set_phase(model, "full", 0)
    # 4 conv kernels + 4 x (BN gamma, beta) + Dense kernel, bias
    assert _trainable_count(model) == 4 + 8 + 2
    models.set_phase(model, "fine_tune", 0)
    assert _trainable_count(model) == 2


def test_copy_backbone():
    a = models.build_model("small_cnn", 3, 32, name="level1")
    b = models.build_model("small_cnn", 11, 48, name="branch_0")
    assert not _weights_equal(a.get_layer("backbone"), b.get_layer("backbone"))
    head_before = b.get_layer("logits").get_weights()
    models.copy_backbone(a, b)
    assert _weights_equal(a.get_layer("backbone"), b.get_layer("backbone"))
    for x, y in zip(head_before, b.get_layer("logits").get_weights()):
        np.testing.assert_array_equal(x, y)

    c = models.build_model("mobilenet_v2", 3, 32, name="other")
    with pytest.raises(ValueError, match="architectures differ"):
        models.copy_backbone(a, c)


def test_load_backbone_reads_a_model_file_once_per_version(tmp_path):
    import os

    a = models.build_model("small_cnn", 3, 32, name="level1")
    path = str(tmp_path / "level1.h5")
    a.save(path)
    first = models.load_backbone(path)
    assert models.load_backbone(path) is first  # the next branch model: no second read
    b = models.build_model("small_cnn", 11, 48, name="branch_0")
    models.copy_backbone(first, b)
    assert _weights_equal(a.get_layer("backbone"), b.get_layer("backbone"))

    # the file replaced (a level 1 trained again): its new weights are read
    other = models.build_model("small_cnn", 3, 32, name="level1")
    other.save(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = models.load_backbone(path)
    assert second is not first
    models.copy_backbone(second, b)
    assert _weights_equal(other.get_layer("backbone"), b.get_layer("backbone"))
    with pytest.raises(ValueError, match="architectures differ"):
        models.copy_backbone(second, models.build_model("mobilenet_v2", 3, 32, name="x"))


# ---------------------------------------------------------------- loss, learning, saving


def _colour_data(n: int, size: int, n_classes: int, seed: int):
    """Noise images whose label is the channel with the highest mean (a strong signal)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    x = rng.uniform(0, 120, (n, size, size, 3)).astype("float32")
    x[np.arange(n), :, :, y] += 120.0
    return x / 255.0, y.astype("int32")


def test_smoothed_loss_matches_categorical():
    y_true = tf.constant([0, 2, 1])
    y_pred = tf.constant([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])
    for eps in (0.0, 0.1):
        ours = cmodel.SmoothedSparseCrossentropy(eps)(y_true, y_pred)
        ref = tf.keras.losses.CategoricalCrossentropy(label_smoothing=eps)(
            tf.one_hot(y_true, 3), y_pred)
        np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6)
    # labels shaped (batch, 1) as some pipelines yield them
    np.testing.assert_allclose(
        cmodel.SmoothedSparseCrossentropy(0.1)(tf.reshape(y_true, (-1, 1)), y_pred).numpy(),
        cmodel.SmoothedSparseCrossentropy(0.1)(y_true, y_pred).numpy(), rtol=1e-6)


def test_small_cnn_learns_colour():
    tf.keras.utils.set_random_seed(3)
    x, y = _colour_data(384, 32, 3, seed=3)
    model = models.build_model("small_cnn", 3, 32)
    models.set_phase(model, "full", 0)
    models.compile_model(model, 3e-3, 0.1)
    hist = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    assert {"loss", "accuracy", "top5"} <= set(hist.history)
    assert hist.history["accuracy"][-1] > 0.8  # chance is 1/3
    # held out, in inference mode: the BatchNorm moving statistics caught up too
    xv, yv = _colour_data(96, 32, 3, seed=103)
    assert model.evaluate(xv, yv, verbose=0, return_dict=True)["accuracy"] > 0.8
    assert hist.history["top5"][-1] == 1.0  # k = min(5, 3): every label is in the top 3
    assert hist.history["loss"][-1] < hist.history["loss"][0]


def test_saved_model_reloads_with_same_predictions(tmp_path):
    x, y = _colour_data(64, 32, 3, seed=5)
    model = models.build_model("small_cnn", 3, 32, name="level1")
    models.set_phase(model, "full", 0)
    models.compile_model(model, 1e-3, 0.2)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = tmp_path / "level1.keras"
    model.save(str(path))

    tf.keras.backend.clear_session()
    loaded = tf.keras.models.load_model(str(path))  # the loss is registered: no custom_objects
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    assert isinstance(loaded.loss, cmodel.SmoothedSparseCrossentropy)
    assert loaded.loss.label_smoothing == pytest.approx(0.2)
    assert loaded.get_layer("backbone").count_params() == \
        model.get_layer("backbone").count_params()
    # and it trains on after reloading (the optimizer and loss came back)
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0)
    # custom_objects() keeps working for callers that pass it
    again = tf.keras.models.load_model(str(path), custom_objects=cmodel.custom_objects())
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- multi-level model
from hierarchy.infer.combine import marginal_l1  # noqa
from hierarchy.train.targets import kinship_smoothing, smoothing_targets  # noqa
from hierarchy.contracts.taxonomy import Taxonomy  # noqa: E402

MULTI_ROWS = [(10 + i, f"L{i % 3}", f"M{i % 6}", f"leaf{i}") for i in range(18)]
MULTI_TAX = Taxonomy.from_rows(MULTI_ROWS)


def test_multi_model_outputs_agree_with_the_taxonomy(tmp_path):
    model = models.build_multi_model("small_cnn", MULTI_TAX, 32)
    assert tuple(model.output_names) == cmodel.MULTI_OUTPUTS
    x = np.random.default_rng(0).random((5, 32, 32, 3), dtype=np.float32)
    out = dict(zip(model.output_names, model.predict_on_batch(x)))
    p3 = out[cmodel.L3_OUTPUT]
    np.testing.assert_allclose(out[cmodel.L1_SUM], marginal_l1(p3, MULTI_TAX), atol=1e-6)
    node, n_nodes = models.level2_nodes(MULTI_TAX)
    assert out[cmodel.L2_SUM].shape == (5, n_nodes) == out[cmodel.L2_HEAD].shape
    cond = out[cmodel.CONDITIONAL]
    for b in range(MULTI_TAX.n_l1):  # one softmax per level-1 branch
        np.testing.assert_allclose(cond[:, MULTI_TAX.branch(b)].sum(1), 1.0, atol=1e-5)
    # the HDF5 file the store publishes loads back with the same answers
    _reloads_with_the_same_answers(model, x, str(tmp_path / "multi.h5"))


def _reloads_with_the_same_answers(model, x, path: str) -> None:
    model.save(path, include_optimizer=False)
    again = tf.keras.models.load_model(path, custom_objects=cmodel.custom_objects(),
                                       compile=False)
    for a, b in zip(model.predict_on_batch(x), again.predict_on_batch(x)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_no_training_phase_unfreezes_the_summing_layers():
    model = models.build_multi_model("small_cnn", MULTI_TAX, 32)
    for phase in models.PHASES:
        models.set_phase(model, phase, 2)
        assert not model.get_layer(cmodel.L1_SUM).trainable_weights


def test_kinship_loss_builds_the_smoothing_targets():
    node, _ = models.level2_nodes(MULTI_TAX)
    kin = kinship_smoothing(MULTI_TAX, 0.2)
    loss = cmodel.KinshipCrossentropy(kin, MULTI_TAX.l1_of_l3, node)
    y = np.array([0, 5, 17])
    np.testing.assert_allclose(loss.targets(tf.constant(y)).numpy(),
                               smoothing_targets(kin, MULTI_TAX, y), atol=1e-6)
    again = cmodel.KinshipCrossentropy.from_config(loss.get_config())
    np.testing.assert_allclose(again.targets(tf.constant(y)).numpy(),
                               loss.targets(tf.constant(y)).numpy())


def test_branch_loss_is_the_conditional_nll_inside_the_true_branch():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, MULTI_TAX.n_l3)).astype(np.float32)
    cond = cmodel.BranchSoftmax(MULTI_TAX.l1_of_l3, MULTI_TAX.n_l1)(logits).numpy()
    y = np.array([0, 4, 9, 17])
    got = cmodel.BranchCrossentropy(MULTI_TAX.l1_of_l3)(tf.constant(y), cond).numpy()
    assert got == pytest.approx(-np.mean(np.log(cond[np.arange(4), y])), rel=1e-5)
    # smoothing spreads over the true branch's leaves only
    eps = 0.3
    smooth = cmodel.BranchCrossentropy(MULTI_TAX.l1_of_l3, eps)
    per = smooth.call(tf.constant(y), cond).numpy()
    for i, leaf in enumerate(y):
        leaves = MULTI_TAX.branch(MULTI_TAX.l1_of_l3[leaf])
        target = np.full(len(leaves), eps / len(leaves))
        target[list(leaves).index(leaf)] += 1 - eps
        assert per[i] == pytest.approx(-np.sum(target * np.log(cond[i, leaves])), rel=1e-5)


# ---------------------------------------------------------------- branch experts
from hierarchy.infer.combine import leaf_conditional  # noqa: E402


def _randomised(model, seed: int):
    """Non-trivial head weights (a fresh Dense bias is zero; the test must see real rows);
    the backbone is left alone, so the softmaxes do not saturate."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.name != "backbone" and layer.weights:
            layer.set_weights([w + rng.normal(0, 0.5, w.shape).astype(w.dtype)
                               for w in layer.get_weights()])
    return model


def test_experts_start_as_the_multi_models_conditional(tmp_path):
    multi = _randomised(models.build_multi_model("small_cnn", MULTI_TAX, 32), 2)
    experts = theads.build_experts_model(multi, MULTI_TAX, hidden=8)
    assert tuple(experts.output_names) == (cmodel.L3_OUTPUT, cmodel.L1_HEAD, cmodel.CONDITIONAL)
    x = np.random.default_rng(3).random((6, 32, 32, 3), dtype=np.float32)
    want = dict(zip(multi.output_names, multi.predict_on_batch(x)))
    got = dict(zip(experts.output_names, experts.predict_on_batch(x)))
    for name in experts.output_names:  # before training: the multi-level model, exactly
        np.testing.assert_allclose(got[name], want[name], atol=1e-5)
    # one branch's expert, as trained alone, from the same rows: the same conditional
    layer = experts.get_layer("branch_experts")
    features = multi.get_layer("backbone").predict_on_batch(x)
    for b in range(MULTI_TAX.n_l1):
        head = theads.expert_of(layer, b)
        np.testing.assert_allclose(head.predict_on_batch(features),
                                   want[cmodel.CONDITIONAL][:, MULTI_TAX.branch(b)], atol=1e-5)
    # a trained head copied back changes its branch only, and the file keeps it
    head = _randomised(theads.expert_of(layer, 1), 4)
    theads.set_expert(layer, 1, head)
    after = dict(zip(experts.output_names, experts.predict_on_batch(x)))[cmodel.CONDITIONAL]
    np.testing.assert_allclose(after[:, MULTI_TAX.branch(1)], head.predict_on_batch(features),
                               atol=1e-5)
    others = [leaf for b in (0, 2) for leaf in MULTI_TAX.branch(b)]
    np.testing.assert_allclose(after[:, others], want[cmodel.CONDITIONAL][:, others], atol=1e-6)
    assert not np.allclose(after[:, MULTI_TAX.branch(1)],
                           want[cmodel.CONDITIONAL][:, MULTI_TAX.branch(1)], atol=1e-3)
    _reloads_with_the_same_answers(experts, x, str(tmp_path / "experts.h5"))


def test_experts_over_a_flat_model_start_as_its_conditional():
    flat = _randomised(models.build_model("small_cnn", MULTI_TAX.n_l3, 32), 5)
    experts = theads.build_experts_model(flat, MULTI_TAX, hidden=0)
    x = np.random.default_rng(6).random((4, 32, 32, 3), dtype=np.float32)
    p_flat = flat.predict_on_batch(x)
    out = dict(zip(experts.output_names, experts.predict_on_batch(x)))
    np.testing.assert_allclose(out[cmodel.L3_OUTPUT], p_flat, atol=1e-6)
    np.testing.assert_allclose(out[cmodel.L1_HEAD], marginal_l1(p_flat, MULTI_TAX), atol=1e-5)
    np.testing.assert_allclose(out[cmodel.CONDITIONAL], leaf_conditional(p_flat, MULTI_TAX),
                               atol=1e-5)


def test_one_expert_over_every_leaf_starts_as_the_flat_model():
    flat = _randomised(models.build_model("small_cnn", MULTI_TAX.n_l3, 32), 8)
    experts = theads.build_experts_model(flat, MULTI_TAX, hidden=4, groups="all")
    layer = experts.get_layer(cmodel.EXPERTS_LAYER)
    assert layer.n_groups == 1 and set(layer.groups) == {0}
    x = np.random.default_rng(9).random((4, 32, 32, 3), dtype=np.float32)
    out = dict(zip(experts.output_names, experts.predict_on_batch(x)))
    np.testing.assert_allclose(out[cmodel.CONDITIONAL], flat.predict_on_batch(x), atol=1e-5)
    with pytest.raises(ValueError, match="branch, all"):
        theads.expert_groups(MULTI_TAX, "level2")
    # over a multi-level model, one expert is a refit of its level 3, not of its branch head
    multi = _randomised(models.build_multi_model("small_cnn", MULTI_TAX, 32), 10)
    one = theads.build_experts_model(multi, MULTI_TAX, hidden=4, groups="all")
    got = dict(zip(one.output_names, one.predict_on_batch(x)))
    np.testing.assert_allclose(got[cmodel.CONDITIONAL], got[cmodel.L3_OUTPUT], atol=1e-5)
