"""Many models in one process: training leaves nothing behind per model, and the scorer loads
each model once per worker, not once per batch (bench/taxonomy_scale.py measures both at the
real catalog's shape: 49 branch models)."""

import gc

import numpy as np
import pandas as pd
import pytest

from hierarchy.contracts.config import load_config
from hierarchy.contracts.dataset import Dataset
from hierarchy.train.launch import run_training

pytestmark = pytest.mark.spark

RUN = "m1"


def leftovers() -> dict:
    """What a trained model used to leave in the process (hierarchy.train.memory): Petastorm
    readers, traced graphs, gradient functions registered by tf.custom_gradient."""
    from petastorm.reader import Reader
    from tensorflow.python.framework import func_graph, ops

    gc.collect()
    objects = gc.get_objects()
    return {"readers": sum(isinstance(o, Reader) for o in objects),
            "graphs": sum(isinstance(o, func_graph.FuncGraph) for o in objects),
            "custom_gradients": sum(str(k).startswith("CustomGradient")
                                    for k in ops.gradient_registry._registry)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, spark):
    """A level-1 model, then one model per branch (4) trained one after the other in this
    process, with what the process held between the two calls and at the end (the first
    model sets the baseline: TensorFlow's own one-off state)."""
    from conftest import ingested_synth

    root = tmp_path_factory.mktemp("memory")
    data = ingested_synth(spark, root, 160, 3, 10, ["val_fraction=0.2"])
    tcfg = load_config(overrides=[
        "train.backbone=small_cnn", "train.image_size=32", "train.batch_size=16",
        "train.epochs=1", "train.warmup_epochs=0", "train.shuffle_buffer=64",
        "train.reader_workers=1", "train.augment=false"])
    models = str(root / "models")
    run_training(tcfg, data, models, RUN, level=1)
    before = leftovers()
    results = run_training(tcfg, data, models, RUN, level=3, mode="branch")
    return {"data": data, "models": models, "results": results, "before": before,
            "after": leftovers()}


def test_models_trained_in_a_row_leave_nothing_behind(trained):
    trained_keys = [k for k, r in trained["results"].items() if "metrics" in r]
    assert len(trained_keys) >= 3, trained["results"]  # several branch models, one process
    before, after = trained["before"], trained["after"]
    # each of these grew by one or more per model until hierarchy.train.memory released them
    # (readers: the train and val datasets' generators, hung on the default graph;
    # custom_gradients: the optimizer's all_reduce in every train_function trace)
    for what in ("readers", "graphs", "custom_gradients"):
        assert after[what] <= before[what], (what, before, after)


def test_the_scorer_loads_each_model_once_per_worker_across_batches(trained, monkeypatch):
    import pyarrow.parquet as pq
    import tensorflow as tf

    from hierarchy.infer import loaded, scoring
    from hierarchy.infer.modelset import load_modelset

    tax = Dataset(trained["data"]).taxonomy()
    models = load_modelset(trained["models"], RUN, "two-stage", tax)
    assert len(models.branches) >= 3
    loads = {}
    real_load = tf.keras.models.load_model

    def counting_load(path, *args, **kwargs):
        loads[path] = loads.get(path, 0) + 1
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(loaded, "_LOADED", {})  # a fresh Python worker
    monkeypatch.setattr(tf.keras.models, "load_model", counting_load)
    images = pq.read_table(Dataset(trained["data"]).url("images"), filters=[
        ("split", "=", "train")], columns=scoring.INPUT_COLUMNS).to_pandas()
    images = images.sort_values(["product_id", "img_idx"]).head(120).reset_index(drop=True)
    batches = [images.iloc[i:i + 16] for i in range(0, len(images), 16)]
    plan = scoring.ScoringPlan(models=models, taxonomy_json=tax.to_json(),
                               prior_category_id=tax.category_ids[0], prior_share=0.1,
                               params=(("top_branches", 0), ("blend_weight", 0.5)),
                               aggregate="log_mean",
                               tta_flip=False, top_n=5, threads=1)
    # two tasks run by the same worker, several Arrow batches each; top_branches 0: every branch
    # model scores every batch
    for _ in range(2):
        rows = pd.concat(list(scoring.score_partitions({"two-stage": plan})(iter(batches))))
        assert rows["product_id"].is_unique
        assert len(rows) == images["product_id"].nunique()
    assert len(loads) == len(models.refs())
    assert set(loads.values()) == {1}, loads
    assert np.isfinite(rows["confidence"]).all()
