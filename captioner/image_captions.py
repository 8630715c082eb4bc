"""What :meth:`captioner.inference.Captioner.caption` returns per image, and the attention grid
of a feature shape."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from captioner.decoding import Caption


@dataclass
class ImageCaptions:
    """What :meth:`Captioner.caption` says about one image."""

    image: Any  # the path as given, else the input's position in the list
    captions: list[Caption]  # best first; empty when the image failed
    error: str | None = None  # why the image could not be captioned
    warning: str | None = None  # e.g. a tiny image, whose caption is a guess
    words: list[str] | None = None  # best caption's words and "<end>" (attention=True)
    attention: np.ndarray | None = None  # (len(words), h, w) weights, each row sums to 1

    @property
    def text(self) -> str | None:
        """The best caption, or None when the image failed."""
        return self.captions[0].text if self.captions else None

    @property
    def score(self) -> float | None:
        """The best caption's search score (log-probability, length-normalised by alpha)."""
        return self.captions[0].score if self.captions else None


def image_name(item: Any, index: int) -> Any:
    """How a result names its input: the path as given, else its position in the list."""
    return item if isinstance(item, (str, os.PathLike)) else index


def grid_of(feature_shape: Sequence[int]) -> tuple[int, int]:
    """The (h, w) attention grid of spatial features (H, W, D) or (L, D) with square L."""
    if len(feature_shape) == 3:
        return int(feature_shape[0]), int(feature_shape[1])
    side = int(round(np.sqrt(feature_shape[0])))
    return side, int(feature_shape[0]) // side
