"""Give back what one trained model leaves behind in the process, so that a process training
many models in a row (``--mode branch``: 49 of them on the real catalog) stays at the size of
one.

Measured (bench/taxonomy_scale.py): without this, the resident set grew by ~10-19 MB per
small_cnn branch model and ~130 MB per mobilenet_v2 one, and every model's training graph and
Petastorm reader stayed alive. Three process-wide caches hold them, none of which
``tf.keras.backend.clear_session()`` empties on its own:

- TensorFlow's gradient registry: the Keras optimizer sums gradients over replicas
  (``ReplicaContext.all_reduce``, even under the default strategy) inside a
  ``tf.custom_gradient``, which in a traced function registers a ``CustomGradient-<uid>``
  entry that is never removed. The entry's closure holds the traced ``train_function`` graph
  (its ops and captured tensors), so every model's graph outlives the model.
- Horovod's ``_cache``-decorated builders (``broadcast_group``, ``allreduce_grads``): one
  ``tf.function`` per process, retraced for each model's list of variables, every trace kept.
- Through those graphs, the default graph's list of Python functions used by ``py_func``s: a
  Petastorm dataset is a ``from_generator`` whose generator holds its stopped Reader (and its
  thread pool and row-group cache) for as long as that graph lives.

:func:`one_model` drops the gradient entries registered while its block ran, empties Horovod's
caches, clears the Keras session (its global graph, the default graph those ``py_func``s hang
on) and collects, so the next model starts from the same process state. All of a model's
training happens inside the block, so nothing it drops is used afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import logging

log = logging.getLogger(__name__)


def _gradient_entries() -> dict:
    """TensorFlow's process-wide registry of gradient functions (a private dict; {} if a
    TensorFlow version has moved it: then nothing is dropped)."""
    from tensorflow.python.framework import ops

    return getattr(getattr(ops, "gradient_registry", None), "_registry", None) or {}


def _horovod_caches() -> list:
    """The memo dicts of Horovod's ``_cache``-decorated tf.function builders."""
    caches = []
    try:
        import horovod.tensorflow as hvd_tf
        import horovod.tensorflow.functions as hvd_fn
    except ImportError:
        return caches
    for module in (hvd_tf, hvd_fn):
        for obj in vars(module).values():
            if getattr(obj, "__qualname__", "") != "_cache.<locals>.wrapper":
                continue
            for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
                if name == "cache" and isinstance(cell.cell_contents, dict):
                    caches.append(cell.cell_contents)
    return caches


def release(before: set) -> int:
    """Drop what the models trained since ``before`` (the gradient registry's keys then) left
    in the process; returns the number of gradient entries dropped."""
    import tensorflow as tf

    registry = _gradient_entries()
    # only the entries tf.custom_gradient made while the model trained: gradients TensorFlow
    # and other libraries registered at import time stay
    stale = [k for k in list(registry) if k not in before and str(k).startswith("CustomGradient")]
    for key in stale:
        registry.pop(key, None)
    for cache in _horovod_caches():
        cache.clear()
    tf.keras.backend.clear_session()
    gc.collect()
    return len(stale)


@contextlib.contextmanager
def one_model():
    """Train one model inside the block; what it left behind is released at its end (also
    when it fails: the next model of the call starts clean either way)."""
    before = set(_gradient_entries())
    try:
        yield
    finally:
        try:
            dropped = release(before)
            log.debug("released one model's training state (%d gradient entries)", dropped)
        except Exception as exc:  # noqa: BLE001 - never hide the model's own result or error
            log.warning("could not release the last model's training state (%s): memory "
                        "may grow with each model trained in this process", exc)
