"""Keras models: a backbone (tf.keras.applications or a small CNN) and a softmax head.

Weights never come from the network (training nodes have none): ``weights`` is None or the
path of a local no-top weights file, checked before anything is built. Every model is
``Input -> "backbone" (a nested tf.keras.Model) -> Dropout -> Dense -> softmax (float32)``, so
the backbone can be frozen, fine-tuned and copied between models as one unit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import tensorflow as tf

from hierarchy.contracts.errors import Refused
from hierarchy.contracts.model import (
    CONDITIONAL,
    KERAS_APPS,
    L1_HEAD,
    L1_SUM,
    L2_HEAD,
    L2_SUM,
    L3_OUTPUT,
    BranchCrossentropy,
    BranchSoftmax,
    KinshipCrossentropy,
    NodeSum,
    SmoothedSparseCrossentropy,
    check_backbone,
    custom_objects,
)
from hierarchy.contracts.settings import Train

WEIGHTS_KEY = "train.weights"


SMALL_CNN_MIN_SIZE = 32
SMALL_CNN_FILTERS = (32, 48, 64, 128)  # ~117k parameters


def _small_cnn(image_size: int) -> tf.keras.Model:
    """A plain Conv-BN-ReLU-MaxPool stack for tests and CPU demos (trained from scratch)."""
    inputs = tf.keras.Input((image_size, image_size, 3))
    x = inputs
    for i, filters in enumerate(SMALL_CNN_FILTERS):
        x = tf.keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                   name=f"block{i + 1}_conv")(x)
        # momentum 0.9 (Keras: 0.99): short CPU runs end with usable inference statistics
        x = tf.keras.layers.BatchNormalization(momentum=0.9, name=f"block{i + 1}_bn")(x)
        x = tf.keras.layers.ReLU(name=f"block{i + 1}_relu")(x)
        x = tf.keras.layers.MaxPooling2D(name=f"block{i + 1}_pool")(x)
    x = tf.keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return tf.keras.Model(inputs, x, name="backbone")


def _application(backbone: str) -> Callable[[int], tf.keras.Model]:
    def build(image_size: int) -> tf.keras.Model:
        ctor = getattr(tf.keras.applications, KERAS_APPS[backbone].constructor)
        # weights=None always: a download would hang or fail on a training node
        base = ctor(include_top=False, weights=None, input_shape=(image_size, image_size, 3),
                    pooling="avg")
        # same layers, renamed as one unit: the no-top .h5 files load into it unchanged
        return tf.keras.Model(base.inputs, base.outputs, name="backbone")

    build.__name__ = f"build_{backbone}"
    return build


# name -> builder(image_size) of the no-top backbone sub-model (named "backbone", random init)
BACKBONES: dict[str, Callable[[int], tf.keras.Model]] = {
    "small_cnn": _small_cnn,
    **{name: _application(name) for name in KERAS_APPS},
}


class WeightsUnavailable(Refused, RuntimeError):
    """Pretrained weights were asked for but no local file provides them."""


def expected_weights_file(backbone: str) -> Optional[str]:
    """Keras' file name of the no-top ImageNet weights (None for small_cnn: it has none)."""
    check_backbone(backbone)
    app = KERAS_APPS.get(backbone)
    return app.weights_file if app else None


def min_image_size(backbone: str) -> int:
    check_backbone(backbone)
    app = KERAS_APPS.get(backbone)
    return app.min_size if app else SMALL_CNN_MIN_SIZE


def check_weights(backbone: str, weights: Optional[Union[str, os.PathLike]]) -> None:
    """Fail fast, before any model is built, when ``weights`` is not None or a local file."""
    check_backbone(backbone)
    if weights is None:
        return
    if isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights):
        return
    expected = expected_weights_file(backbone)
    what = ("does not exist" if isinstance(weights, (str, os.PathLike)) and weights != "imagenet"
            else "is not a local file")
    if expected is None:
        raise WeightsUnavailable(
            f"small_cnn: weights {str(weights)!r} {what}. small_cnn has no pretrained weights "
            f"(it trains from scratch) and training nodes have no network: set "
            f"{WEIGHTS_KEY}=null, or {WEIGHTS_KEY} to a small_cnn backbone weights file")
    raise WeightsUnavailable(
        f"{backbone}: weights {str(weights)!r} {what}, and training nodes have no network "
        f"to download them. Copy Keras' no-top ImageNet file {expected} to shared storage "
        f"and set {WEIGHTS_KEY}=/path/to/{expected} (or {WEIGHTS_KEY}=null to start from "
        "random weights)")


