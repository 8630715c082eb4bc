"""Ensembles: several decoders over the same encoder and vocabulary decoded as one model.

Every step of the search feeds each member its own state and averages the members'
log-probabilities, so greedy and beam search, n-best lists and length normalisation work
unchanged (the search only sees one step function). The members come from several run folders
(``--model A B``) or from one folder that lists them (``members`` in its ``config.json``, as the
bundled model may); :class:`captioner.inference.EnsembleCaptioner` drives them with the helpers
here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from captioner.errors import CaptionerError


def mean_step(steps: list[Callable]) -> Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]:
    """A step running every member's step on its own state and averaging their log-probs."""

    def step(tokens: np.ndarray, state: list):
        outs = [fn(tokens, s) for fn, s in zip(steps, state, strict=True)]
        log_probs = np.mean([o[0] for o in outs], axis=0)  # (B, V), mean over members
        return log_probs, [o[1] for o in outs]

    return step


def check_compatible(first: Any, other: Any, name: Any) -> None:
    """CaptionerError unless captioner ``other`` shares ``first``'s vocabulary and encoder
    features (name, layer and feature shape)."""
    if first.tokenizer.words != other.tokenizer.words:
        raise CaptionerError(f"ensemble member {name} has another vocabulary than the first model")
    a, b = first.config.encoder, other.config.encoder
    for key in ("name", "layer", "feature_shape"):
        if tuple(_listed(getattr(a, key))) != tuple(_listed(getattr(b, key))):
            raise CaptionerError(
                f"ensemble member {name} uses encoder {key} {getattr(b, key)!r}, the first "
                f"model {getattr(a, key)!r}; ensembles need the same image features"
            )


def _listed(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
