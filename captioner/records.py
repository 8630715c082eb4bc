"""The JSON record of one captioned image: the keys of ``captioner caption --json``, also
answered per image by ``captioner serve`` (one place, so the two cannot drift apart)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SCORE_DIGITS = 6
WEIGHT_DIGITS = 4


def caption_record(image: str, captions: Sequence[Any] | None, error: str | None) -> dict[str, Any]:
    """``image``, ``caption``, ``score``, ``finished``, ``captions`` (n-best) or ``error``.

    ``captions`` are :class:`captioner.inference.Caption` objects, best first."""
    record: dict[str, Any] = {"image": image}
    if error:
        return record | {"caption": None, "score": None, "error": error}
    best = captions[0]
    return record | {
        "caption": best.text,
        "score": round(best.score, SCORE_DIGITS),
        "finished": best.finished,
        "captions": [{"caption": c.text, "score": round(c.score, SCORE_DIGITS)} for c in captions],
    }


def attention_record(words: Sequence[str], weights: np.ndarray, grid: tuple[int, int]) -> dict[str, Any]:
    """``{"grid": [h, w], "words": [...], "weights": [[[...]]]}``: one (h, w) grid of attention
    weights per word of the best caption, ``<end>`` last. ``weights`` is (len(words), h*w)."""
    h, w = grid
    cells = np.asarray(weights, dtype="float64").reshape(len(words), h, w)  # (T, h, w)
    return {"grid": [h, w], "words": list(words),
            "weights": np.round(cells, WEIGHT_DIGITS).tolist()}
