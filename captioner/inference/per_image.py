"""Search state kept once per image: beams refer to their image by index.

The search (:mod:`captioner.inference.decoding`) reorders and repeats every leaf of its state pytree per
row (``gather_state`` / ``repeat_state``). An image's features and each ensemble member's
projected attention keys never change during a search and are large (the bundled model: 415 KB
of features and 4 x 83 KB of keys per image), so they stay outside the state, one row per
image; the state carries only the small per-beam leaves (h, c, ...) and ``image_index`` (R,),
the image of each row, which the search gathers and repeats like any other leaf (a wrapper may
add its own per-row leaves beside them). Memory then grows with the batch, not with
batch x beam x members.

A step sees rows in image-major blocks of k (rows ``g*k .. g*k+k-1`` are image g's: what greedy,
beam and sampled search keep) and runs its per-image arithmetic on the shared rows directly;
any other order gathers the shared rows per row first (exact, just not memory-lean).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

IMAGE_INDEX = "image_index"  # the state leaf naming each row's image
BEAMS = "beams"  # the per-beam state the model's step reads and writes

GroupedStep = Callable[[np.ndarray, Any, dict[str, Any]], tuple[np.ndarray, Any]]


def indexed_state(beams: Any, images: int) -> dict[str, Any]:
    """The search's initial state: one row per image, each naming itself."""
    return {IMAGE_INDEX: np.arange(images, dtype=np.int64), BEAMS: beams}


def block_size(image_index: np.ndarray, images: int) -> int | None:
    """k when the rows are image-major blocks of k rows per image (row r is image ``r // k``),
    else None."""
    rows = len(image_index)
    if images < 1 or rows % images:
        return None
    k = rows // images
    return k if np.array_equal(image_index, np.arange(rows) // k) else None


def indexed_step(
    grouped: GroupedStep,
    shared: dict[str, Any],
    images: int,
    take: Callable[[Any, np.ndarray], Any],
    blocks: bool = True,
) -> Callable[[np.ndarray, dict[str, Any]], tuple[np.ndarray, dict[str, Any]]]:
    """The search's ``step(tokens, state)`` over ``grouped(tokens, beams, shared_rows)``, which
    reads ``shared_rows`` (one row per image block) beside the per-beam state. ``shared``: the
    per-image arrays (``images`` rows each); ``take(array, index)``: rows of one of them on
    its backend (numpy or Keras), used only when the rows are not in image-major blocks, or
    always when ``blocks`` is False (a step that needs one shared row per row)."""

    def step(tokens: np.ndarray, state: dict[str, Any]):
        index = np.asarray(state[IMAGE_INDEX])
        grouped_rows = blocks and block_size(index, images)
        rows = shared if grouped_rows else {n: take(v, index) for n, v in shared.items()}
        log_probs, beams = grouped(tokens, state[BEAMS], rows)
        return log_probs, {**state, IMAGE_INDEX: index, BEAMS: beams}

    return step


def numpy_take(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` of a numpy array (the ``take`` of :func:`indexed_step`)."""
    return np.take(array, index, axis=0)
