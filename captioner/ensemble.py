"""Ensembles: several run folders over the same encoder decoded as one model.

Every step of the search feeds each member its own state and averages the members'
log-probabilities, so greedy and beam search, n-best lists and length normalisation work
unchanged (the search only sees one step function).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from captioner.errors import CaptionerError
from captioner.inference import Captioner


def load_captioner(run_dirs: Sequence[str | os.PathLike], weights: str = "best") -> Captioner:
    """One run folder as :meth:`Captioner.from_run`; several as an :class:`EnsembleCaptioner`."""
    if len(run_dirs) == 1:
        return Captioner.from_run(run_dirs[0], weights)
    return EnsembleCaptioner([Captioner.from_run(r, weights) for r in run_dirs], list(run_dirs))


class EnsembleCaptioner(Captioner):
    """Several runs over the same encoder and vocabulary decoded as one model: every step of the
    search feeds each member its own state and averages the members' log-probabilities.

    Encoding, images and attention maps come from the first member (the encoder is shared).
    """

    def __init__(self, members: list[Captioner], names: Sequence[Any] = ()):
        first = members[0]
        labels = list(names) if len(names) == len(members) else list(range(len(members)))
        for label, member in zip(labels[1:], members[1:], strict=True):
            _check_compatible(first, member, label)
        self.members = members
        self.decoder, self.tokenizer, self.config = first.decoder, first.tokenizer, first.config
        self.run_dir, self._searched = first.run_dir, True
        self._encoder, self._encoded = None, False

    def initial_state(self, features: np.ndarray, eager: bool = False) -> list[dict]:
        return [m.initial_state(features, eager) for m in self.members]

    def prepare(self, features: np.ndarray, repeat: int = 1,
                eager: bool = False) -> tuple[Any, Callable]:
        parts = [m.prepare(features, repeat, eager) for m in self.members]
        return [p[0] for p in parts], _mean_step([p[1] for p in parts])

    def step_function(self, eager: bool = False) -> Callable[[np.ndarray, Any], tuple]:
        return _mean_step([m.step_function(eager) for m in self.members])


def _mean_step(steps: list[Callable]) -> Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]:
    """A step running every member's step on its own state and averaging their log-probs."""

    def step(tokens: np.ndarray, state: list):
        outs = [fn(tokens, s) for fn, s in zip(steps, state, strict=True)]
        log_probs = np.mean([o[0] for o in outs], axis=0)  # (B, V), mean over members
        return log_probs, [o[1] for o in outs]

    return step


def _check_compatible(first: Captioner, other: Captioner, name: Any) -> None:
    """CaptionerError unless ``other`` shares ``first``'s vocabulary and encoder features."""
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

