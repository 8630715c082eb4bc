"""Compiled per-token decoder steps: one function per Keras backend (``tf.function``,
``jax.jit``, or eager PyTorch under ``no_grad``), used by :mod:`captioner.inference`."""

from __future__ import annotations

from collections.abc import Callable


def compile_function(fn: Callable) -> Callable:
    """Compile ``fn`` for the active Keras backend (inference only)."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # only reached with the TensorFlow backend

        return tf.function(fn, reduce_retracing=True)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "torch":
        import torch

        def no_grad(*args):
            with torch.no_grad():
                return fn(*args)

        return no_grad
    return fn


def to_numpy(tree):
    import keras

    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    return keras.ops.convert_to_numpy(tree)


def log_softmax_step(decoder, tokens, state, shared=None):
    """Log-probabilities and new state of one decoder step (``shared``: the per-image state,
    one row per image block, for :meth:`~captioner.decoders.CaptionDecoder.step_shared`)."""
    from keras import ops

    if shared is None:
        logits, new_state = decoder.step(tokens, state)
    else:
        logits, new_state = decoder.step_shared(tokens, state, shared)
    return ops.log_softmax(ops.cast(logits, "float32"), axis=-1), new_state
