"""Stage 1: pretrained CNN encoders.

VGG16 and VGG19 are built here from Keras layers, with the layer names of
``keras.applications.VGG16/VGG19`` so the official ImageNet files load by layer name. ResNet50
and MobileNetV2 come from ``keras.applications``. Every backbone is described by an
:class:`EncoderSpec`: how to build it, its input size, its preprocessing, and the named feature
layers it offers (``fc2``, ``conv``, ``pool``).

Keras is imported inside functions so ``import captioner.encoders`` stays cheap.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.errors import WeightsError

if TYPE_CHECKING:  # numpy is imported where it is used, so the CLI's --help stays light
    import numpy as np

# Layers per VGG block: (filters, convolutions).
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
VGG19_BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))

KERAS_APPS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
PROJECT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


@dataclass(frozen=True)
class WeightsFile:
    """One official Keras weights file: name, download address and md5."""

    fname: str
    origin: str
    md5: str | None


VGG_WEIGHTS: dict[tuple[str, bool], WeightsFile] = {
    ("vgg16", True): WeightsFile(
        "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
        KERAS_APPS_URL + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5",
        "64373286793e3c8b2b4e3219cbf3544b",
    ),
    ("vgg16", False): WeightsFile(
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        KERAS_APPS_URL + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc",
    ),
    ("vgg19", True): WeightsFile(
        "vgg19_weights_tf_dim_ordering_tf_kernels.h5",
        KERAS_APPS_URL + "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels.h5",
        "cbe5617147190e668d6c5d5026f83318",
    ),
    ("vgg19", False): WeightsFile(
        "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        KERAS_APPS_URL + "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "253f8cb515780f3b799900260a226db6",
    ),
}


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


# --------------------------------------------------------------------------- weights files


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The md5 hex digest of a file."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def keras_cache_dir() -> Path:
    """Keras's download cache for model files: ``$KERAS_HOME/models`` (default ~/.keras)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def _check_md5(path: Path, spec: WeightsFile) -> Path:
    if spec.md5 and (actual := md5sum(path)) != spec.md5:
        raise WeightsError(
            f"{path} has md5 {actual}, but {spec.fname} must have md5 {spec.md5}: the file is "
            f"corrupt or a different file. Delete it and download it again from {spec.origin}."
        )
    return path


def fetch_weights(spec: WeightsFile, cache_dir: Path | None = None) -> Path:
    """Find ``spec.fname`` in the project's ``weights/`` folder or the Keras cache, else download.

    The download goes through ``keras.utils.get_file`` (the same cache Keras uses) and is
    md5-checked. Offline with no file present, raises one :class:`WeightsError` that names the
    file, its md5 and where to put it.
    """
    cache_dir = cache_dir or keras_cache_dir()
    for folder in (PROJECT_WEIGHTS_DIR, cache_dir):
        if (folder / spec.fname).is_file():
            return _check_md5(folder / spec.fname, spec)
    import keras

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)  # else get_file falls back to /tmp/.keras
        path = keras.utils.get_file(
            spec.fname,
            spec.origin,
            cache_dir=str(cache_dir.parent),
            cache_subdir=cache_dir.name,
            file_hash=spec.md5,
        )
    except Exception as exc:  # network errors come in many types
        raise WeightsError(
            f"cannot find or download {spec.fname} (md5 {spec.md5}): {exc}. Download it from "
            f"{spec.origin} and put it in {cache_dir}/ or {PROJECT_WEIGHTS_DIR}/, or pass "
            "weights=PATH (--weights PATH) to a local copy."
        ) from exc
    return _check_md5(Path(path), spec)


def resolve_vgg_weights(arch: str, include_top: bool, weights: str | os.PathLike) -> Path:
    """Path of the weights file for ``weights`` ("imagenet" or a path)."""
    if weights == "imagenet":
        return fetch_weights(VGG_WEIGHTS[(arch, include_top)])
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist.")
    return path


def _layer_groups(h5file) -> tuple[Any, list[str]]:
    """The group holding per-layer weights and its layer names (legacy Keras h5 layout)."""
    group = h5file["model_weights"] if "model_weights" in h5file else h5file
    if "layer_names" not in group.attrs:
        raise WeightsError(
            f"{h5file.filename} is not a Keras weights file in the legacy layout "
            "(no 'layer_names' attribute)."
        )
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["layer_names"]]
    return group, names


def _read_layer(group, layer: str) -> list[np.ndarray]:
    import numpy as np

    g = group[layer]
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in g.attrs["weight_names"]]
    return [np.asarray(g[n]) for n in names]


