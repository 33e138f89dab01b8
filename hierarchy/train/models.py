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
    EXPERTS_LAYER,
    KERAS_APPS,
    L1_HEAD,
    L1_SUM,
    L2_HEAD,
    L2_SUM,
    L3_OUTPUT,
    VIEW_SCORE,
    BranchCrossentropy,
    BranchExperts,
    BranchSoftmax,
    KinshipCrossentropy,
    NodeSum,
    SmoothedSparseCrossentropy,
    ViewPooling,
    ViewScore,
    check_backbone,
    custom_objects,
)

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
    Outputs, by name: :data:`MULTI_OUTPUTS`."""
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
                        label_smoothing: float, tcfg: dict, optimizer=None,
                        jit_compile: bool = False) -> None:
    """Level 3 against kinship-smoothed targets; the level-1 and level-2 heads and the summed
    level-3 distribution against their node, weighted by the ``train`` config's
    ``multi_head_weight`` and ``multi_marginal_weight``; the per-branch head by
    ``multi_conditional_weight``. With ``kinship_smoothing`` level 3's smoothing mass goes
    mostly to siblings (``kinship_shares``): milder mistakes, but on the hard preset it cost
    ~5 points of level-3 accuracy, so it is off by default (plain smoothing)."""
    from hierarchy.train.targets import kinship_smoothing

    node, _ = level2_nodes(taxonomy)
    if tcfg["kinship_smoothing"]:
        shares = [float(x) for x in tcfg["kinship_shares"]]
        level3 = KinshipCrossentropy(
            kinship_smoothing(taxonomy, label_smoothing, tuple(x / sum(shares) for x in shares)),
            taxonomy.l1_of_l3, node)
    else:
        level3 = SmoothedSparseCrossentropy(label_smoothing)
    heads, sums = float(tcfg["multi_head_weight"]), float(tcfg["multi_marginal_weight"])
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
                      L2_SUM: sums, CONDITIONAL: float(tcfg["multi_conditional_weight"])},
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


# ------------------------------------------------------------------------------ experts
def expert_source_rows(source: tf.keras.Model, groups: str = "branch"):
    """(kernel [D, n_l3], bias [n_l3]) of the source model's per-leaf logits an expert starts
    from: for branch experts a multi-level model's per-branch head (``logits_conditional``),
    else the level-3 head (``logits``, a flat model's only one). A softmax over an expert's
    columns is then the source's P(l3 | its group), exactly."""
    names = {layer.name for layer in source.layers}
    per_branch = groups == "branch" and "logits_conditional" in names
    layer = source.get_layer("logits_conditional" if per_branch else "logits")
    kernel, bias = layer.get_weights()
    return kernel, bias


def expert_head(kernel, bias, hidden: int, dropout: float, name: str = "expert") -> tf.keras.Model:
    """features [B, D] -> P(leaf | branch) [B, n]: the source's rows (``kernel`` [D, n],
    ``bias`` [n]) plus a residual MLP whose output layer starts at zero, so before training the
    head reproduces the source's conditional and training can only add to it."""
    import numpy as np

    kernel, bias = np.asarray(kernel, np.float32), np.asarray(bias, np.float32)
    inputs = tf.keras.Input((kernel.shape[0],), dtype="float32", name="features")
    logits = tf.keras.layers.Dense(kernel.shape[1], name="linear",
                                   kernel_initializer=tf.constant_initializer(kernel),
                                   bias_initializer=tf.constant_initializer(bias))(inputs)
    if hidden:
        h = tf.keras.layers.Dropout(dropout, name="dropout")(inputs)
        h = tf.keras.layers.Dense(hidden, activation="relu", name="hidden")(h)
        logits = tf.keras.layers.Add(name="logits")([logits, tf.keras.layers.Dense(
            kernel.shape[1], kernel_initializer="zeros", name="residual")(h)])
    outputs = tf.keras.layers.Softmax(dtype="float32", name="probs")(logits)
    return tf.keras.Model(inputs, outputs, name=name)


EXPERT_GROUPS = ("branch", "all")


def expert_groups(taxonomy, kind: str):
    """The group of every leaf [n_l3] and the group count: ``branch``, one expert per level-1
    branch; ``all``, one expert over every leaf — a refit of the source's level-3 head on its
    frozen features, the control that tells what the hierarchy adds from what more head
    training adds."""
    import numpy as np

    if kind == "branch":
        return np.asarray(taxonomy.l1_of_l3, np.int32), taxonomy.n_l1
    if kind == "all":
        return np.zeros(taxonomy.n_l3, np.int32), 1
    raise ValueError(f"expert groups {kind!r}: one of {', '.join(EXPERT_GROUPS)}")


def set_expert(layer: BranchExperts, branch: int, head: tf.keras.Model) -> None:
    """Copy one trained :func:`expert_head` into the branch's slice of a
    :class:`~hierarchy.contracts.model.BranchExperts` layer's weights."""
    members = layer.members[branch]
    kernel, bias = (v.numpy() for v in (layer.kernel, layer.bias))
    w, c = head.get_layer("linear").get_weights()
    kernel[:, members], bias[members] = w, c
    layer.kernel.assign(kernel)
    layer.bias.assign(bias)
    if layer.hidden:
        hk, hb = head.get_layer("hidden").get_weights()
        rk, rb = head.get_layer("residual").get_weights()
        layer.hidden_kernel[branch].assign(hk)
        layer.hidden_bias[branch].assign(hb)
        res_k, res_b = layer.residual_kernel.numpy(), layer.residual_bias.numpy()
        res_k[:, members], res_b[members] = rk, rb
        layer.residual_kernel.assign(res_k)
        layer.residual_bias.assign(res_b)


def expert_of(layer: BranchExperts, branch: int, dropout: float = 0.0) -> tf.keras.Model:
    """A branch's expert in a :class:`~hierarchy.contracts.model.BranchExperts` layer as a
    stand-alone :func:`expert_head` (its current weights)."""
    members = layer.members[branch]
    model = expert_head(layer.kernel.numpy()[:, members], layer.bias.numpy()[members],
                        layer.hidden, dropout, name=f"expert_{branch}")
    if layer.hidden:
        model.get_layer("hidden").set_weights([layer.hidden_kernel[branch].numpy(),
                                               layer.hidden_bias[branch].numpy()])
        model.get_layer("residual").set_weights([
            layer.residual_kernel.numpy()[:, members], layer.residual_bias.numpy()[members]])
    return model



def build_experts_model(source: tf.keras.Model, taxonomy, hidden: int, groups: str = "branch",
                        name: str = "experts") -> tf.keras.Model:
    """The source model (multi-level or flat) with its trunk and heads as they are, plus
    :class:`BranchExperts` over the same features, initialised from the source's rows
    (:func:`expert_source_rows`). Outputs ``probs`` (the source's level 3), ``probs_l1``
    (a multi-level model's level-1 head, or the flat level 3 summed per branch) and
    ``conditional`` (the experts, one softmax per group of ``groups``,
    :func:`expert_groups`): what the ``hierarchical`` strategy reads, from one pass."""
    names = {layer.name for layer in source.layers}
    body = source.get_layer("backbone")
    inputs = tf.keras.Input(source.input_shape[1:], dtype="float32", name="image")
    features = body(inputs)
    p3 = source.get_layer(L3_OUTPUT)(source.get_layer("logits")(features))
    if L1_HEAD in names:
        p1 = source.get_layer(L1_HEAD)(source.get_layer("logits_l1")(features))
    else:
        p1 = NodeSum(taxonomy.l1_of_l3, taxonomy.n_l1, name=L1_HEAD)(p3)
    group_of, n_groups = expert_groups(taxonomy, groups)
    experts = BranchExperts(group_of, n_groups, hidden, name=EXPERTS_LAYER)
    cond = BranchSoftmax(group_of, n_groups, name=CONDITIONAL)(experts(features))
    kernel, bias = expert_source_rows(source, groups)
    experts.kernel.assign(kernel)
    experts.bias.assign(bias)
    return tf.keras.Model(inputs, [p3, p1, cond], name=name)


def build_refit_model(source: tf.keras.Model, hidden: int, name: str = "refit") -> tf.keras.Model:
    """The source's trunk with one :class:`BranchExperts` group over every leaf, from the
    source's level-3 rows (the trained head is copied in by :func:`set_expert`):
    ``--mode refit``'s model, whose only output, ``probs``, is read as a flat model's is."""
    kernel, bias = expert_source_rows(source, "all")
    inputs = tf.keras.Input(source.input_shape[1:], dtype="float32", name="image")
    features = source.get_layer("backbone")(inputs)
    experts = BranchExperts([0] * bias.shape[0], 1, hidden, name=EXPERTS_LAYER)
    probs = tf.keras.layers.Softmax(dtype="float32", name=L3_OUTPUT)(experts(features))
    experts.kernel.assign(kernel)  # untrained, it is the source's level 3
    experts.bias.assign(bias)
    return tf.keras.Model(inputs, probs, name=name)


# ------------------------------------------------------------------------------ fusion


def fusion_view_head(kernel, bias, hidden: int, dropout: float, score_hidden: int,
                     name: str = "view_head") -> tf.keras.Model:
    """features [N, D] -> (``probs`` [N, C], ``view_score`` [N]): per picture, the source's
    level-3 rows plus a residual MLP (:func:`expert_head`) and a small MLP scoring how much
    the picture should count in its product. Both residual and score start at zero: before
    training the head is the source, and a product the geometric mean of its pictures."""
    import numpy as np

    kernel, bias = np.asarray(kernel, np.float32), np.asarray(bias, np.float32)
    inputs = tf.keras.Input((kernel.shape[0],), dtype="float32", name="features")
    linear = tf.keras.layers.Dense(kernel.shape[1], name="linear")
    logits = linear(inputs)
    if hidden:
        h = tf.keras.layers.Dropout(dropout, name="dropout")(inputs)
        h = tf.keras.layers.Dense(hidden, activation="relu", name="hidden")(h)
        logits = tf.keras.layers.Add(name="logits")([logits, tf.keras.layers.Dense(
            kernel.shape[1], kernel_initializer="zeros", name="residual")(h)])
    probs = tf.keras.layers.Softmax(dtype="float32", name=L3_OUTPUT)(logits)
    s = tf.keras.layers.Dropout(dropout, name="score_dropout")(inputs)
    s = tf.keras.layers.Dense(score_hidden, activation="relu", name="score_hidden")(s)
    s = tf.keras.layers.Dense(1, kernel_initializer="zeros", name="score")(s)
    # the rows are set, not baked into an initializer: the saved config stays small and loads
    linear.set_weights([kernel, bias])
    return tf.keras.Model(inputs, [probs, ViewScore(name=VIEW_SCORE)(s)], name=name)


def fusion_product_model(view_head: tf.keras.Model, eps: float = 1e-7) -> tf.keras.Model:
    """(features [B, V, D], mask [B, V]) -> product probs [B, C]: what ``--mode fusion``
    trains, on whole products. Padded pictures (mask False) get no weight."""
    d = view_head.input_shape[-1]
    feats = tf.keras.Input((None, d), dtype="float32", name="features")
    mask = tf.keras.Input((None,), dtype="bool", name="mask")
    probs, scores = view_head(tf.reshape(feats, [-1, d]))  # every picture of the batch at once
    return tf.keras.Model([feats, mask], ViewPooling(eps, name="product")(probs, scores, mask),
                          name="fusion_product")


def build_fusion_model(source: tf.keras.Model, view_head: tf.keras.Model,
                       name: str = "fusion") -> tf.keras.Model:
    """The source's trunk and a trained :func:`fusion_view_head`, per picture: outputs
    ``probs`` and ``view_score``; predict fuses a product's pictures with them."""
    inputs = tf.keras.Input(source.input_shape[1:], dtype="float32", name="image")
    probs, score = view_head(source.get_layer("backbone")(inputs))
    probs = tf.keras.layers.Activation("linear", dtype="float32", name=L3_OUTPUT)(probs)
    score = tf.keras.layers.Activation("linear", dtype="float32", name=VIEW_SCORE)(score)
    return tf.keras.Model(inputs, [probs, score], name=name)
