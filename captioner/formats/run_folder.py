"""The run folder: its file names, its ``config.json`` (:class:`RunConfig`) and ``history.csv``.

A run folder holds everything needed to rebuild a trained model and to continue training::

    config.json             RunConfig: encoder (name, layer, input size, resize method, ...),
                            decoder (kind and constructor config), cleaning rules, training
                            settings, preset, decoding (how captions are searched by default),
                            provenance of its inputs, library versions
    tokenizer.json          the vocabulary (captioner.text.tokenizer)
    best.weights.h5         decoder weights of the best epoch (Keras weights file)
    member*.weights.h5      a bundled ensemble's further decoders (``members`` in config.json)
    last.weights.h5         decoder weights after the last finished epoch
    checkpoint.h5           model + optimizer variables keyed by variable path, for --resume
    checkpoints/            the last few per-epoch weight files
    history.csv             one row per epoch (see HISTORY_FIELDS)
    curves.png              the training curves

Format versions: 1 (up to captioner 0.1.0: absolute input paths under ``training``, no resize
method) is migrated on load by :func:`migrate`; 2 is written today. Standard library only.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner import __version__
from captioner.errors import CaptionerError
from captioner.formats.decoding_config import DecodingConfig
from captioner.storage.files import atomic_path, sha256sum, write_json

RUN_FORMAT = "captioner.run"
RUN_VERSION = 2
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
BEST_WEIGHTS = "best.weights.h5"
LAST_WEIGHTS = "last.weights.h5"
CHECKPOINT = "checkpoint.h5"
CHECKPOINTS_DIR = "checkpoints"
HISTORY = "history.csv"
CURVES = "curves.png"
LOGS_DIR = "logs"
HISTORY_FIELDS = ("epoch", "loss", "val_loss", "xent", "val_xent", "val_bleu4", "val_cider",
                  "train_bleu4", "train_cider", "learning_rate", "seconds")
XENT = "xent"  # masked cross-entropy per real word, without regularisers: same on both splits
SOURCE_KEYS = ("captions", "train_features", "val_features", "mirrored_features")  # inputs a run records
DEFAULT_RESAMPLE = "bilinear"  # what every cache before the resize method was recorded used
DEFAULT_RUN = Path(__file__).resolve().parents[2] / "weights" / "default"
if not DEFAULT_RUN.is_dir():  # an installed wheel carries the bundled model as package data
    DEFAULT_RUN = Path(__file__).resolve().parents[1] / "weights" / "default"


@dataclass
class FileRef:
    """Provenance of an input file: its name, size and sha256, plus where it was found
    relative to the run folder (a hint for ``--resume``; never an absolute path)."""

    name: str
    size: int | None = None
    sha256: str | None = None
    path: str | None = None

    @classmethod
    def of(cls, path: str | os.PathLike, run_dir: str | os.PathLike) -> FileRef:
        """Measure ``path`` (size and sha256) and record it relative to ``run_dir``."""
        path = Path(path)
        rel = os.path.relpath(path.resolve(), Path(run_dir).resolve())
        return cls(path.name, path.stat().st_size, sha256sum(path), Path(rel).as_posix())

    def locate(self, run_dir: str | os.PathLike) -> Path | None:
        """The recorded file, if it is still where the run saw it."""
        if not self.path:
            return None
        path = Path(self.path) if os.path.isabs(self.path) else Path(run_dir) / self.path
        return path if path.is_file() else None


@dataclass
class EncoderInfo:
    """The encoder whose features the decoder was trained on."""

    name: str
    layer: str
    weights: str = "imagenet"
    weights_identity: str | None = None
    input_size: tuple[int, int] = (224, 224)
    resample: str = DEFAULT_RESAMPLE
    preprocessing: str | None = None
    feature_shape: tuple[int, ...] = ()
    weights_source: dict[str, str] | None = None  # weights in the run folder or a package

    @classmethod
    def from_cache(cls, attrs: dict[str, Any]) -> EncoderInfo:
        """The encoder description of a feature cache's attributes."""
        weights = str(attrs.get("weights", "imagenet"))
        return cls(
            name=str(attrs.get("encoder")),
            layer=str(attrs.get("layer")),
            weights="imagenet" if weights.startswith("imagenet") else weights,
            weights_identity=weights,
            input_size=_ints(attrs.get("input_size", (224, 224))),
            resample=str(attrs.get("resample", DEFAULT_RESAMPLE)),
            preprocessing=attrs.get("preprocessing"),
            feature_shape=_ints(attrs.get("feature_shape", ())),
        )

    def cache_expectation(self) -> dict[str, Any]:
        """Feature-cache attributes a run needs: encoder, layer (and weights, when known)."""
        expect: dict[str, Any] = {"encoder": self.name, "layer": self.layer}
        if self.weights_identity:
            expect["weights"] = self.weights_identity
        return expect


@dataclass
class DecoderInfo:
    """The decoder kind and its constructor arguments (its Keras config)."""

    kind: str
    config: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def max_length(self) -> int:
        return int(self.config["max_length"])