def build_backbone(backbone: str, image_size: int,
                   weights: Optional[Union[str, os.PathLike]] = None) -> tf.keras.Model:
    check_weights(backbone, weights)
    lo = min_image_size(backbone)
    if image_size < lo:
        raise ValueError(f"{backbone} needs train.image_size >= {lo}, got {image_size}")
    model = BACKBONES[backbone](image_size)
    if weights is not None:
        try:
            model.load_weights(os.fspath(weights))
        except Exception as exc:  # h5py / Keras raise several types for a mismatched file
            expected = expected_weights_file(backbone) or "a small_cnn backbone weights file"
            raise ValueError(
                f"{backbone}: could not load {os.fspath(weights)} into the no-top backbone "
                f"({exc}); {WEIGHTS_KEY} must be {expected}") from exc
    return model


def build_model(backbone: str, num_classes: int, image_size: int,
                weights: Optional[Union[str, os.PathLike]] = None, dropout: float = 0.2,
                name: str = "model") -> tf.keras.Model:
    """Preprocessed images (image_size, image_size, 3) float32 -> class probabilities float32."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    body = build_backbone(backbone, image_size, weights)
    inputs = tf.keras.Input((image_size, image_size, 3), dtype="float32", name="image")
    x = body(inputs)
    x = tf.keras.layers.Dropout(dropout, name="dropout")(x)
    x = tf.keras.layers.Dense(num_classes, name="logits")(x)
    # float32 output even under mixed precision: softmax in float16 loses small probabilities
    outputs = tf.keras.layers.Activation("softmax", dtype="float32", name="probs")(x)
    return tf.keras.Model(inputs, outputs, name=name)


PHASES = ("head", "fine_tune", "full")


def set_phase(model: tf.keras.Model, phase: str, fine_tune_layers: int) -> None:
    """head: backbone frozen; fine_tune: top N backbone layers (BN frozen); full: everything.

    Recompile the model afterwards: Keras reads ``trainable`` when it compiles.
    """
    body = model.get_layer("backbone")
    for layer in model.layers:
        if layer is not body:
            layer.trainable = True  # the head always trains
    if phase == "head":
        body.trainable = False
    elif phase == "full":
        body.trainable = True  # recursive: resets what a fine_tune phase froze
    elif phase == "fine_tune":
        body.trainable = True
        layers = body.layers
        cut = max(0, len(layers) - max(0, int(fine_tune_layers)))
        for i, layer in enumerate(layers):
            # BatchNorm stays frozen (and so in inference mode): its statistics would drift
            # on small fine-tune batches and wreck the pretrained features
            layer.trainable = i >= cut and not isinstance(
                layer, tf.keras.layers.BatchNormalization)
    else:
        raise ValueError(f"unknown phase {phase!r}; one of {', '.join(PHASES)}")


def weights_checksum(model: tf.keras.Model) -> float:
    """Sum of |w| over every weight, in float64: equal on every Horovod worker that holds the
    same model, which is what the run records and the tests compare."""
    import numpy as np

    return float(sum(np.sum(np.abs(w), dtype=np.float64) for w in model.get_weights()))


def _signature(body: tf.keras.Model) -> list:
    return [(type(layer).__name__, tuple(tuple(w.shape) for w in layer.weights))
            for layer in body.layers]


@dataclass(frozen=True)
class Backbone:
    """A model's ``backbone`` sub-model as plain arrays: what a branch model starts from."""
    source: str          # the model's name, for messages
    signature: list      # :func:`_signature`
    weights: list        # numpy arrays, in ``get_weights`` order
    params: int


def backbone_of(model: tf.keras.Model) -> Backbone:
    body = model.get_layer("backbone")
    return Backbone(model.name, _signature(body), body.get_weights(), body.count_params())


