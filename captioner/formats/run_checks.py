"""Validation of a run folder before it is used: every problem is one line naming the file and
the field.

* ``config.json`` against a schema: its format and version, the decoder kind, the known keys of
  ``decoder`` and ``decoder.config`` with their types and ranges, the encoder's name and layer,
  and the feature shape both sides must agree on (:func:`check_config`);
* ``tokenizer.json`` against the config: vocabulary size, reserved tokens, maximum length
  (:func:`check_tokenizer`). An edited ``max_length`` that the tokenizer does not share is
  refused (the search length comes from the tokenizer, so it would otherwise be ignored);
* the weights file against the decoder built from the config: each layer's variables by name
  and shape (:func:`check_weights`);
* when ``config.json`` lists ``files`` (``{name: {"size", "sha256"}}``, the bundled run does),
  each listed file present in the folder must have that size and sha256
  (:func:`check_files`): a flipped byte in a tokenizer or weights file is then refused instead
  of giving garbled captions;
* ``decoding`` (optional) must be a valid :class:`~captioner.formats.decoding_config.DecodingConfig`;
* ``members`` (a bundled ensemble's further weight files) must be distinct plain
  ``*.weights.h5`` names of the folder; each is checked like ``best.weights.h5``.

Standard library here (h5py inside :func:`check_weights`); the caller builds the decoder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from captioner.errors import CaptionerError
from captioner.formats.decoding_config import DecodingConfig

RUN_FORMAT = "captioner.run"
RUN_VERSIONS = (1, 2)
DECODER_KINDS = ("merge", "inject", "attention")
BASE_KEYS = frozenset({"name", "trainable", "dtype"})  # Keras layer keys, tolerated
MAX_SIZE = 1 << 20

# key -> (type, minimum, maximum or None); "shape" is a list of positive ints
DECODER_FIELDS: dict[str, tuple[type, float, float | None]] = {
    "vocab_size": (int, 5, MAX_SIZE),
    "max_length": (int, 2, 10_000),
    "embed_dim": (int, 1, MAX_SIZE),
    "units": (int, 1, MAX_SIZE),
    "dropout": (float, 0.0, 0.999),
}
ATTENTION_FIELDS: dict[str, tuple[type, float, float | None]] = {
    "attention_units": (int, 1, MAX_SIZE),
    "attention_reg": (float, 0.0, None),
}
REQUIRED = ("vocab_size", "max_length")
MAX_PARAMETERS = 1 << 28  # ~1 GB of float32: far above any captioning decoder, far below a crash
MAX_H5_OBJECTS = 10_000  # groups and datasets in a decoder's weights file


class RunFolderError(CaptionerError):
    """A run folder file is malformed or does not match the others."""


def _problem(path: Path, field: str, text: str) -> RunFolderError:
    return RunFolderError(f"{path}: {field}: {text}")


def _schema(path: Path, field: str, text: str) -> RunFolderError:
    return RunFolderError(f"{path} is not a valid run config: {field}: {text}")


def _number(path: Path, field: str, value: Any, rule: tuple[type, float, float | None]) -> None:
    kind, low, high = rule
    ok_type = isinstance(value, int) if kind is int else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        raise _schema(
            path, field, f"must be {'an integer' if kind is int else 'a number'}, not {value!r}"
        )
    if value < low or (high is not None and value > high) or value != value:
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _schema(path, field, f"must be {bounds}, not {value!r}")


def _shape(path: Path, field: str, value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list | tuple)
        or not 1 <= len(value) <= 3
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_SIZE for d in value
        )
    ):
        raise _schema(path, field, f"must be a list of 1 to 3 positive integers, not {value!r}")
    return tuple(value)


def _object(path: Path, field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _schema(path, field, f"must be an object, not {type(value).__name__}")
    return value


def check_config(config: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``config`` (the parsed ``config.json``) when it fits the schema, else RunFolderError."""
    path = Path(path)
    config = _object(path, "(top level)", config)
    if config.get("format") != RUN_FORMAT:
        raise _schema(path, "format", f"must be {RUN_FORMAT!r}, not {config.get('format')!r}")
    version = config.get("version")
    if version not in RUN_VERSIONS:
        newer = isinstance(version, int) and version > max(RUN_VERSIONS)
        raise _schema(
            path, "version", f"it has run format version {version!r}; this captioner reads "
            f"{' and '.join(map(str, RUN_VERSIONS))}{'; upgrade captioner' if newer else ''}"
        )  # fmt: skip
    decoder = _object(path, "decoder", config.get("decoder"))
    if unknown := sorted(set(decoder) - {"kind", "config"}):
        raise _schema(path, f"decoder.{unknown[0]}", "unknown key (known: kind, config)")
    kind = decoder.get("kind")
    if kind not in DECODER_KINDS:
        raise _schema(
            path, "decoder.kind", f"must be one of {', '.join(DECODER_KINDS)}, not {kind!r}"
        )
    _check_decoder_config(path, kind, _object(path, "decoder.config", decoder.get("config")))
    _check_encoder(path, config, decoder["config"])
    _check_members(path, config.get("members"))
    _check_grounding(path, config.get("grounding"))
    if "decoding" in config:
        DecodingConfig.from_dict(config["decoding"], str(path))
    return config


