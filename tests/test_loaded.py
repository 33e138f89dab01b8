"""A scoring worker runs a model's trunk and head apart, so that models on the same trunk
(flat, refit and fusion) compute its features once per picture: the outputs must be the
whole model's, bit for bit."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from hierarchy.contracts.model import EXPERTS_LAYER, custom_objects  # noqa: E402
from hierarchy.infer import loaded  # noqa: E402
from hierarchy.infer.modelset import ModelRef  # noqa: E402
from hierarchy.train import heads as theads  # noqa: E402
from hierarchy.train import models as tmodels  # noqa: E402

SIZE, CLASSES = 48, 12


def _randomise(model, seed):
    """Trained-looking weights: every head differs from its source, so a mix-up shows."""
    rng = np.random.default_rng(seed)
    # a batch-norm variance is never negative: one that is makes every output NaN, and NaN
    # equals nothing, not even itself (bit-for-bit comparisons would fail on every machine)
    model.set_weights([(np.abs(v) + 0.05 if "moving_variance" in w.name else v).astype(v.dtype)
                       for w, v in ((w, rng.normal(0, 0.2, w.shape)) for w in model.weights)])


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loaded")
    flat = tmodels.build_model("small_cnn", CLASSES, SIZE, name="flat")
    _randomise(flat, 1)
    refit = theads.build_refit_model(flat, 16)
    _randomise(refit.get_layer(EXPERTS_LAYER), 2)
    kernel, bias = theads.expert_source_rows(flat, "all")
    view_head = theads.fusion_view_head(kernel, bias, 8, 0.0, 4)
    _randomise(view_head, 3)
    fusion = theads.build_fusion_model(flat, view_head)
    level1 = tmodels.build_model("small_cnn", 3, SIZE, name="level1")  # a trunk of its own
    _randomise(level1, 4)
    out = {}
    for name, model in (("flat", flat), ("refit", refit), ("fusion", fusion),
                        ("level1", level1)):
        path = str(folder / f"{name}.h5")
        model.save(path)
        out[name] = ModelRef(key=name, path=path, backbone="small_cnn", image_size=SIZE)
    return out


def _whole(ref, x):
    """What scoring ran before the split: the whole model as one compiled function."""
    model = tf.keras.models.load_model(ref.path, custom_objects=custom_objects(),
                                       compile=False)
    spec = tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32)
    out = tf.function(lambda t: model(t, training=False), input_signature=[spec])(x)
    return [o.numpy() for o in out] if isinstance(out, (list, tuple)) else [out.numpy()]


def test_models_on_one_trunk_share_its_features_and_keep_their_outputs(refs):
    x = np.random.default_rng(0).uniform(0, 1, (9, SIZE, SIZE, 3)).astype(np.float32)
    keys = {name: loaded.trunk_key(ref) for name, ref in refs.items()}
    assert keys["flat"] == keys["refit"] == keys["fusion"] != keys["level1"]
    cache = {}
    for name, ref in refs.items():
        got = loaded.outputs(ref, x, cache, ("pictures",))
        want = _whole(ref, x)
        assert len(got) == len(want) == (2 if name == "fusion" else 1)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and np.array_equal(g, w), name  # bit for bit
    # one trunk pass for flat, refit and fusion, one for level 1
    assert sorted(k[1] == keys["flat"] for k in cache if k[0] == "features") == [False, True]
    # other pictures (another input key) are other features
    loaded.outputs(refs["flat"], x[:4], cache, ("pictures", "rows 0-3"))
    assert sum(k[0] == "features" for k in cache) == 3


def test_a_model_without_a_backbone_layer_runs_whole(tmp_path):
    inputs = tf.keras.Input((SIZE, SIZE, 3), name="image")
    pooled = tf.keras.layers.GlobalAveragePooling2D()(inputs)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(CLASSES, activation="softmax")(pooled))
    path = str(tmp_path / "plain.h5")
    model.save(path)
    ref = ModelRef(key="flat", path=path, backbone="small_cnn", image_size=SIZE)
    x = np.random.default_rng(1).uniform(0, 1, (3, SIZE, SIZE, 3)).astype(np.float32)
    cache = {}
    (got,) = loaded.outputs(ref, x, cache, ("pictures",))
    assert loaded.trunk_key(ref).startswith("whole:") and not cache
    assert np.array_equal(got, _whole(ref, x)[0])


def test_a_worker_that_scored_exits_without_tracebacks(refs):
    """serve scores in its own process: its exit must not print TensorFlow's complaints about
    compiled functions outliving the interpreter."""
    import os
    import subprocess
    import sys

    # as a scoring worker: scoring (pandas, pyarrow) first, then the models
    code = ("import sys, numpy as np; import hierarchy.infer.scoring; "
            "from hierarchy.infer import loaded; from hierarchy.infer.modelset import ModelRef; "
            f"x = np.zeros((2, {SIZE}, {SIZE}, 3), np.float32); cache = {{}}; "
            f"[loaded.outputs(ModelRef(k, p, 'small_cnn', {SIZE}), x, cache, ('p',)) "
            "for k, p in zip(sys.argv[1::2], sys.argv[2::2])]; print('scored', len(cache))")
    args = [a for name, ref in refs.items() for a in (name, ref.path)]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0 and "scored 2" in done.stdout, done.stderr
    assert "Traceback" not in done.stderr and "Error" not in done.stderr, done.stderr