def copy_backbone(src: Union[tf.keras.Model, Backbone], dst: tf.keras.Model) -> None:
    """Copy the ``backbone`` sub-model weights of ``src`` (a model, or :func:`backbone_of`
    one) into ``dst`` (same architecture)."""
    a = src if isinstance(src, Backbone) else backbone_of(src)
    b = dst.get_layer("backbone")
    if a.signature != _signature(b):
        raise ValueError(
            f"cannot copy backbone of {a.source!r} into {dst.name!r}: the architectures differ "
            f"({len(a.signature)} vs {len(b.layers)} layers, {a.params} vs "
            f"{b.count_params()} parameters); the level-1 model was trained with another "
            "train.backbone")
    b.set_weights(a.weights)


_BACKBONES: dict = {}  # {(url, size, mtime_ns): Backbone}: the last model file read


def load_backbone(url: str) -> Backbone:
    """The backbone of the saved model at ``url``, read once per process and version of the
    file: a process that trains the branch models one after another (49 on the real
    catalog) otherwise rebuilt the whole level-1 model from its .h5 for each of them."""
    from hierarchy.contracts import storage

    info = storage.file_info(url)
    key = (url, info.size, info.mtime_ns)
    if key not in _BACKBONES:
        model = tf.keras.models.load_model(storage.copy_to_local(url),
                                           custom_objects=custom_objects())
        _BACKBONES.clear()  # arrays of one model at a time, not one per file ever read
        _BACKBONES[key] = backbone_of(model)
    return _BACKBONES[key]


def enable_mixed_precision_if_gpu(policy: Union[str, bool] = "auto") -> str:
    """Set the global Keras dtype policy; returns its name (mixed_float16 or float32)."""
    if policy is True:  # YAML 1.1 reads a bare on/off as a boolean
        policy = "on"
    elif policy is False:
        policy = "off"
    if policy not in ("auto", "on", "off"):
        raise ValueError(f"mixed precision policy must be auto, on or off, got {policy!r}")
    use = policy == "on" or (policy == "auto" and bool(tf.config.list_physical_devices("GPU")))
    name = "mixed_float16" if use else "float32"
    tf.keras.mixed_precision.set_global_policy(name)
    return name


def compile_model(model: tf.keras.Model, learning_rate: float, label_smoothing: float,
                  optimizer=None, jit_compile: bool = False) -> None:
    """Smoothed sparse cross-entropy, accuracy and top-5; Adam unless an optimizer is given;
    the train step compiled by XLA with ``jit_compile`` (hierarchy.train.gpu.use_xla)."""
    n = model.output_shape[-1]
    model.compile(
        optimizer=optimizer if optimizer is not None else tf.keras.optimizers.Adam(learning_rate),
        loss=SmoothedSparseCrossentropy(label_smoothing),
        metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                 tf.keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, n), name="top5")],
        jit_compile=jit_compile,
    )


# ------------------------------------------------------------------------------ multi-level


def level2_nodes(taxonomy) -> tuple:
    """(node of every leaf [n_l3], node count): a level-2 node is the path (l1, l2) — a few
    level-2 names sit under two level-1 parents and are two nodes of the tree."""
    import numpy as np

    pairs = taxonomy.l1_of_l3.astype(np.int64) * (taxonomy.n_l2 + 1) + taxonomy.l2_of_l3
    _, node = np.unique(pairs, return_inverse=True)
    return node.astype(np.int32), int(node.max()) + 1