def _check_grounding(path: Path, grounding: Any) -> None:
    """``grounding``: {} or the plain file names of the ImageNet head and the family map, and
    optionally of the neighbour index (captioner.inference.consensus)."""
    if not grounding:
        return
    grounding = _object(path, "grounding", grounding)
    if unknown := sorted(set(grounding) - {"head", "families", "neighbours"}):
        raise _schema(path, f"grounding.{unknown[0]}",
                      "unknown key (known: head, families, neighbours)")
    if ("head" in grounding) != ("families" in grounding):
        raise _schema(path, "grounding", "names the ImageNet head and the family map together")
    for key in ("head", "families", "neighbours"):
        if key not in grounding:
            continue
        name = grounding[key]
        if not (isinstance(name, str) and name and "/" not in name and "\\" not in name
                and not name.startswith(".")):
            raise _schema(path, f"grounding.{key}", f"{name!r} is not a file name of the folder")


def _check_members(path: Path, members: Any) -> None:
    """``members``: distinct plain ``*.weights.h5`` file names of the folder (an ensemble)."""
    if members is None:
        return
    if not isinstance(members, list):
        raise _schema(path, "members", f"must be a list of file names, not {type(members).__name__}")
    for i, name in enumerate(members):
        ok = (isinstance(name, str) and name.endswith(".weights.h5") and "/" not in name
              and "\\" not in name and not name.startswith(".")
              and name not in ("best.weights.h5", "last.weights.h5"))
        if not ok:
            raise _schema(path, f"members[{i}]", f"{name!r} is not a weights file name of the "
                          "folder (NAME.weights.h5, no folders, not best/last.weights.h5)")
    if len(set(members)) != len(members):
        raise _schema(path, "members", "lists a file twice")


def _check_decoder_config(path: Path, kind: str, dec: dict[str, Any]) -> None:
    fields = {**DECODER_FIELDS, **(ATTENTION_FIELDS if kind == "attention" else {})}
    for key in dec:
        if key not in fields and key != "feature_shape" and key not in BASE_KEYS:
            known = ", ".join(sorted([*fields, "feature_shape"]))
            raise _schema(
                path, f"decoder.config.{key}", f"unknown key for a {kind} decoder (known: {known})"
            )
    for key in REQUIRED:
        if key not in dec:
            raise _schema(path, f"decoder.config.{key}", "missing")
    for key, rule in fields.items():
        if key in dec:
            _number(path, f"decoder.config.{key}", dec[key], rule)
    if "feature_shape" not in dec:
        return  # building the decoder reports it, naming decoder.config
    shape = _shape(path, "decoder.config.feature_shape", dec["feature_shape"])
    _check_size(path, dec, shape)
    if kind == "attention" and len(shape) != 3:
        raise _schema(
            path, "decoder.config.feature_shape",
            f"an attention decoder needs spatial features (height, width, channels), not {list(shape)}",
        )  # fmt: skip


def _check_size(path: Path, dec: dict[str, Any], feature_shape: tuple[int, ...]) -> None:
    """Refuse a config whose decoder would be absurdly large before anything is allocated."""
    vocab, units = dec["vocab_size"], dec.get("units", 256)
    embed, attention = dec.get("embed_dim", 256), dec.get("attention_units", units)
    channels = feature_shape[-1] if len(feature_shape) == 3 else math.prod(feature_shape)
    # embedding + output layer, the LSTM's four gates, feature/attention projections
    estimate = (vocab * (embed + units) + 4 * units * (embed + units + channels)
                + (channels + units) * (attention + units))
    if estimate > MAX_PARAMETERS:
        raise _schema(path, "decoder.config", f"describes a decoder of about {estimate:,} "
                      f"parameters, more than this captioner loads ({MAX_PARAMETERS:,}); the "
                      "file was altered or does not come from captioner")


def _check_encoder(path: Path, config: dict[str, Any], dec: dict[str, Any]) -> None:
    enc = _object(path, "encoder", config.get("encoder"))
    for key in ("name", "layer"):
        if not isinstance(enc.get(key), str) or not enc[key]:
            raise _schema(
                path, f"encoder.{key}", f"must be a non-empty string, not {enc.get(key)!r}"
            )
    if enc.get("input_size"):
        size = _shape(path, "encoder.input_size", enc["input_size"])
        if len(size) != 2:
            raise _schema(path, "encoder.input_size", f"must be [height, width], not {list(size)}")
    if enc.get("feature_shape") and "feature_shape" in dec:
        shape = _shape(path, "encoder.feature_shape", enc["feature_shape"])
        if shape != tuple(dec["feature_shape"]):
            raise _schema(
                path, "encoder.feature_shape",
                f"{list(shape)} differs from decoder.config.feature_shape {list(dec['feature_shape'])}",
            )  # fmt: skip


