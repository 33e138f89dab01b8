"""The models a scoring Python worker has loaded, and how it runs them.

Each model file is loaded once per worker and run as two compiled functions: its ``backbone``
sub-model (the trunk) and the layers after it (the head). Models that hold the same trunk
(refit and fusion sit on the flat model's, frozen) are told apart only by their heads, so
the trunk runs once per picture for all of them (:func:`outputs` with a shared ``features``
cache) instead of once per model: in evaluate, flat, refit and fusion paid for three trunk
passes per picture where one does. Splitting is exact: the head computes on the very tensor
the whole model would have fed it (tests/test_predict.py compares every output bit for bit).
A model without a ``backbone`` layer runs whole.
"""

from __future__ import annotations

import atexit
import hashlib
from typing import Dict, List, Optional

import numpy as np

from hierarchy.contracts import storage
from hierarchy.infer.modelset import ModelRef

_LOADED: Dict[object, object] = {}
TRUNK = "backbone"


@atexit.register
def _release() -> None:
    """The compiled functions go while TensorFlow is still whole: left to the interpreter's
    shutdown, each printed a TypeError traceback from its __del__."""
    _LOADED.clear()


def load(ref: ModelRef):
    """The Keras model of ``ref``, loaded once per worker process."""
    if ref.path not in _LOADED:
        import tensorflow as tf

        from hierarchy.contracts.model import custom_objects

        # Keras reads local files only: a model on HDFS/S3 is copied once per worker
        _LOADED[ref.path] = tf.keras.models.load_model(
            storage.copy_to_local(ref.path), custom_objects=custom_objects(), compile=False)
    return _LOADED[ref.path]


def _compiled(fn, shape, dtype="float32"):
    """``fn`` as one ``tf.function`` traced once for any batch size (the batch dimension is
    left open). Keras' own predict function is retraced for each new batch size until it
    relaxes its shapes, and a scoring task's batches, re-cut at product boundaries, all
    differ in size: with every model of a run in one pass, those traces were a large share
    of a pass's time."""
    import tensorflow as tf

    return tf.function(fn, input_signature=[tf.TensorSpec((None, *shape[1:]), dtype)])


def _trunk_node(model) -> Optional[int]:
    """Which call of the ``backbone`` layer feeds ``model``'s head (None: no such layer, or
    not a plain Input -> backbone -> head graph)."""
    names = {layer.name for layer in model.layers}
    if TRUNK not in names or len(model.inputs) != 1:
        return None
    body = model.get_layer(TRUNK)
    # Keras 2.15 has no public count of a layer's calls; get_input_at(i) is the public part
    nodes = [i for i in range(len(body._inbound_nodes))
             if body.get_input_at(i) is model.inputs[0]]
    return nodes[0] if len(nodes) == 1 else None


def trunk_key(ref: ModelRef) -> str:
    """What identifies the trunk ``ref`` runs first: a digest of its weights and input shape
    (two models sharing it give their heads the same features), or the model itself when it
    has no separable trunk."""
    key = ("trunk_key", ref.path)
    if key not in _LOADED:
        model = load(ref)
        if _trunk_node(model) is None:
            _LOADED[key] = f"whole:{ref.path}"
        else:
            digest = hashlib.sha1(repr(model.input_shape).encode())
            for w in model.get_layer(TRUNK).get_weights():
                digest.update(np.ascontiguousarray(w).tobytes())
            _LOADED[key] = digest.hexdigest()
    return _LOADED[key]


def _functions(ref: ModelRef):
    """(trunk, head) compiled; trunk None when the model runs whole."""
    key = ("functions", ref.path)
    if key not in _LOADED:
        import tensorflow as tf

        model = load(ref)
        node = _trunk_node(model)
        if node is None:
            _LOADED[key] = None, _compiled(lambda x: model(x, training=False), model.input_shape)
        else:
            body = model.get_layer(TRUNK)
            features = body.get_output_at(node)
            head = tf.keras.Model(features, model.outputs)
            _LOADED[key] = (_compiled(lambda x: body(x, training=False), model.input_shape),
                            _compiled(lambda f: head(f, training=False), features.shape,
                                      features.dtype))
    return _LOADED[key]


def outputs(ref: ModelRef, x: np.ndarray, features: Dict[tuple, object],
            input_key: tuple) -> List[np.ndarray]:
    """The model's outputs on ``x``, in ``output_names`` order. ``features``: trunk outputs
    already computed for this ``x`` (``input_key`` names it: picture size, preprocessing,
    rows, flip), shared by the models of one batch."""
    trunk, head = _functions(ref)
    if trunk is None:
        out = head(x)
    else:
        key = ("features", trunk_key(ref), input_key)
        if key not in features:
            features[key] = trunk(x)
        out = head(features[key])
    if isinstance(out, dict):
        return [out[name].numpy() for name in load(ref).output_names]
    return [o.numpy() for o in out] if isinstance(out, (list, tuple)) else [out.numpy()]
