"""What a saved model is, for everything that loads one (predict, evaluate, serve) and the
training that writes it: its outputs by name, the Keras layers and losses needed to load it,
and the input it expects (how a JPEG is decoded, resized and preprocessed for its backbone).

Training builds models from these pieces (:mod:`hierarchy.train.models`); a scorer loads a
model with :func:`custom_objects` and feeds it :func:`decode_for_model` /
:func:`resize_for_model` then :func:`preprocess_for` of its backbone, so a picture is scored
exactly as it was validated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import tensorflow as tf

# ------------------------------------------------------------------------------ outputs
# Output names of a multi-level model. "probs" is the level-3 distribution, named as the flat
# model's only output so that every scorer reads level 3 the same way; the others train it.
L3_OUTPUT = "probs"
L1_HEAD, L2_HEAD = "probs_l1", "probs_l2"        # heads of their own on the shared features
L1_SUM, L2_SUM = "marginal_l1", "marginal_l2"    # the level-3 distribution summed per node
CONDITIONAL = "conditional"    # P(l3 | its level-1 branch): one softmax per branch (experts)
EXPERTS_LAYER = "branch_experts"  # an experts model's heads (their groups are in its config)
MULTI_OUTPUTS = (L3_OUTPUT, L1_HEAD, L2_HEAD, L1_SUM, L2_SUM, CONDITIONAL)
VIEW_SCORE = "view_score"  # a fusion model's second output: the log-weight of each picture
SCORE_BOUND = 8.0          # |view score| < this: exp() of it is safe in any dtype


# ------------------------------------------------------------------------------ input
@dataclass(frozen=True)
class KerasApp:
    constructor: str  # tf.keras.applications.<constructor>
    family: str  # tf.keras.applications.<family>.preprocess_input
    weights_file: str  # Keras' no-top ImageNet weights file
    min_size: int


KERAS_APPS = {
    "mobilenet_v2": KerasApp("MobileNetV2", "mobilenet_v2",
                         "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", 32),
    "efficientnet_b0": KerasApp("EfficientNetB0", "efficientnet", "efficientnetb0_notop.h5", 32),
    "resnet50": KerasApp("ResNet50", "resnet50",
                     "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", 32),
    "inception_v3": KerasApp("InceptionV3", "inception_v3",
                         "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", 75),
}


# every backbone a model can have: the Keras applications and the small CNN of tests and demos
BACKBONE_NAMES = ("small_cnn", *KERAS_APPS)


def check_backbone(backbone: str) -> None:
    if backbone not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {backbone!r}; one of {', '.join(BACKBONE_NAMES)}")


def preprocess_for(backbone: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """float32 pixels in [0, 255] -> what the backbone was trained on (pure TF ops)."""
    check_backbone(backbone)
    if backbone == "small_cnn":
        return scale_01
    return getattr(tf.keras.applications, KERAS_APPS[backbone].family).preprocess_input


def scale_01(x: tf.Tensor) -> tf.Tensor:
    """[0, 255] -> [0, 1]: small_cnn's input, trained from scratch."""
    return tf.cast(x, tf.float32) / 255.0


DCT_RATIOS = (1, 2, 4, 8)  # what libjpeg can scale by while it decodes (tf.io.decode_jpeg)