def check_files(run_dir: Path, files: Any, config_path: Path, names: list[str]) -> None:
    """Files of ``names`` listed in ``files`` (config.json's manifest) must match their size
    and sha256."""
    if not files:
        return
    files = _object(config_path, "files", files)
    from captioner.storage.files import sha256sum

    for name in names:
        if name not in files or not (run_dir / name).is_file():
            continue
        entry = _object(config_path, f"files.{name}", files[name])
        path = run_dir / name
        size, sha = entry.get("size"), entry.get("sha256")
        if size is not None and path.stat().st_size != size:
            raise _problem(path, "(file)", f"{path.stat().st_size} bytes, but {config_path.name} "
                           f"files.{name}.size is {size}: the file was cut short or replaced")  # fmt: skip
        if sha is not None and sha256sum(path) != sha:
            raise _problem(path, "(file)", f"sha256 differs from {config_path.name} files.{name}"
                           ".sha256: the file was altered; restore the run's own copy")  # fmt: skip


def check_tokenizer(tokenizer, dec: dict[str, Any], tok_path: Path, config_path: Path) -> None:
    """The tokenizer must be the one the decoder (``dec``: its config) was built for."""
    if tokenizer.vocab_size != dec["vocab_size"]:
        raise _problem(
            tok_path, "words",
            f"{tokenizer.vocab_size} entries, but {config_path.name}'s decoder.config.vocab_size is "
            f"{dec['vocab_size']}: this vocabulary belongs to another run; restore the run's own "
            "tokenizer.json",
        )  # fmt: skip
    if tokenizer.max_length != dec["max_length"]:
        raise _problem(
            config_path, "decoder.config.max_length",
            f"{dec['max_length']} differs from {tok_path.name}'s max_length {tokenizer.max_length}; "
            "they must agree (shorter captions: decode with a smaller max_length)",
        )  # fmt: skip


def _file_shapes(path: Path) -> dict[str, list[tuple[int, ...]]]:
    """Layer name -> variable shapes of a Keras 3 ``.weights.h5`` file (empty if unknown)."""
    import h5py

    found: dict[str, list[tuple[int, ...]]] = {}

    def visit(name: str, obj: Any) -> None:
        if name.endswith("vars") and isinstance(obj, h5py.Group) and "name" in obj.attrs:
            layer = obj.attrs["name"]
            layer = layer.decode() if isinstance(layer, bytes) else str(layer)
            keys = sorted(obj, key=lambda k: int(k) if k.isdigit() else 0)
            found.setdefault(layer, [tuple(obj[k].shape) for k in keys])

    try:
        with h5py.File(path, "r") as f:
            check_h5_objects(path, f)
            f.visititems(visit)
    except OSError as exc:
        raise _problem(
            path, "(file)", f"not a readable weights file ({' '.join(str(exc).split())[:120]})"
        ) from None
    return found


def check_h5_objects(path: Path, f, float_only: bool = True) -> None:
    """Only plain groups and datasets inside the file itself: no links to other files or places,
    no virtual or external datasets (they would read other files on this disk), a bounded number
    of objects and, with ``float_only`` (a decoder's weights), only floating-point datasets.
    RunFolderError naming the file and the object otherwise."""
    import h5py

    pending, seen = [f], 0
    while pending:
        group = pending.pop()
        for key in group:
            seen += 1
            if seen > MAX_H5_OBJECTS:
                raise _problem(path, "(file)", f"more than {MAX_H5_OBJECTS} objects; refused")
            link = group.get(key, getlink=True)
            where = f"{group.name.rstrip('/')}/{key}"
            if not isinstance(link, h5py.HardLink):
                raise _problem(path, where, f"is a {type(link).__name__}; a captioner file holds "
                               "only its own groups and datasets")
            obj = group[key]
            if isinstance(obj, h5py.Group):
                pending.append(obj)
            elif obj.is_virtual or obj.external:
                raise _problem(path, where, "reads its values from other files; refused")
            elif float_only and obj.dtype.kind != "f":
                raise _problem(path, where, f"holds {obj.dtype} values; decoder weights are "
                               "floating-point numbers")


def _model_shapes(decoder) -> dict[str, list[tuple[int, ...]]]:
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for w in decoder.weights:
        layer = w.path.rsplit("/", 2)[-2] if "/" in w.path else w.path
        shapes.setdefault(layer, []).append(tuple(int(d) for d in w.shape))
    return shapes


def check_weights(decoder, path: Path, config_path: Path) -> None:
    """Each layer of ``decoder`` must find variables of its shapes in ``path``."""
    stored = _file_shapes(path)
    if not stored:
        return  # a layout this check does not know: the loader reports what it finds
    for layer, shapes in _model_shapes(decoder).items():
        if layer not in stored:
            raise _problem(
                path, f"layer {layer!r}", f"missing (the file has {', '.join(sorted(stored))})"
            )
        if stored[layer] != shapes:
            raise _problem(
                path, f"layer {layer!r}",
                f"the file holds shapes {stored[layer]}, the decoder built from {config_path.name} "
                f"needs {shapes}; the weights and config.json come from different runs",
            )  # fmt: skip