def build_multi_model(backbone: str, taxonomy, image_size: int,
                      weights: Optional[Union[str, os.PathLike]] = None,
                      dropout: float = 0.2, name: str = "multi") -> tf.keras.Model:
    """One backbone, three heads (levels 1, 2 and 3) and the level-3 distribution summed into
    levels 1 and 2: coarse classes learnt from a fine model's sums are better than a coarse
    model's own (Chen et al. 2019), and the heads give the shared features a coarse signal.
    Outputs, by name: :data:`~hierarchy.contracts.model.MULTI_OUTPUTS`."""
    body = build_backbone(backbone, image_size, weights)
    inputs = tf.keras.Input((image_size, image_size, 3), dtype="float32", name="image")
    features = tf.keras.layers.Dropout(dropout, name="dropout")(body(inputs))
    node, n_nodes = level2_nodes(taxonomy)

    def head(n: int, logits: str, probs: str):
        x = tf.keras.layers.Dense(n, name=logits)(features)
        return tf.keras.layers.Activation("softmax", dtype="float32", name=probs)(x)

    p3 = head(taxonomy.n_l3, "logits", L3_OUTPUT)
    p1 = head(taxonomy.n_l1, "logits_l1", L1_HEAD)
    p2 = head(n_nodes, "logits_l2", L2_HEAD)
    s1 = NodeSum(taxonomy.l1_of_l3, taxonomy.n_l1, name=L1_SUM)(p3)
    s2 = NodeSum(node, n_nodes, name=L2_SUM)(p3)
    cond = BranchSoftmax(taxonomy.l1_of_l3, taxonomy.n_l1, name=CONDITIONAL)(
        tf.keras.layers.Dense(taxonomy.n_l3, name="logits_conditional")(features))
    return tf.keras.Model(inputs, [p3, p1, p2, s1, s2, cond], name=name)


def compile_multi_model(model: tf.keras.Model, taxonomy, learning_rate: float,
                        label_smoothing: float, tcfg: Train, optimizer=None,
                        jit_compile: bool = False) -> None:
    """Level 3 against kinship-smoothed targets; the level-1 and level-2 heads and the summed
    level-3 distribution against their node, weighted by the ``train`` config's
    ``multi_head_weight`` and ``multi_marginal_weight``; the per-branch head by
    ``multi_conditional_weight``. With ``kinship_smoothing`` level 3's smoothing mass goes
    mostly to siblings (``kinship_shares``): milder mistakes, but on the hard preset it cost
    ~5 points of level-3 accuracy, so it is off by default (plain smoothing)."""
    from hierarchy.train.targets import kinship_smoothing

    node, _ = level2_nodes(taxonomy)
    if tcfg.kinship_smoothing:
        shares = [float(x) for x in tcfg.kinship_shares]
        level3 = KinshipCrossentropy(
            kinship_smoothing(taxonomy, label_smoothing, tuple(x / sum(shares) for x in shares)),
            taxonomy.l1_of_l3, node)
    else:
        level3 = SmoothedSparseCrossentropy(label_smoothing)
    heads, sums = tcfg.multi_head_weight, tcfg.multi_marginal_weight
    model.compile(
        optimizer=optimizer if optimizer is not None else tf.keras.optimizers.Adam(learning_rate),
        loss={L3_OUTPUT: level3,
              L1_HEAD: SmoothedSparseCrossentropy(label_smoothing),
              L2_HEAD: SmoothedSparseCrossentropy(label_smoothing),
              # no smoothing on sums: kinship already spreads level 3's mass inside a node
              L1_SUM: SmoothedSparseCrossentropy(0.0),
              L2_SUM: SmoothedSparseCrossentropy(0.0),
              CONDITIONAL: BranchCrossentropy(taxonomy.l1_of_l3, label_smoothing)},
        loss_weights={L3_OUTPUT: 1.0, L1_HEAD: heads, L2_HEAD: heads, L1_SUM: sums,
                      L2_SUM: sums, CONDITIONAL: tcfg.multi_conditional_weight},
        metrics={L3_OUTPUT: [tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                             tf.keras.metrics.SparseTopKCategoricalAccuracy(
                                 k=min(5, taxonomy.n_l3), name="top5")],
                 L1_HEAD: [tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")]},
        jit_compile=jit_compile,
    )


def level_targets(taxonomy):
    """level-3 ids [B] -> the label dict a multi-level model trains on (TF ops, for tf.data)."""
    node, _ = level2_nodes(taxonomy)
    l1 = tf.constant(taxonomy.l1_of_l3, tf.int32)
    l2 = tf.constant(node, tf.int32)

    def targets(y3):
        y3 = tf.cast(y3, tf.int32)
        y1, y2 = tf.gather(l1, y3), tf.gather(l2, y3)
        return {L3_OUTPUT: y3, L1_HEAD: y1, L2_HEAD: y2, L1_SUM: y1, L2_SUM: y2,
                CONDITIONAL: y3}

    return targets
