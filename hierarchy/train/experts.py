"""Heads over a trained model's frozen trunk: ``--mode experts``, ``refit`` and ``fusion``.

1. **Features, once.** Every Horovod worker runs the source model's trunk (experts: the run's
   multi-level model, else its flat model; refit: the flat model; fusion:
   ``train.fusion_source``) over its shard of train and val — the validation input, no
   augmentation — and writes the features beside the model, partitioned by split and
   level-1 branch (``<key>/features/split=train/l1=7/part-<rank>-*.parquet``; the layout and
   its readers: :mod:`hierarchy.train.features`). One forward pass over the data, whatever
   the number of branches.
2. **experts: one head per branch** (branch ``b`` on worker ``b mod workers``), reading only
   its own ``l1=b`` folder: the source's rows for the branch's leaves plus a residual MLP
   that starts at zero (:func:`hierarchy.train.heads.expert_head`), so before training the
   expert *is* the source's P(l3 | b) and training can only add what the branch's own images
   teach. Features are streamed row group by row group (shuffled each epoch, then a shuffle
   buffer), never loaded whole. **refit** trains one such head over every leaf: the flat
   model's level-3 head refit on its frozen features (a named step of the recipe, and the
   control for what the hierarchy adds). **fusion** trains a head on whole products
   (:mod:`hierarchy.train.fusion`).
3. **One model.** Rank 0 copies the heads into :class:`~hierarchy.contracts.model.BranchExperts`
   on the source's trunk (:func:`~hierarchy.train.heads.build_experts_model`: the source's
   heads too, what the ``hierarchical`` strategy reads from one trunk pass;
   :func:`~hierarchy.train.heads.build_refit_model`; or
   :func:`~hierarchy.train.heads.build_fusion_model`) and publishes ``<key>/model.h5``.

Compute: one forward pass over train (and val) images, counted as one image-epoch of train by
bench/quality.py, plus head epochs over D-float feature rows, which cost no image-epochs.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Tuple

import numpy as np

from hierarchy.contracts import modelstore, storage, versions
from hierarchy.contracts.dataset import VAL, Dataset
from hierarchy.contracts.manifest import Manifest
from hierarchy.contracts.settings import Train, Tune
from hierarchy.train.features import (
    Select,
    branch_folder,
    branch_rows,
    features_dir,
    group_batches,
    group_row_groups,
)

# re-exported (the alias says so): tests reach the features' listing through experts
from hierarchy.train.features import branch_row_groups as branch_row_groups
from hierarchy.train.features import feature_files as feature_files
from hierarchy.train.fusion import train_fusion_head
from hierarchy.train.spec import TrainSpec

HEADS = "heads"
ROWS_PER_FILE = 8192


def _write_features(path_root: str, split: str, rank: int, trunk, ds, l1_of_l3) -> int:
    """One pass of ``ds`` through the trunk -> Parquet rows under split=/l1=; returns rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, part, buf = 0, 0, []

    def flush():
        nonlocal part, buf
        if not buf:
            return
        feats = np.concatenate([b[0] for b in buf])
        y = np.concatenate([b[1] for b in buf]).astype(np.int32)
        keys = np.concatenate([b[2] for b in buf])
        l1 = l1_of_l3[y]
        for branch in np.unique(l1):
            sel = l1 == branch
            table = pa.table({
                "product_id": keys[sel, 0], "img_idx": keys[sel, 1].astype(np.int32),
                "l3": y[sel],
                "features": pa.FixedSizeListArray.from_arrays(
                    pa.array(feats[sel].reshape(-1), pa.float32()), feats.shape[1])})
            folder = branch_folder(path_root, split, int(branch))
            os.makedirs(folder, exist_ok=True)
            pq.write_table(table, os.path.join(folder, f"part-{rank:05d}-{part:05d}.parquet"),
                           row_group_size=1024)
        part += 1
        buf = []

    for x, y, keys in ds:
        buf.append((trunk(x, training=False).numpy().astype(np.float32), y.numpy(),
                    keys.numpy()))
        rows += int(y.shape[0])
        if sum(len(b[1]) for b in buf) >= ROWS_PER_FILE:
            flush()
    flush()
    return rows


