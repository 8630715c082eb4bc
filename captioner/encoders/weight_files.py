"""Weights files: the official Keras downloads (where to find them, md5 and sha256 checks) and the
legacy Keras ``.h5`` layout (one group per layer) that the VGG builders load by layer name.

Keras and h5py are imported inside functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.errors import WeightsError
from captioner.storage.files import file_digest, sha256sum

if TYPE_CHECKING:
    import numpy as np

KERAS_APPS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
PROJECT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"


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


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The md5 hex digest of a file."""
    return file_digest(path, "md5", chunk)


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
            f"{spec.origin} and put it in {cache_dir}/ or {PROJECT_WEIGHTS_DIR}/, or give "
            "the path of a local copy as the weights."
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

    from captioner.encoders import preprocessing as _custom  # noqa: F401  (registers Preprocess)

    model = keras.models.model_from_json(Path(path).read_text())
    if weights is not None:
        load_weights_by_name(model, weights)
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


def check_sha256(path: Path, expected: str | None, hint: str) -> Path:
    """``path`` when its sha256 is ``expected`` (or nothing is expected), else WeightsError."""
    if expected and (actual := sha256sum(path)) != expected.lower():
        raise WeightsError(
            f"encoder weights {path} have sha256 {actual}, expected {expected}: the file is "
            f"damaged or another file; {hint}"
        )
    return path
