"""Small custom Keras layers shared by the encoders (each with ``get_config``)."""

from __future__ import annotations

import keras
from keras import ops

from captioner.encoders import CAFFE_BGR_MEAN


@keras.saving.register_keras_serializable(package="captioner")
class Preprocess(keras.layers.Layer):
    """ImageNet preprocessing inside the model: RGB pixels in [0, 255] in, network input out.

    ``mode="caffe"`` (VGG, ResNet): RGB→BGR, minus the ImageNet BGR means.
    ``mode="tf"`` (MobileNetV2): scale to [-1, 1].
    ``mode="lite"`` (EfficientNet-Lite): ``(x - 127) / 128``.
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "tf", "lite"):
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
