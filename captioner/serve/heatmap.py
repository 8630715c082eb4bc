"""The attention heat map of one captioned upload, as the page shows it.

:func:`heatmap_image` is the one place that draws it: the CLI's ``--attention-map`` figure
(:func:`captioner.evaluation.figures.attention_figure`: the image, then one panel per word lit where the
decoder looked), as a JPEG; swap in another renderer here and the page follows.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np


def heatmap_image(pixels: np.ndarray, words: Sequence[str], weights: np.ndarray,
                  grid: tuple[int, int], aspect: float = 1.0) -> tuple[bytes, str]:
    """``(payload, mime type)`` of the heat map of ``pixels`` (H, W, 3) uint8, as the encoder
    saw them, for ``words`` and their attention ``weights`` (len(words), h*w); the pixels are
    stretched back to the photo's own width/height ratio ``aspect`` first."""
    from captioner.evaluation.figures import attention_figure, image_bytes

    figure = attention_figure(_at_aspect(pixels, aspect), list(words), np.asarray(weights), grid)
    return image_bytes(figure, "jpeg"), "image/jpeg"


def data_url(payload: bytes, mime: str) -> str:
    """``data:<mime>;base64,...`` for an ``<img src>``."""
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _at_aspect(pixels: np.ndarray, aspect: float) -> np.ndarray:
    """``pixels`` resized to ``aspect`` (width / height), keeping the larger side."""
    from PIL import Image

    h, w = pixels.shape[:2]
    if abs(aspect - w / h) < 0.01:
        return pixels
    size = (max(w, h), max(1, round(max(w, h) / aspect))) if aspect >= 1 else (
        max(1, round(max(w, h) * aspect)), max(w, h))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))
