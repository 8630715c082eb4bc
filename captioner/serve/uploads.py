"""Request options and uploaded images for ``POST /v1/captions``, checked and decoded.

Every check answers a :class:`~captioner.errors.RequestError` (whole request) or a
:class:`Failure` (one image, the others go on) whose text names the problem. Uploads are copied
into the service's temporary folder in chunks, never more than the size limit, decoded with
:func:`captioner.encoders.images.load_image` (pixel-count guard before decoding, truncated and
non-image files refused) and deleted at once.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from captioner.encoders.images import IMAGE_SUFFIXES
from captioner.errors import ImageError, RequestError
from captioner.formats.decoding_config import DECIMAL_FIELDS, DecodingConfig, DecodingError
from captioner.formats.decoding_config import FIELDS as DECODING_FIELDS
from captioner.serve.engine import Options

IMAGE_FIELD = "images"
OPTION_FIELDS = (*DECODING_FIELDS, "attention", "heatmap")
TRUE, FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off", ""})
ACCEPTED_TYPES = frozenset({"", "application/octet-stream"})  # and every image/*
CHUNK = 1 << 16
NAME_CHARS = 200


@dataclass(frozen=True)
class Limits:
    """What one request may send."""

    max_images: int = 16
    max_bytes: int = 10 * 2**20  # per image file
    max_pixels: int = 25_000_000  # per image, checked from the header before decoding

    @property
    def max_body(self) -> int:
        """Bytes a whole request may carry (all files plus the multipart overhead)."""
        return self.max_images * (self.max_bytes + 4096) + 65536


@dataclass(frozen=True)
class Decoded:
    """One upload: its name, then its pixels at the model's input size and the photo's own
    width/height ratio (for the heat map), or why it failed."""

    name: str
    pixels: np.ndarray | None = None
    failure: Failure | None = None
    aspect: float = 1.0


@dataclass(frozen=True)
class Failure:
    """Why one image was not captioned, and the HTTP status it would get on its own."""

    reason: str
    status: int


def parse_options(fields: Mapping[str, Sequence[str]], has_attention: bool,
                  default: DecodingConfig) -> Options:
    """Options from the form's text fields (each at most once); unknown fields are refused.
    The decoding fields override single fields of ``default`` (the model's stored decoding),
    with the limits of :class:`~captioner.formats.decoding_config.DecodingConfig`, as the CLI's."""
    unknown = sorted(set(fields) - set(OPTION_FIELDS))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}: the fields are {IMAGE_FIELD!r} (files) "
                           f"and {', '.join(repr(f) for f in OPTION_FIELDS)}")
    for name, values in fields.items():
        if len(values) > 1:
            raise RequestError(f"field {name!r} is given {len(values)} times; give it once")
    value = {name: values[0].strip() for name, values in fields.items()}
    given = {name: _number(value, name) for name in DECODING_FIELDS}
    try:
        decoding = default.replace(**given)
    except DecodingError as exc:
        raise RequestError(f"{exc.field} {exc.text}") from None
    attention, heatmap = _bool(value, "attention"), _bool(value, "heatmap")
    for name, asked in (("attention", attention), ("heatmap", heatmap)):
        if asked and not has_attention:
            raise RequestError(f"{name}=true needs an attention model; this service's decoder "
                               "has no attention (see GET /v1/model)")
    return Options(decoding=decoding, attention=attention, heatmap=heatmap)


def _number(value: Mapping[str, str], name: str) -> int | float | None:
    """A form field as a whole number (``alpha``, ``grounding``, ``consensus_weight``, ...: a
    decimal number); None when not given."""
    text = value.get(name)
    if text is None or text == "":
        return None
    if name in DECIMAL_FIELDS:
        if not re.fullmatch(r"[+]?(\d{1,6}(\.\d{0,6})?|\.\d{1,6})", text):
            raise RequestError(f"{name} must be a decimal number such as 0.7, not {text[:40]!r}")
        return float(text)
    if not re.fullmatch(r"[+]?\d{1,6}", text):
        raise RequestError(f"{name} must be a whole number, not {text[:40]!r}")
    return int(text)


def _bool(value: Mapping[str, str], name: str) -> bool:
    text = value.get(name, "").lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise RequestError(f"{name} must be true or false, not {text[:40]!r}")


def safe_name(filename: str | None, index: int) -> str:
    """The upload's base name (no folders, no control characters, at most 200 characters),
    or ``image<N>`` when it has none."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()[:NAME_CHARS]
    return name or f"image{index + 1}"


def check_content_type(content_type: str | None) -> Failure | None:
    """None for ``image/*``, ``application/octet-stream`` or no type; else a 415 failure."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind in ACCEPTED_TYPES or kind.startswith("image/"):
        return None
    return Failure(f"not an image upload (content type {kind[:60]}); send JPEG, PNG, WebP, "
                   "GIF, BMP or TIFF files", 415)


def decode_upload(upload: Any, index: int, folder: Path, size: tuple[int, int],
                  limits: Limits, resample: str = "bilinear") -> Decoded:
    """The upload decoded: pixels (H, W, 3) uint8 at ``size``, resized with the run's
    ``resample`` method (as ``captioner caption`` resizes), or its failure.

    ``upload`` has ``filename``, ``content_type`` and a binary ``file`` (Starlette's
    ``UploadFile``). Runs on a worker thread.
    """
    name = safe_name(upload.filename, index)
    failure = check_content_type(upload.content_type)
    if failure:
        return Decoded(name, failure=failure)
    suffix = Path(name).suffix.lower()
    path = folder / f"{uuid.uuid4().hex}{suffix if suffix in IMAGE_SUFFIXES else '.img'}"
    try:
        if not _copy_limited(upload.file, path, limits.max_bytes):
            mb = limits.max_bytes / 2**20
            return Decoded(name, failure=Failure(f"too large (over {mb:g} MB); send a smaller "
                                                 "file", 413))
        from captioner.encoders.images import load_image, upright_size

        pixels = load_image(path, size, resample, max_pixels=limits.max_pixels)
        width, height = upright_size(path)
        return Decoded(name, pixels, aspect=width / height)
    except ImageError as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        return Decoded(name, failure=Failure(reason, 413 if reason.startswith("too large") else 422))
    except OSError as exc:  # the server's disk (full, read-only, ...), not the upload
        from captioner.storage.faults import NO_SPACE, fault_errno

        if (code := fault_errno(exc, writing=True)) is None:
            raise
        why = os.strerror(code).lower()
        return Decoded(name, failure=Failure(f"the server cannot store uploads now ({why}); try "
                                             "again later", 507 if code in NO_SPACE else 503))
    finally:
        path.unlink(missing_ok=True)


def _copy_limited(source: BinaryIO, path: Path, limit: int) -> bool:
    """Copy ``source`` to ``path``; False (and nothing past ``limit``) when it is larger."""
    source.seek(0)
    written = 0
    with open(path, "wb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > limit:
                return False
            out.write(chunk)
    return True

