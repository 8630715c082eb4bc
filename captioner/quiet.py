"""Keras imported without TensorFlow's C++ start-up chatter (CUDA probes, "failed call to
cuInit", oneDNN notes) on the terminal: the one place the CLI and the Python API share, called
before the Keras load path (:meth:`captioner.inference.captioner.Captioner.from_run`) imports Keras.
``CAPTIONER_VERBOSE=1`` shows the chatter; Python errors still surface."""

from __future__ import annotations

import os
import sys

from captioner.errors import CaptionerError


def quiet_keras_import() -> None:
    """Import Keras (and on TensorFlow probe its devices) with file descriptor 2 pointed at
    /dev/null; nothing to do when Keras is already imported or the backend is not TensorFlow."""
    if "keras" in sys.modules:
        return
    check_backend()
    if os.environ.get("CAPTIONER_VERBOSE") == "1":
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


BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch",
                   "openvino": "openvino", "numpy": "numpy"}


def check_backend() -> None:
    """The Keras backend named by ``KERAS_BACKEND`` is installed (else one line, not Keras's
    40-line traceback); run where Keras is about to be imported, so ONNX Runtime needs none."""
    import importlib.util

    backend = os.environ.get("KERAS_BACKEND")
    if backend is None:
        return  # TensorFlow: a missing one is reported by the command that needs it
    module = BACKEND_MODULES.get(backend)
    if module is None:
        raise CaptionerError(f"KERAS_BACKEND={backend} is not a Keras backend; use one of "
                             f"{', '.join(BACKEND_MODULES)}")
    if importlib.util.find_spec(module) is None:
        raise CaptionerError(f"KERAS_BACKEND={backend} but {module} is not installed: install "
                             f"it (pip install {module}) or unset KERAS_BACKEND (TensorFlow)")