def load_weights_by_name(model, path: str | os.PathLike) -> None:
    """Load a legacy-layout Keras ``.h5`` weights file into ``model`` by layer name.

    Every layer of ``model`` that has weights must be in the file with the same shapes;
    a missing layer or a shape mismatch raises :class:`WeightsError` naming the layer.
    """
    import h5py

    path = Path(path)
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise WeightsError(f"{path} is not a readable HDF5 weights file: {exc}") from exc
    with h5:
        group, names = _layer_groups(h5)
        for layer in model.layers:
            if not layer.weights:
                continue
            if layer.name not in names:
                raise WeightsError(
                    f"{path} has no weights for layer '{layer.name}' (it has: "
                    f"{', '.join(names[:8])}{'...' if len(names) > 8 else ''})."
                )
            arrays = _read_layer(group, layer.name)
            expected = [tuple(w.shape) for w in layer.weights]
            if [a.shape for a in arrays] != expected:
                raise WeightsError(
                    f"{path}: layer '{layer.name}' has weights of shapes "
                    f"{[a.shape for a in arrays]} but the model needs {expected}. "
                    "Is this the file for this architecture (and include_top setting)?"
                )
            layer.set_weights(arrays)


def save_weights_by_name(model, path: str | os.PathLike) -> None:
    """Write ``model``'s weights in the legacy Keras h5 layout (one group per layer)."""
    import h5py
    import numpy as np

    with h5py.File(path, "w") as h5:
        layers = [layer for layer in model.layers]
        h5.attrs["layer_names"] = [layer.name.encode() for layer in layers]
        h5.attrs["backend"] = b"tensorflow"
        for layer in layers:
            g = h5.create_group(layer.name)
            wnames = [f"{layer.name}/{w.name}:0".encode() for w in layer.weights]
            g.attrs["weight_names"] = wnames
            for wname, w in zip(wnames, layer.weights, strict=True):
                g.create_dataset(wname.decode(), data=np.asarray(w.numpy()))


# --------------------------------------------------------------------------- JSON round trip


def export_json(model, path: str | os.PathLike) -> None:
    """Write the architecture as JSON (``model.to_json()``)."""
    Path(path).write_text(model.to_json(indent=2))


def model_from_json_file(path: str | os.PathLike, weights: str | os.PathLike | None = None):
    """Rebuild a model from a JSON architecture file and, optionally, a legacy-h5 weights file."""
    import keras

    from captioner import layers as _custom  # noqa: F401  (registers Preprocess)

    model = keras.models.model_from_json(Path(path).read_text())
    if weights is not None:
        load_weights_by_name(model, weights)
    return model


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
    preprocessing: str  # "caffe" (BGR, mean-subtracted) or "tf" (scaled to [-1, 1])
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
        return _build_application(self, include_top, weights)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """Numpy preprocessing of RGB float images in [0, 255], as keras.applications does."""
        from captioner.layers import preprocess_array

        return preprocess_array(images, self.preprocessing)

    def feature_model(self, layer: str | None = None, weights: str | os.PathLike | None = "imagenet"):
        """A model from raw RGB images (B, H, W, 3) in [0, 255] to the features of ``layer``.

        Preprocessing is a layer inside the model, so callers feed decoded pixels (uint8 or
        float) and the whole computation runs on the backend's device.
        """
        import keras

        from captioner.layers import Preprocess

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
    model = app(weights=None, **kwargs)
    load_weights_file(model, weights)
    return model


def load_weights_file(model, weights: str | os.PathLike) -> None:
    """Load ``weights`` into ``model``: Keras 3 ``.weights.h5`` or a legacy-layout ``.h5``."""
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist.")
    if path.name.endswith(".weights.h5"):
        try:
            model.load_weights(path)
        except Exception as exc:
            raise WeightsError(f"{path} does not fit {model.name}: {exc}") from exc
        return
    load_weights_by_name(model, path)


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


def _all_specs() -> dict[str, EncoderSpec]:
    specs = [_vgg_spec("vgg16"), _vgg_spec("vgg19"), _resnet_spec()]
    specs += [_mobilenet_spec(a) for a in MOBILENET_ALPHAS]
    return {s.name: s for s in specs}


SPECS: dict[str, EncoderSpec] = _all_specs()
DEFAULT_ENCODER = "vgg16"


def get_spec(name: str) -> EncoderSpec:
    """The encoder spec called ``name`` (see :data:`SPECS`)."""
    if name not in SPECS:
        raise WeightsError(f"unknown encoder '{name}'; choose one of: {', '.join(SPECS)}.")
    return SPECS[name]
