"""Image preprocessing: the ImageNet constants, a numpy version and the Keras layer.

The constants live here (not in :mod:`captioner.encoders.specs`) so that encoders import layers and
never the other way round.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # ImageNet means, BGR order
PREPROCESSING_MODES = ("caffe", "tf", "lite")


def preprocess_array(images: np.ndarray, mode: str) -> np.ndarray:
    """``caffe``: RGB→BGR minus the ImageNet BGR means; ``tf``: scale to [-1, 1]."""
    x = np.asarray(images, dtype=np.float32)
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "lite":  # EfficientNet-Lite
        return (x - 127.0) / 128.0
    if mode == "caffe":
        return x[..., ::-1] - np.array(CAFFE_BGR_MEAN, dtype=np.float32)
    raise ValueError(f"unknown preprocessing mode {mode!r}")


@keras.saving.register_keras_serializable(package="captioner")
class Preprocess(keras.layers.Layer):
    """ImageNet preprocessing inside the model: RGB pixels in [0, 255] in, network input out.

    ``mode="caffe"`` (VGG, ResNet): RGB→BGR, minus the ImageNet BGR means.
    ``mode="tf"`` (MobileNetV2): scale to [-1, 1].
    ``mode="lite"`` (EfficientNet-Lite): ``(x - 127) / 128``.
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "lite":  # EfficientNet-Lite
            return (x - 127.0) / 128.0
        bgr = ops.flip(x, axis=-1)  # (B, H, W, 3) RGB -> BGR
        return bgr - ops.convert_to_tensor(CAFFE_BGR_MEAN, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}
