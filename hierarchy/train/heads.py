"""Heads over a trained model's frozen trunk: branch experts (``--mode experts``), the level-3
head refit (``refit``) and the fusion head that weighs a product's pictures (``fusion``).
Each starts from the source model's own rows, so before training it reproduces the source;
:mod:`hierarchy.train.experts` trains them on cached trunk features.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from hierarchy.contracts.model import (
    CONDITIONAL,
    EXPERTS_LAYER,
    L1_HEAD,
    L3_OUTPUT,
    VIEW_SCORE,
    BranchExperts,
    BranchSoftmax,
    NodeSum,
    ViewPooling,
    ViewScore,
)


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


def build_refit_model(source: tf.keras.Model, hidden: int, kernel=None, bias=None,
                      name: str = "refit") -> tf.keras.Model:
    """The source's trunk with one :class:`BranchExperts` group over every leaf, from the
    leaf rows the head started from (the source's level 3 by default; carried to another
    taxonomy version by ``--from-run``) — the trained head is copied in by
    :func:`set_expert`: ``--mode refit``'s model, whose only output, ``probs``, is read as a
    flat model's is."""
    if kernel is None:
        kernel, bias = expert_source_rows(source, "all")
    inputs = tf.keras.Input(source.input_shape[1:], dtype="float32", name="image")
    features = source.get_layer("backbone")(inputs)
    experts = BranchExperts([0] * bias.shape[0], 1, hidden, name=EXPERTS_LAYER)
    probs = tf.keras.layers.Softmax(dtype="float32", name=L3_OUTPUT)(experts(features))
    experts.kernel.assign(kernel)  # untrained, it is the source's level 3
    experts.bias.assign(bias)
    return tf.keras.Model(inputs, probs, name=name)


def fusion_view_head(kernel, bias, hidden: int, dropout: float, score_hidden: int,
                     name: str = "view_head") -> tf.keras.Model:
    """features [N, D] -> (``probs`` [N, C], ``view_score`` [N]): per picture, the source's
    level-3 rows plus a residual MLP (:func:`expert_head`) and a small MLP scoring how much
    the picture should count in its product. Both residual and score start at zero: before
    training the head is the source, and a product the geometric mean of its pictures."""
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