def dct_ratio(height: int, width: int, min_side: float) -> int:
    """The largest DCT scale factor whose output keeps the shorter side >= ``min_side``
    (libjpeg's scaled size is ceil(side / ratio)); 1 when even half would be too small."""
    short = min(height, width)
    return max(r for r in DCT_RATIOS if r == 1 or -(-short // r) >= min_side)


def decode_scaled(jpeg: tf.Tensor, min_side: float) -> tf.Tensor:
    """Decode only the pixels the model will see: libjpeg's DCT-domain downscaling (1/2, 1/4,
    1/8) as far as the shorter side stays >= ``min_side``. The inverse DCT and the colour
    conversion then work on 1/4 (1/16, 1/64) of the pixels, and the resize that follows
    reads a picture already close to the model's size (it also aliases less: the scaled IDCT
    averages what a bilinear resize of the full picture would skip). uint8 out."""
    short = tf.reduce_min(tf.image.extract_jpeg_shape(jpeg)[:2])
    # ceil(short / r) >= min_side  <=>  short > r * (ceil(min_side) - 1), in integers; the
    # condition is monotone in the ratio: the count of ratios that pass picks the largest.
    # One comparison of a vector instead of a dozen scalar ops: run per picture, each op's
    # fixed cost counts
    above = tf.constant([r * (math.ceil(min_side) - 1) for r in DCT_RATIOS[1:]], tf.int32)
    index = tf.reduce_sum(tf.cast(short > above, tf.int32))
    return tf.switch_case(index, [
        (lambda r=r: tf.io.decode_jpeg(jpeg, channels=3, ratio=r)) for r in DCT_RATIOS])


def decode_for_model(jpeg: tf.Tensor, image_size: int, dct_scaling: bool = True) -> tf.Tensor:
    """JPEG bytes -> float32 [S, S, 3] in [0, 255]: validation's input, and the predict
    stage's (:mod:`hierarchy.infer.scoring` decodes the same way, so scores match)."""
    image = decode_scaled(jpeg, image_size) if dct_scaling else \
        tf.io.decode_jpeg(jpeg, channels=3)
    return resize_for_model(image, image_size)


def resize_for_model(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decoded uint8 picture -> float32 [S, S, 3] in [0, 255]: what validation feeds the model,
    and what the predict stage feeds it too (the same function, so scores match)."""
    return tf.ensure_shape(tf.image.resize(image, [image_size, image_size]),
                           [image_size, image_size, 3])


# ------------------------------------------------------------------------------ layers and losses
@tf.keras.utils.register_keras_serializable(package="hierarchy")
class SmoothedSparseCrossentropy(tf.keras.losses.Loss):
    """Sparse int labels with label smoothing (Keras 2.15's sparse loss has no smoothing)."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_sparse_ce",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        onehot = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), tf.shape(y_pred)[-1],
                            dtype=y_pred.dtype)
        return tf.keras.losses.categorical_crossentropy(
            onehot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def custom_objects() -> dict:
    """For ``tf.keras.models.load_model`` (registration already covers ``.keras`` files)."""
    return {"SmoothedSparseCrossentropy": SmoothedSparseCrossentropy,
            "hierarchy>SmoothedSparseCrossentropy": SmoothedSparseCrossentropy,
            "KinshipCrossentropy": KinshipCrossentropy,
            "hierarchy>KinshipCrossentropy": KinshipCrossentropy,
            "NodeSum": NodeSum, "hierarchy>NodeSum": NodeSum,
            "BranchSoftmax": BranchSoftmax, "hierarchy>BranchSoftmax": BranchSoftmax,
            "BranchCrossentropy": BranchCrossentropy,
            "hierarchy>BranchCrossentropy": BranchCrossentropy,
            "BranchExperts": BranchExperts, "hierarchy>BranchExperts": BranchExperts,
            "ViewScore": ViewScore, "hierarchy>ViewScore": ViewScore,
            "ViewPooling": ViewPooling, "hierarchy>ViewPooling": ViewPooling}


@tf.keras.utils.register_keras_serializable(package="hierarchy")
class BranchSoftmax(tf.keras.layers.Layer):
    """[B, n_l3] logits -> P(l3 | branch of l3): a softmax inside each level-1 branch, so each
    row sums to one per branch (to n_l1 in all). A head of per-branch experts on the shared
    features, trained only to tell a branch's leaves apart (:class:`BranchCrossentropy`)."""

    def __init__(self, groups, n_groups: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.groups = [int(g) for g in groups]
        self.n_groups = int(n_groups)
        self._groups = tf.constant(self.groups, tf.int32)

    def call(self, logits):
        z = tf.transpose(tf.cast(logits, tf.float32))                        # [n_l3, B]
        top = tf.math.unsorted_segment_max(z, self._groups, self.n_groups)   # [n_l1, B]
        e = tf.exp(z - tf.gather(top, self._groups))
        total = tf.math.unsorted_segment_sum(e, self._groups, self.n_groups)
        return tf.transpose(e / tf.gather(total, self._groups))

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "n_groups": self.n_groups}


@tf.keras.utils.register_keras_serializable(package="hierarchy")
class BranchCrossentropy(tf.keras.losses.Loss):
    """-log P(y | branch of y) of a :class:`BranchSoftmax` output, the target smoothed by
    ``label_smoothing`` over the true branch's leaves only (the other branches' columns are
    other softmaxes and take no part)."""

    def __init__(self, l1_of_l3, label_smoothing: float = 0.0, name: str = "branch_ce",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.l1_of_l3 = [int(v) for v in l1_of_l3]
        self.label_smoothing = float(label_smoothing)
        self._l1 = tf.constant(self.l1_of_l3, tf.int32)

    def call(self, y_true, y_pred):
        y = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        same = tf.cast(tf.equal(tf.gather(self._l1, y)[:, None], self._l1[None, :]), tf.float32)
        own = tf.one_hot(y, tf.shape(self._l1)[0], dtype=tf.float32)
        eps = self.label_smoothing
        target = (1.0 - eps) * own + eps * same / tf.reduce_sum(same, axis=1, keepdims=True)
        logp = tf.math.log(tf.clip_by_value(tf.cast(y_pred, tf.float32), 1e-7, 1.0))
        return -tf.reduce_sum(target * logp, axis=1)

    def get_config(self):
        return {**super().get_config(), "l1_of_l3": self.l1_of_l3,
                "label_smoothing": self.label_smoothing}


@tf.keras.utils.register_keras_serializable(package="hierarchy")
class NodeSum(tf.keras.layers.Layer):
    """[B, n_l3] leaf probabilities -> [B, n_nodes]: each leaf's probability added into its
    node. A layer without weights (a constant one-hot matmul), so no training phase can
    unfreeze it, and its config — the node of each leaf — is all a saved model needs."""

    def __init__(self, groups, n_groups: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.groups = [int(g) for g in groups]
        self.n_groups = int(n_groups)
        self._onehot = tf.one_hot(self.groups, self.n_groups, dtype=tf.float32)

    def call(self, p):
        return tf.matmul(tf.cast(p, tf.float32), self._onehot)

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "n_groups": self.n_groups}


@tf.keras.utils.register_keras_serializable(package="hierarchy")
class KinshipCrossentropy(tf.keras.losses.Loss):
    """Cross-entropy against hierarchy-aware smoothed targets: of the smoothing mass
    ``epsilon``, siblings (same level-2 node) get more per leaf than cousins (same level 1),
    cousins more than strangers. ``kinship`` is
    :func:`hierarchy.train.targets.kinship_smoothing`'s [n_l3, 4] table; the full [B, n_l3]
    target rows are built per batch, never stored."""

    def __init__(self, kinship, l1_of_l3, l2_node_of_l3, name: str = "kinship_ce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.kinship = [[float(v) for v in row] for row in kinship]
        self.l1_of_l3 = [int(v) for v in l1_of_l3]
        self.l2_node_of_l3 = [int(v) for v in l2_node_of_l3]
        self._k = tf.constant(self.kinship, tf.float32)
        self._l1 = tf.constant(self.l1_of_l3, tf.int32)
        self._l2 = tf.constant(self.l2_node_of_l3, tf.int32)

    def targets(self, y_true):
        y = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        k = tf.gather(self._k, y)                                     # [B, 4]
        same_l2 = tf.equal(tf.gather(self._l2, y)[:, None], self._l2[None, :])
        same_l1 = tf.equal(tf.gather(self._l1, y)[:, None], self._l1[None, :])
        rows = tf.where(same_l2, k[:, 1:2], tf.where(same_l1, k[:, 2:3], k[:, 3:4]))
        own = tf.equal(y[:, None], tf.range(tf.shape(self._l1)[0])[None, :])
        return tf.where(own, k[:, 0:1], rows)

    def call(self, y_true, y_pred):
        return tf.keras.losses.categorical_crossentropy(
            self.targets(y_true), tf.cast(y_pred, tf.float32))

    def get_config(self):
        return {**super().get_config(), "kinship": self.kinship, "l1_of_l3": self.l1_of_l3,
                "l2_node_of_l3": self.l2_node_of_l3}


@tf.keras.utils.register_keras_serializable(package="hierarchy")
class BranchExperts(tf.keras.layers.Layer):
    """features [B, D] -> leaf logits [B, n_l3]: every level-1 branch's expert head
    (:func:`~hierarchy.train.heads.expert_head`, before its softmax) in one layer, so one
    trunk pass feeds all of them. Leaves keep the taxonomy's order; a :class:`BranchSoftmax`
    after it makes each branch a distribution.
    The residual MLPs run branch by branch: a [B, branches, leaves] product would not fit at
    5270 leaves."""

    def __init__(self, groups, n_groups: int, hidden: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        import numpy as np

        self.groups = [int(g) for g in groups]
        self.n_groups = int(n_groups)
        self.hidden = int(hidden)
        g = np.asarray(self.groups)
        # the leaves of each group, in taxonomy order
        self.members = [np.flatnonzero(g == b) for b in range(self.n_groups)]
        # residual logits are made branch after branch: this gather puts them back in leaf order
        self._order = np.argsort(np.concatenate(self.members), kind="stable").astype(np.int32)

    def build(self, input_shape):
        d, n = int(input_shape[-1]), len(self.groups)
        self.kernel = self.add_weight(name="kernel", shape=(d, n), initializer="zeros")
        self.bias = self.add_weight(name="bias", shape=(n,), initializer="zeros")
        if self.hidden:
            self.hidden_kernel = self.add_weight(name="hidden_kernel",
                                                 shape=(self.n_groups, d, self.hidden),
                                                 initializer="zeros")
            self.hidden_bias = self.add_weight(name="hidden_bias",
                                               shape=(self.n_groups, self.hidden),
                                               initializer="zeros")
            self.residual_kernel = self.add_weight(name="residual_kernel",
                                                   shape=(self.hidden, n), initializer="zeros")
            self.residual_bias = self.add_weight(name="residual_bias", shape=(n,),
                                                 initializer="zeros")
        super().build(input_shape)

    def call(self, x):
        x = tf.cast(x, tf.float32)
        logits = tf.matmul(x, self.kernel) + self.bias
        if self.hidden:
            parts = []
            for b, members in enumerate(self.members):
                if len(members):
                    h = tf.nn.relu(tf.matmul(x, self.hidden_kernel[b]) + self.hidden_bias[b])
                    parts.append(tf.matmul(h, tf.gather(self.residual_kernel, members, axis=1)))
            logits += tf.gather(tf.concat(parts, axis=1), self._order, axis=1) + \
                self.residual_bias
        return logits

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "n_groups": self.n_groups,
                "hidden": self.hidden}


@tf.keras.utils.register_keras_serializable(package="hierarchy")
class ViewScore(tf.keras.layers.Layer):
    """[N, 1] -> [N]: ``SCORE_BOUND * tanh(s / SCORE_BOUND)``, a log-weight kept in range so
    that the products' accumulators add ``exp()`` of it without an overflow guard."""

    def call(self, s):
        return SCORE_BOUND * tf.tanh(tf.squeeze(tf.cast(s, tf.float32), -1) / SCORE_BOUND)


@tf.keras.utils.register_keras_serializable(package="hierarchy")
class ViewPooling(tf.keras.layers.Layer):
    """(per-picture probs [B*V, C], view scores [B*V], mask [B, V]) -> product probs [B, C]:
    the softmax of the view-weighted mean of ``log(max(p, eps))``, weights the softmax of the
    scores over a product's present pictures. The same arithmetic as
    :class:`hierarchy.infer.combine.ProductAccumulator` with weights ``exp(score)``, so the
    product a head is trained on is the product predict answers."""

    def __init__(self, eps: float = 1e-7, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.eps = float(eps)

    def call(self, probs, scores, mask):
        shape = tf.shape(mask)
        logp = tf.math.log(tf.maximum(tf.cast(probs, tf.float32), self.eps))
        logp = tf.reshape(logp, [shape[0], shape[1], -1])
        s = tf.where(mask, tf.reshape(scores, shape), tf.fill(shape, -1e9))
        w = tf.nn.softmax(s, axis=1)
        return tf.nn.softmax(tf.reduce_sum(w[:, :, None] * logp, axis=1), axis=-1)

    def get_config(self):
        return {**super().get_config(), "eps": self.eps}