def _dataset(root, split, branches, local, dim, batch, seed_of_epoch, shuffle_buffer,
             select=None):
    import tensorflow as tf

    def gen():
        for f, y in group_batches(root, split, branches, local,
                                  None if seed_of_epoch is None else seed_of_epoch(), select):
            yield f, y.astype(np.int32)

    ds = tf.data.Dataset.from_generator(gen, output_signature=(
        tf.TensorSpec([None, dim], tf.float32), tf.TensorSpec([None], tf.int32))).unbatch()
    if seed_of_epoch is not None:
        ds = ds.shuffle(shuffle_buffer)
    return ds.batch(batch).prefetch(2)


def train_group(root: str, members: np.ndarray, branches, kernel, bias, tcfg: Train,
                seed: int, name: str = "expert", fit_select: Optional[Select] = None,
                check: Tuple[str, Optional[Select]] = ("val", None)) -> Optional[dict]:
    """Train the head of the leaves ``members`` on the feature rows of the level-1
    ``branches`` they belong to (one branch for a branch expert); None when there are no
    rows. Returns its weights and figures on ``check`` (a split and a product selection: val
    whole by default; the initial head's accuracy is the source's). ``fit_select`` keeps
    some train products only (tuning trains beside a hold-out)."""
    import tensorflow as tf

    from hierarchy.train.heads import expert_head

    members = np.asarray(members)
    local = np.full(kernel.shape[1], -1, np.int64)  # leaf -> its index in the expert
    local[members] = np.arange(len(members))
    if not group_row_groups(root, "train", branches):
        return None
    tf.keras.utils.set_random_seed(seed)
    head = expert_head(kernel[:, members], bias[members], tcfg.expert_hidden,
                       tcfg.expert_dropout, name=name)
    head.compile(tf.keras.optimizers.Adam(tcfg.expert_learning_rate),
                 loss=tf.keras.losses.SparseCategoricalCrossentropy(),
                 metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    epoch = [0]

    def next_seed():
        epoch[0] += 1
        return seed * 1000003 + epoch[0]

    dim = kernel.shape[0]
    train = _dataset(root, "train", branches, local, dim, tcfg.batch_size, next_seed,
                     tcfg.shuffle_buffer, fit_select)
    split, select = check
    val_images = sum(branch_rows(root, split, b) for b in branches) if select is None else \
        sum(len(y) for _, y in group_batches(root, split, branches, local, None, select))
    val = _dataset(root, split, branches, local, dim, 1024, None, 0, select) \
        if val_images else None
    before = head.evaluate(val, verbose=0, return_dict=True) if val_images else {}
    history = head.fit(train, epochs=tcfg.expert_epochs, verbose=0)
    after = head.evaluate(val, verbose=0, return_dict=True) if val_images else {}
    return {"weights": head.get_weights(), "leaves": int(len(members)),
            "train_loss": float(history.history["loss"][-1]), "val_images": val_images,
            "val_accuracy_initial": before.get("accuracy"), "val_accuracy": after.get("accuracy")}


def _extract_features(spec: TrainSpec, manifest: Manifest, taxonomy, trunk, root: str,
                      rank: int, size: int) -> dict:
    """This worker's share of the trunk's features of train and val, written under ``root``
    (curated pictures left out); pictures extracted per split."""
    from hierarchy.contracts import model as cmodel
    from hierarchy.contracts.curation import Exclusion
    from hierarchy.train import data as tdata

    tcfg = spec.train
    extracted = {}
    exclusion = Exclusion(spec.data, tcfg.exclude)
    preprocess = cmodel.preprocess_for(tcfg.backbone)
    for split in ("train", VAL):
        if not manifest.images(split):
            continue
        with tdata.make_dataset(spec.data, split, tdata.InputOptions(
                label="l3", image_size=tcfg.image_size, batch_size=tcfg.batch_size,
                training=False, repeat=False, return_keys=True, preprocess=preprocess, rank=rank,
                world_size=size, taxonomy=taxonomy, reader_workers=tcfg.reader_workers,
                exclusion=exclusion, **tdata.input_options(tcfg))) as ds:
            extracted[split] = _write_features(root, split, rank, trunk, ds, taxonomy.l1_of_l3)
    return extracted


def _train_heads(root: str, heads_dir: str, kernel, bias, taxonomy, groups: str, tcfg: Train,
                 rank: int, size: int) -> None:
    """This worker's share of the groups' heads (group g on rank g % size), each saved to
    ``heads_dir`` as <g>.json (its figures) and <g>.npz (its weights)."""
    from hierarchy.train import heads as theads

    group_of, n_groups = theads.expert_groups(taxonomy, groups)
    for g in range(rank, n_groups, size):
        members = np.flatnonzero(group_of == g)
        if len(members) < 2:
            continue  # one leaf: P(l3 | group) = 1, nothing to learn
        branches = sorted(set(taxonomy.l1_of_l3[members].tolist()))
        trained = train_group(root, members, branches, kernel, bias, tcfg,
                              tcfg.seed * 7919 + g, name=f"expert_{g}")
        if trained is not None:
            storage.write_json_atomic(os.path.join(heads_dir, f"{g}.json"),
                                      {k: v for k, v in trained.items() if k != "weights"})
            np.savez(os.path.join(heads_dir, f"{g}.npz"), *trained["weights"])


def _fusion(spec: TrainSpec, source, taxonomy, root: str, kernel, bias, tcfg: Train,
            tuning: Optional[dict], carried: Optional[int]) -> dict:
    """The fusion head trained over the cached features, assembled and tracked."""
    trained = train_fusion_head(root, kernel, bias, tcfg, tcfg.seed * 7919)
    done = _assemble_fusion(spec, source, taxonomy, trained, tcfg, tuning, carried)
    _track(spec, done["metrics"], tuning)
    return done


def _source(spec: TrainSpec, groups: str, taxonomy):
    """(the model the heads sit on, the rows of its leaf layer each head starts from, leaves
    whose rows were carried from another taxonomy version or None). Another run's trunk
    (``--from-run``) was trained on that run's version: its rows are carried to this one's
    leaves by id (:func:`hierarchy.contracts.versions.carry_rows`)."""
    import tensorflow as tf

    from hierarchy.contracts import model as cmodel
    from hierarchy.train import heads as theads

    source = tf.keras.models.load_model(storage.copy_to_local(spec.init_from),
                                        custom_objects=cmodel.custom_objects(), compile=False)
    kernel, bias = theads.expert_source_rows(source, groups)
    if spec.from_run is None:
        return source, kernel, bias, None
    old = modelstore.ModelStore(spec.models).run(spec.from_run).taxonomy()
    return (source, *versions.carry_rows(kernel, bias, old, taxonomy))


def train_head(spec: TrainSpec) -> dict:
    """The head model ``spec.key`` of ``spec.run`` (experts, refit or fusion: see the module
    notes); a result per worker."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    from hierarchy.train.gpu import pin_gpu

    hvd.init()
    pin_gpu(hvd.local_rank(), hvd.local_size())  # one GPU per process, before any use
    rank, size = hvd.rank(), hvd.size()
    tf.get_logger().setLevel("ERROR")  # one small head per branch: Keras warns of retracing
    tcfg = spec.train
    run = spec.run
    t0 = time.time()
    if run.has_model(spec.key) and storage.exists(run.metrics_file(spec.key)):
        return {"rank": rank, "status": "already trained", "checksum": None, "key": spec.key}
    dataset = Dataset(spec.data)
    manifest, taxonomy = dataset.require_complete(["train"]), dataset.taxonomy()
    groups = groups_of(spec.key)
    source, kernel, bias, carried = _source(spec, groups, taxonomy)
    trunk = source.get_layer("backbone")
    root = features_dir(spec)

    def barrier(name: str) -> None:
        if size > 1:
            hvd.allreduce(tf.constant(0.0), name=f"experts_{name}")

    heads_dir = os.path.join(storage.local_path(run.model_dir(spec.key)), HEADS)
    if rank == 0:  # a re-run replaces the features and heads, never adds to them
        for old in (root, heads_dir):
            storage.remove(old)
    barrier("clean")
    extracted = _extract_features(spec, manifest, taxonomy, trunk, root, rank, size)
    barrier("features")
    os.makedirs(heads_dir, exist_ok=True)
    tuning = None
    if rank == 0 and spec.tune is not None and spec.tune.trials:
        tuning = tune(spec.key, root, kernel, bias, taxonomy, tcfg, spec.tune)
        tcfg = tcfg.model_copy(update=tuning["best"])  # the final head trains with the best
    if spec.key == modelstore.FUSION:
        result = {"rank": rank, "size": size, "key": spec.key, "checksum": None,
                  "images_extracted": extracted}
        if rank == 0:  # one small head: the other workers only shared the feature pass
            result.update(_fusion(spec, source, taxonomy, root, kernel, bias, tcfg, tuning,
                                  carried))
        barrier("fusion")
        result["seconds"] = round(time.time() - t0, 2)
        return result
    _train_heads(root, heads_dir, kernel, bias, taxonomy, groups, tcfg, rank, size)
    barrier("heads")
    result = {"rank": rank, "size": size, "key": spec.key, "checksum": None,
              "images_extracted": extracted, "seconds": round(time.time() - t0, 2)}
    if rank == 0:
        result.update(_assemble(spec, source, taxonomy, heads_dir, tcfg, (kernel, bias),
                                tuning, carried))
        _track(spec, result["metrics"], tuning)
        result["seconds"] = round(time.time() - t0, 2)
    return result


def tune(key: str, root: str, kernel, bias, taxonomy, tcfg: Train, space: Tune) -> dict:
    """The ``tune:`` search of a refit or fusion head (:mod:`hierarchy.train.tuning`):
    trials train beside the train hold-out and are scored on it."""
    from hierarchy.train import tuning

    share = space.holdout
    fit = lambda pids: ~tuning.in_holdout(pids, share)  # noqa: E731
    held = lambda pids: tuning.in_holdout(pids, share)  # noqa: E731
    seed = tcfg.seed * 7919

    if key == modelstore.FUSION:
        def score(cfg: Train):
            return train_fusion_head(root, kernel, bias, cfg, seed, fit_select=fit,
                                     check=("train", held))["val_product_accuracy"]
    else:
        members = np.arange(taxonomy.n_l3)
        branches = list(range(taxonomy.n_l1))

        def score(cfg: Train):
            got = train_group(root, members, branches, kernel, bias, cfg, seed,
                              name=f"trial_{key}", fit_select=fit, check=("train", held))
            return None if got is None else got["val_accuracy"]

    return tuning.search(key, tcfg, space, score)


def _track(spec: TrainSpec, metrics: dict, tuning: Optional[dict]) -> None:
    """The head model as an MLflow run, as every trained model is; tuning trials nested."""
    from hierarchy.train.tracking import Tracker

    tracker = Tracker(spec.tracking_uri, spec.experiment)
    tracker.start(spec, resume=False)
    try:
        if tuning:
            tracker.log_trials(tuning["trials"])
        tracker.log_final({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                          [spec.run.metrics_file(spec.key)])
    finally:
        tracker.end()


def groups_of(key: str) -> str:
    """The experts' groups of a head model: one per level-1 branch for ``experts``, one over
    every leaf for ``refit`` and ``fusion`` (:func:`hierarchy.train.heads.expert_groups`)."""
    return "branch" if key == modelstore.EXPERTS else "all"


def _publish(spec: TrainSpec, model, metrics: dict) -> dict:
    from hierarchy.train import models as tmodels

    final = spec.run.model_file(spec.key)
    with storage.atomic_local_file(final) as tmp:
        model.save(tmp, include_optimizer=False)
    metrics = {**metrics, modelstore.DIGEST: storage.file_digest(final)}
    storage.write_json_atomic(spec.run.metrics_file(spec.key), metrics)
    return {"metrics": metrics, "model": final, "checksum": tmodels.weights_checksum(model)}


def _versions(spec: TrainSpec, taxonomy, carried: Optional[int]) -> dict:
    """What a head's metrics.json says of its taxonomy version: the ids of its outputs, and
    for a head over another run's trunk, that run and how many leaves kept their rows."""
    got = versions.recorded(taxonomy, spec.key)
    if spec.from_run is not None:
        got.update(from_run=spec.from_run, leaves_carried=carried)
    return got


def _assemble_fusion(spec: TrainSpec, source, taxonomy, trained: dict, tcfg: Train,
                     tuning: Optional[dict], carried: Optional[int]) -> dict:
    from hierarchy.train import heads as theads

    model = theads.build_fusion_model(source, trained.pop("head"))
    keys = ("fusion_epochs", "fusion_hidden", "fusion_score_hidden", "fusion_dropout",
            "fusion_learning_rate", "fusion_label_smoothing", "fusion_max_views")
    metrics = {**trained, "source": spec.init_from, **{k: getattr(tcfg, k) for k in keys},
               "classes": taxonomy.n_l3, **_versions(spec, taxonomy, carried),
               "label": spec.label, "branch": None, "tuning": tuning}
    return _publish(spec, model, metrics)


def _assemble(spec: TrainSpec, source, taxonomy, heads_dir: str, tcfg: Train, rows,
              tuning: Optional[dict] = None, carried: Optional[int] = None) -> dict:
    from hierarchy.contracts import model as cmodel
    from hierarchy.train import heads as theads

    groups = groups_of(spec.key)
    if spec.key == modelstore.REFIT:
        model = theads.build_refit_model(source, tcfg.expert_hidden, *rows)
    else:
        model = theads.build_experts_model(source, taxonomy, tcfg.expert_hidden,
                                            groups)
    layer = model.get_layer(cmodel.EXPERTS_LAYER)
    per_branch, hits, hits0, seen = {}, 0.0, 0.0, 0
    for b in range(layer.n_groups):
        info = storage.read_json(os.path.join(heads_dir, f"{b}.json"), None)
        if info is None:
            continue
        with np.load(os.path.join(heads_dir, f"{b}.npz")) as z:
            weights = [z[f"arr_{i}"] for i in range(len(z.files))]
        head = theads.expert_of(layer, b)
        head.set_weights(weights)
        theads.set_expert(layer, b, head)
        per_branch[str(b)] = info
        if info["val_images"] and info["val_accuracy"] is not None:
            hits += info["val_accuracy"] * info["val_images"]
            hits0 += info["val_accuracy_initial"] * info["val_images"]
            seen += info["val_images"]
    metrics = {
        # accuracy of P(l3 | true group) on val pictures: the experts' job, and the source's
        "val_conditional_accuracy": hits / seen if seen else None,
        "val_conditional_accuracy_source": hits0 / seen if seen else None,
        "source": spec.init_from, "expert_epochs": tcfg.expert_epochs,
        "expert_groups": groups, "groups": per_branch, "classes": taxonomy.n_l3,
        **_versions(spec, taxonomy, carried), "label": spec.label, "branch": None,
        **tcfg.model_dump(include={"expert_hidden", "expert_dropout", "expert_learning_rate"}),
        "tuning": tuning}
    return _publish(spec, model, metrics)
