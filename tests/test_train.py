"""Training end to end on a tiny synthetic catalog: Horovod on Spark, resume, branches."""

import json
import os

import pytest

from hierarchy.contracts.config import load_config
from hierarchy.contracts.modelstore import ModelStore
from hierarchy.train.launch import run_training

pytestmark = pytest.mark.spark


def train_cfg(**train):
    base = {"backbone": "small_cnn", "image_size": 48, "batch_size": 16, "epochs": 3,
            "learning_rate": 0.003, "warmup_epochs": 0, "shuffle_buffer": 256,
            "reader_workers": 1, "augment": "false"}
    base.update(train)
    return load_config(overrides=["spark.master=local[2]", "ingest.progress=false"]
                       + [f"train.{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, spark, cfg):
    from hierarchy.ingest.pipeline import run_ingest
    from hierarchy.synth import generate

    root = tmp_path_factory.mktemp("train")
    generate(str(root / "syn"), products=360, seed=11, taxonomy="small", test_products=20,
             workers=1, progress=False)
    ingest_cfg = load_config(overrides=["spark.master=local[2]", "ingest.progress=false",
                                        "ingest.split_mb=0.4", "ingest.val_fraction=0.2"])
    run_ingest(spark, ingest_cfg, [str(root / "syn" / "train.bson")],
               str(root / "syn" / "category_names.csv"), str(root / "ds"), "train")
    return root / "ds"


def test_level1_on_two_gloo_workers_under_horovod_spark(dataset, spark, tmp_path):
    models = str(tmp_path / "models")
    results = run_training(train_cfg(epochs=4), str(dataset), models, "r1", level=1, np_=2,
                           spark_factory=lambda: spark)
    lead = results["level1"]
    assert lead["size"] == 2 and [r["rank"] for r in lead["ranks"]] == [0, 1]
    # same initial broadcast + averaged gradients: both workers end with the same weights
    a, b = (r["checksum"] for r in lead["ranks"])
    assert a == pytest.approx(b, rel=1e-6)
    acc = lead["metrics"]["val_accuracy"]
    assert acc > 0.6, f"level-1 val accuracy {acc} (chance 0.25)"
    run = json.loads((tmp_path / "models" / "r1" / "run.json").read_text())
    assert run["models"]["level1"]["metrics"]["classes"] == 4
    assert run["taxonomy_fingerprint"].startswith("sha256:")
    assert os.path.exists(os.path.join(models, "r1", "level1", "model.h5"))
    assert os.path.isdir(os.path.join(models, "mlruns"))


def test_interrupted_run_resumes_from_its_last_checkpoint(dataset, tmp_path):
    import tensorflow as tf

    from hierarchy.contracts.model import custom_objects

    models = str(tmp_path / "models")
    # first call stops after one epoch (as if killed then), the second asks for two
    run_training(train_cfg(epochs=1), str(dataset), models, "r2", level=3, mode="flat")
    first = json.loads(open(os.path.join(models, "r2", "flat", "history.json")).read())
    res = run_training(train_cfg(epochs=2), str(dataset), models, "r2", level=3, mode="flat")
    history = json.loads(open(os.path.join(models, "r2", "flat", "history.json")).read())
    assert len(history["loss"]) == 2 and history["loss"][0] == first["loss"][0]
    steps = res["flat"]["metrics"]["steps_per_epoch"]
    assert res["flat"]["iterations"] == 2 * steps  # optimizer state carried on
    best = tf.keras.models.load_model(
        ModelStore(models).run("r2").best_file("flat"),
        custom_objects=custom_objects())
    assert best.output_shape[-1] == 40
    again = run_training(train_cfg(epochs=2), str(dataset), models, "r2", level=3, mode="flat")
    assert again["flat"]["status"] == "already trained"
    # the re-run leaves the run's record of the model as the training wrote it
    run = json.loads(open(os.path.join(models, "r2", "run.json")).read())
    assert run["models"]["flat"]["metrics"] == res["flat"]["metrics"]


def test_branch_mode_trains_requested_branches_with_local_labels(dataset, tmp_path):
    from hierarchy.contracts.taxonomy import Taxonomy

    tax = Taxonomy.from_json((dataset / "taxonomy.json").read_text())
    models = str(tmp_path / "models")
    run_training(train_cfg(epochs=1), str(dataset), models, "r3", level=1)
    res = run_training(train_cfg(epochs=1), str(dataset), models, "r3", level=3,
                       mode="branch", branches=[0, 2])
    assert sorted(res) == ["branch/0", "branch/2"]
    for b in (0, 2):
        assert res[f"branch/{b}"]["metrics"]["classes"] == len(tax.branch(b))
    run = json.loads((tmp_path / "models" / "r3" / "run.json").read_text())
    assert set(run["models"]) == {"level1", "branch/0", "branch/2"}


def test_missing_weights_fail_at_once_with_the_file_to_provide(dataset, tmp_path, capsys):
    from hierarchy.cli import main

    rc = main(["train", "--data", str(dataset), "--models", str(tmp_path / "m"), "--level", "1",
               "train.backbone=mobilenet_v2", "train.weights=/nowhere/w.h5",
               "train.image_size=64"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in err
    assert "train.weights" in err


def test_same_command_runs_under_horovodrun(dataset, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(bin_dir / "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2",
           "hierarchy", "train", "--data", str(dataset), "--models", str(tmp_path / "m"),
           "--level", "1", "--run-id", "hr", "train.epochs=1", "train.image_size=48",
           "train.batch_size=16", "spark.master=local[1]",
           f"catalog.metastore={tmp_path / 'metastore_db'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # both processes trained (2 workers), only rank 0 wrote and reported
    assert proc.stdout.count("run hr ->") == 1
    run = json.loads((tmp_path / "m" / "hr" / "run.json").read_text())
    assert run["models"]["level1"]["size"] == 2
    assert (tmp_path / "m" / "hr" / "level1" / "model.h5").exists()


def test_multi_mode_trains_one_model_with_every_level(dataset, tmp_path):
    from hierarchy.contracts.model import MULTI_OUTPUTS

    models = str(tmp_path / "models")
    res = run_training(train_cfg(epochs=2), str(dataset), models, "r5", level=3, mode="multi")
    m = res["multi"]["metrics"]
    assert m["label"] == "levels" and m["classes"] == 40
    # level 3's figures under the usual names, the heads' under their output's
    assert 0.0 <= m["val_accuracy"] <= 1.0 and "val_probs_l1_accuracy" in m
    run = json.loads((tmp_path / "models" / "r5" / "run.json").read_text())
    assert set(run["models"]) == {"multi"}
    h5 = ModelStore(models).run("r5").model_file("multi")
    import h5py

    with h5py.File(h5) as f:  # every output, including the frozen sums, is in the file
        config = f.attrs["model_config"]
    assert all(f'"{name}"' in config for name in MULTI_OUTPUTS)


def test_experts_read_only_their_branch_and_start_from_the_multi_model(dataset, spark,
                                                                       tmp_path, monkeypatch):
    import numpy as np
    import pyarrow.parquet as pq

    from hierarchy.contracts.dataset import Dataset
    from hierarchy.train import experts
    from hierarchy.train.launch import TrainError

    models = str(tmp_path / "models")
    cfg = train_cfg(epochs=2, expert_epochs=3, expert_hidden=16)
    with pytest.raises(TrainError, match="--mode multi"):
        run_training(cfg, str(dataset), models, "r6", level=3, mode="experts")
    run_training(cfg, str(dataset), models, "r6", level=3, mode="multi")
    res = run_training(cfg, str(dataset), models, "r6", level=3, mode="experts", np_=2,
                       spark_factory=lambda: spark)["experts"]
    assert [r["rank"] for r in res["ranks"]] == [0, 1]
    m = res["metrics"]
    assert m["source"].endswith(os.path.join("r6", "multi", "model.h5"))
    assert 0.0 <= m["val_conditional_accuracy_source"] <= 1.0
    run = ModelStore(models).run("r6")
    assert run.has_model("experts") and "experts" in run.read().models

    # the features: written once by both workers together, each branch in its own folder
    tax = Dataset(str(dataset)).taxonomy()
    manifest = json.loads((dataset / "manifest.json").read_text())
    root = os.path.join(models, "r6", "experts", "features")
    seen = []
    for b in range(tax.n_l1):
        for path, i in experts.branch_row_groups(root, "train", b):
            t = pq.ParquetFile(path).read_row_group(i).to_pandas()
            assert set(tax.l1_of_l3[t["l3"].to_numpy()]) == {b}
            seen += list(zip(t["product_id"], t["img_idx"]))
    assert len(seen) == len(set(seen)) == manifest["splits"]["train"]["images"]

    # a branch's head opens the row groups of its own folder and nothing else
    reads = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, *args, **kwargs):
        table = real(self, i, *args, **kwargs)
        reads.append(table.num_rows)
        assert set(tax.l1_of_l3[table.column("l3").to_numpy()]) == {2}
        return table

    path, _ = experts.branch_row_groups(root, "train", 2)[0]
    dim = pq.ParquetFile(path).schema_arrow.field("features").type.list_size
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    trained = experts.train_group(root, tax.branch(2), [2],
                                  np.zeros((dim, tax.n_l3), np.float32),
                                  np.zeros(tax.n_l3, np.float32),
                                  cfg.train.model_copy(update={"expert_epochs": 2}), seed=1)
    monkeypatch.undo()
    assert trained is not None and trained["leaves"] == len(tax.branch(2))
    per_l1 = manifest["splits"]
    # 2 epochs of the branch's train rows, its val rows twice (before and after training)
    assert sum(reads) == 2 * per_l1["train"]["images_per_l1"]["2"] + \
        2 * per_l1["val"]["images_per_l1"].get("2", 0)

    # re-running over its own output trains nothing again
    again = run_training(cfg, str(dataset), models, "r6", level=3, mode="experts")["experts"]
    assert again["status"] == "already trained"