@dataclass
class RunConfig:
    """Everything ``config.json`` records about a run (see the module docstring)."""

    encoder: EncoderInfo
    decoder: DecoderInfo
    training: dict[str, Any] = field(default_factory=dict)  # hyperparameters, no paths
    cleaning: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, FileRef | None] = field(default_factory=dict)
    preset: str | None = None
    # How captions are searched unless the user says otherwise; a folder without it (written
    # before it was recorded) decodes as its preset does (:func:`preset_decoding`).
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    train_images: int = 0
    seed: int = 0
    versions: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> size, sha256
    # Further weight files in the folder for the same decoder config and tokenizer: the folder
    # is then an ensemble (best.weights.h5 first) whose per-step log-probabilities are averaged.
    members: list[str] = field(default_factory=list)
    # The encoder's ImageNet head and the object family map in the folder
    # ({"head": ..., "families": ...}; captioner.inference.grounding), or {} without grounding.
    grounding: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` payload."""
        return {"format": RUN_FORMAT, "version": RUN_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        """Validate (and migrate) a parsed ``config.json``; errors name ``source`` and the
        field (schema: :func:`captioner.formats.run_checks.check_config`)."""
        from captioner.formats.run_checks import check_config

        data = check_config(data, source)
        try:
            data = check_config(migrate(data, source), source)
            enc = dict(data["encoder"])
            enc["input_size"] = _ints(enc.get("input_size", (224, 224)))
            enc["feature_shape"] = _ints(enc.get("feature_shape", ()))
            encoder = EncoderInfo(**_known(EncoderInfo, enc))
            dec = data["decoder"]
            decoder = DecoderInfo(str(dec["kind"]), dict(dec["config"]))
            decoder.vocab_size, decoder.max_length  # noqa: B018  (present and integers)
            sources = {
                k: FileRef(**_known(FileRef, v)) if v else None
                for k, v in (data.get("sources") or {}).items()
            }
            rest = _known(cls, data, skip=("encoder", "decoder", "sources", "decoding"))
            decoding = (DecodingConfig.from_dict(data["decoding"], source) if "decoding" in data
                        else preset_decoding(data.get("preset")))
            return cls(encoder=encoder, decoder=decoder, sources=sources, decoding=decoding,
                       **rest)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CaptionerError(
                f"{source} is not a valid run config ({type(exc).__name__}: "
                f"{exc}); retrain the run or restore its config.json"
            ) from None

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunConfig:
        """Read a run folder's ``config.json`` with clear errors for a missing or foreign one."""
        return cls.from_dict(read_config_json(run_dir), str(Path(run_dir) / CONFIG_FILE))

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write ``config.json`` into ``run_dir`` atomically."""
        return write_json(Path(run_dir) / CONFIG_FILE, self.to_dict())


def preset_decoding(preset: Any) -> DecodingConfig:
    """The decoding of a run folder that does not record its own: its preset's, else the
    :class:`DecodingConfig` defaults."""
    from captioner.formats.presets import PRESETS

    return PRESETS[preset].decoding if preset in PRESETS else DecodingConfig()


def read_config_json(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The raw ``config.json`` of a run folder (format checked, not migrated)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CaptionerError(
            f"{run_dir} is not a captioner run folder (no {CONFIG_FILE}); pass the folder that "
            "`captioner train --out` wrote"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CaptionerError(f"{path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise CaptionerError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CaptionerError(f"{path} is not a captioner run config: format: {found!r}, "
                             f"expected {RUN_FORMAT!r}")
    return config


def migrate(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """A parsed ``config.json`` of any known version, as the current version (a copy).

    Version 1 kept the input files as absolute paths among the training settings; they become
    ``sources`` (file names; the old path kept only as a hint) and the resize method, which
    version 1 did not record, is the bilinear filter every version-1 cache used.
    """
    version = data.get("version", 1)
    if not isinstance(version, int) or version > RUN_VERSION:
        raise CaptionerError(
            f"{source} has run format version {version!r}; this captioner "
            f"reads up to {RUN_VERSION}. Upgrade captioner."
        )
    data = json.loads(json.dumps(data))  # a deep copy
    if version == 1:
        training = data.get("training") or {}
        data["sources"] = {
            k: {"name": Path(training[k]).name, "path": training[k]} if training.get(k) else None
            for k in SOURCE_KEYS
        }
        data["training"] = {k: v for k, v in training.items() if k not in (*SOURCE_KEYS, "out")}
        if isinstance(data.get("encoder"), dict):
            data["encoder"].setdefault("resample", DEFAULT_RESAMPLE)
        data["version"] = RUN_VERSION
    return data


def _ints(value: Any) -> tuple[int, ...]:
    """A shape or size as a tuple of ints (from a list, tuple, array or scalar)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, int | float):
        value = (value,)
    return tuple(int(v) for v in value)


def _known(cls: type, data: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The entries of ``data`` that are fields of the dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    return {k: v for k, v in data.items() if k in names}


# --------------------------------------------------------------------------- history.csv


def read_history(path: str | os.PathLike) -> list[dict[str, float | None]]:
    """Rows of a run's history.csv (epoch as int, empty cells as None); [] when absent."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = [
            {k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
            for row in csv.DictReader(fh)
        ]
    for row in rows:  # whole epochs as int (curve.csv also holds fractions of an epoch)
        row["epoch"] = int(row["epoch"]) if float(row["epoch"]).is_integer() else row["epoch"]
    return rows


def write_history(path: str | os.PathLike, rows: list[dict],
                  fields: tuple[str, ...] = HISTORY_FIELDS) -> None:
    """Write ``rows`` (dicts with ``fields`` keys) as history.csv, atomically."""
    with atomic_path(path, sync=False) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in fields})


def versions() -> dict[str, str | None]:
    """Versions of the libraries that produce a run's or a report's numbers."""
    import importlib.metadata
    import platform

    import keras

    found: dict[str, str | None] = {
        "captioner": __version__,
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }
    for name, dist in (
        ("numpy", "numpy"),
        ("h5py", "h5py"),
        ("nltk", "nltk"),
        ("pillow", "pillow"),
        ("pycocoevalcap", "pycocoevalcap"),
    ):
        try:
            found[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found
