"""Request options and uploaded images for ``POST /v1/captions``, checked and decoded.

Every check answers a :class:`~captioner.errors.RequestError` (whole request) or a
:class:`Failure` (one image, the others go on) whose text names the problem. Uploads are copied
into the service's temporary folder in chunks, never more than the size limit, decoded with
:func:`captioner.images.load_image` (pixel-count guard before decoding, truncated and
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

from captioner.errors import ImageError, RequestError
from captioner.images import IMAGE_SUFFIXES
from captioner.serve.engine import MAX_BEAM, Options

IMAGE_FIELD = "images"
OPTION_FIELDS = ("beam_size", "n_best", "attention", "heatmap")
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
    max_beam: int = MAX_BEAM

    @property
    def max_body(self) -> int:
        """Bytes a whole request may carry (all files plus the multipart overhead)."""
        return self.max_images * (self.max_bytes + 4096) + 65536


@dataclass(frozen=True)
class Failure:
    """Why one image was not captioned, and the HTTP status it would get on its own."""

    reason: str
    status: int


def parse_options(fields: Mapping[str, Sequence[str]], has_attention: bool, limits: Limits,
                  default_beam: int) -> Options:
    """Options from the form's text fields (each at most once); unknown fields are refused."""
    unknown = sorted(set(fields) - set(OPTION_FIELDS))
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}: the fields are {IMAGE_FIELD!r} (files) "
                           f"and {', '.join(repr(f) for f in OPTION_FIELDS)}")
    for name, values in fields.items():
        if len(values) > 1:
            raise RequestError(f"field {name!r} is given {len(values)} times; give it once")
    value = {name: values[0].strip() for name, values in fields.items()}
    beam = _int(value, "beam_size", default_beam, 1, limits.max_beam)
    n_best = _int(value, "n_best", 1, 1, beam)
    attention, heatmap = _bool(value, "attention"), _bool(value, "heatmap")
    for name, asked in (("attention", attention), ("heatmap", heatmap)):
        if asked and not has_attention:
            raise RequestError(f"{name}=true needs an attention model; this service's decoder "
                               "has no attention (see GET /v1/model)")
    return Options(beam_size=beam, n_best=n_best, attention=attention, heatmap=heatmap)


def _int(value: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = value.get(name)
    if text is None or text == "":
        return default
    if not re.fullmatch(r"[+]?\d{1,6}", text):
        raise RequestError(f"{name} must be a whole number from {low} to {high}, not {text[:40]!r}")
    number = int(text)
    if not low <= number <= high:
        why = " (at most beam_size)" if name == "n_best" else ""
        raise RequestError(f"{name} must be from {low} to {high}{why}, not {number}")
    return number


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
                  limits: Limits, resample: str = "bilinear"
                  ) -> tuple[str, np.ndarray | None, Failure | None]:
    """``(name, pixels (H, W, 3) uint8 at ``size``, None)`` or ``(name, None, failure)``;
    ``resample`` is the run's resize method (as ``captioner caption`` resizes).

    ``upload`` has ``filename``, ``content_type`` and a binary ``file`` (Starlette's
    ``UploadFile``). Runs on a worker thread.
    """
    name = safe_name(upload.filename, index)
    failure = check_content_type(upload.content_type)
    if failure:
        return name, None, failure
    suffix = Path(name).suffix.lower()
    path = folder / f"{uuid.uuid4().hex}{suffix if suffix in IMAGE_SUFFIXES else '.img'}"
    try:
        if not _copy_limited(upload.file, path, limits.max_bytes):
            mb = limits.max_bytes / 2**20
            return name, None, Failure(f"too large (over {mb:g} MB); send a smaller file", 413)
        from captioner.images import load_image

        return name, load_image(path, size, resample, max_pixels=limits.max_pixels), None
    except ImageError as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        return name, None, Failure(reason, 413 if reason.startswith("too large") else 422)
    except OSError as exc:  # the server's disk (full, read-only, ...), not the upload
        from captioner.faults import NO_SPACE, fault_errno

        if (code := fault_errno(exc, writing=True)) is None:
            raise
        why = os.strerror(code).lower()
        return name, None, Failure(f"the server cannot store uploads now ({why}); try again "
                                   "later", 507 if code in NO_SPACE else 503)  # fmt: skip
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

