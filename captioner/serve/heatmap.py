"""The attention heat map of one captioned upload, as the page shows it.

:func:`heatmap_image` is the one place that draws it: today the CLI's ``--attention-map``
strip (:func:`captioner.heatmaps.attention_strip`: the image, then one tile per word lit where
the decoder looked); swap in another renderer (e.g. a matplotlib figure) here and the page
follows.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np

JPEG_QUALITY = 85


def heatmap_image(pixels: np.ndarray, words: Sequence[str], weights: np.ndarray,
                  grid: tuple[int, int]) -> tuple[bytes, str]:
    """``(payload, mime type)`` of the heat map of ``pixels`` (H, W, 3) uint8, as the encoder
    saw them, for ``words`` and their attention ``weights`` (len(words), h*w)."""
    from captioner.heatmaps import attention_strip

    out = io.BytesIO()
    attention_strip(pixels, list(words), np.asarray(weights), grid).save(out, "JPEG",
                                                                         quality=JPEG_QUALITY)
    return out.getvalue(), "image/jpeg"


def data_url(payload: bytes, mime: str) -> str:
    """``data:<mime>;base64,...`` for an ``<img src>``."""
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"
