"""Keras imported without TensorFlow's C++ start-up chatter (CUDA probes, "failed call to
cuInit", oneDNN notes) on the terminal: the one place the CLI and the Python API share, called
before the Keras load path (:meth:`captioner.inference.Captioner.from_run`) imports Keras.
``CAPTIONER_VERBOSE=1`` shows the chatter; Python errors still surface."""

from __future__ import annotations

import os
import sys


def quiet_keras_import() -> None:
    """Import Keras (and on TensorFlow probe its devices) with file descriptor 2 pointed at
    /dev/null; nothing to do when Keras is already imported or the backend is not TensorFlow."""
    if os.environ.get("CAPTIONER_VERBOSE") == "1" or "keras" in sys.modules:
        return
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                import logging

                import keras

                keras.ops.convert_to_numpy(keras.ops.zeros(1))  # device probing happens here
                # tf.function's retracing advice: an ensemble's members trace the same step
                # functions once each, which it reads as retracing in a loop
                logging.getLogger("tensorflow").setLevel(logging.ERROR)
            except ImportError:
                pass  # reported by the code that needs Keras
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
