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

from hierarchy.errors import Refused

WEIGHTS_KEY = "train.weights"


@dataclass(frozen=True)
class _App:
    constructor: str  # tf.keras.applications.<constructor>
    family: str  # tf.keras.applications.<family>.preprocess_input
    weights_file: str  # Keras' no-top ImageNet weights file
    min_size: int


_APPS = {
    "mobilenet_v2": _App("MobileNetV2", "mobilenet_v2",
                         "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", 32),
    "efficientnet_b0": _App("EfficientNetB0", "efficientnet", "efficientnetb0_notop.h5", 32),
    "resnet50": _App("ResNet50", "resnet50",
                     "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", 32),
    "inception_v3": _App("InceptionV3", "inception_v3",
                         "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", 75),
}
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
        ctor = getattr(tf.keras.applications, _APPS[backbone].constructor)
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
    **{name: _application(name) for name in _APPS},
}


class WeightsUnavailable(Refused, RuntimeError):
    """Pretrained weights were asked for but no local file provides them."""


def _check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; one of {', '.join(BACKBONES)}")


def expected_weights_file(backbone: str) -> Optional[str]:
    """Keras' file name of the no-top ImageNet weights (None for small_cnn: it has none)."""
    _check_backbone(backbone)
    app = _APPS.get(backbone)
    return app.weights_file if app else None


def min_image_size(backbone: str) -> int:
    _check_backbone(backbone)
    app = _APPS.get(backbone)
    return app.min_size if app else SMALL_CNN_MIN_SIZE


def check_weights(backbone: str, weights: Optional[Union[str, os.PathLike]]) -> None:
    """Fail fast, before any model is built, when ``weights`` is not None or a local file."""
    _check_backbone(backbone)
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


def preprocess_for(backbone: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """float32 pixels in [0, 255] -> what the backbone was trained on (pure TF ops)."""
    _check_backbone(backbone)
    if backbone == "small_cnn":
        return scale_01
    return getattr(tf.keras.applications, _APPS[backbone].family).preprocess_input


def scale_01(x: tf.Tensor) -> tf.Tensor:
    """[0, 255] -> [0, 1]: small_cnn's input, trained from scratch."""
    return tf.cast(x, tf.float32) / 255.0


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


def _signature(body: tf.keras.Model) -> list:
    return [(type(layer).__name__, tuple(tuple(w.shape) for w in layer.weights))
            for layer in body.layers]


def copy_backbone(src: tf.keras.Model, dst: tf.keras.Model) -> None:
    """Copy the ``backbone`` sub-model weights of ``src`` into ``dst`` (same architecture)."""
    a, b = src.get_layer("backbone"), dst.get_layer("backbone")
    if _signature(a) != _signature(b):
        raise ValueError(
            f"cannot copy backbone of {src.name!r} into {dst.name!r}: the architectures differ "
            f"({len(a.layers)} vs {len(b.layers)} layers, {a.count_params()} vs "
            f"{b.count_params()} parameters); the level-1 model was trained with another "
            "train.backbone")
    b.set_weights(a.get_weights())


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
            "hierarchy>SmoothedSparseCrossentropy": SmoothedSparseCrossentropy}


def compile_model(model: tf.keras.Model, learning_rate: float, label_smoothing: float,
                  optimizer=None) -> None:
    """Smoothed sparse cross-entropy, accuracy and top-5; Adam unless an optimizer is given."""
    n = model.output_shape[-1]
    model.compile(
        optimizer=optimizer if optimizer is not None else tf.keras.optimizers.Adam(learning_rate),
        loss=SmoothedSparseCrossentropy(label_smoothing),
        metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                 tf.keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, n), name="top5")],
    )
