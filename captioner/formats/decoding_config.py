"""How a model decodes: :class:`DecodingConfig`, the one owner of the decoding defaults and
limits (beam size, n-best, length normalisation, n-gram blocking, caption length).

A run folder stores its decoding in ``config.json`` under ``"decoding"``; every entry point
(``caption``, ``evaluate``, ``serve``, the Python API, training's dev scores) starts from it
and overrides single fields (:meth:`DecodingConfig.replace`). Standard library only: the CLI
reads the limits to print ``--help``; :mod:`captioner.inference.decoding` re-exports the class.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from captioner.errors import CaptionerError, OptionError

DEFAULT_BEAM_SIZE = 3
MAX_BEAM_SIZE = 20  # wider beams cost time and memory linearly and do not give better captions
MAX_ALPHA = 10.0  # score = log-prob / length**alpha; beyond this only the longest caption wins
MAX_BLOCK_NGRAM = 20
MAX_LENGTH = 500  # tokens generated at most (the model's own maximum is usually far below)
MAX_GROUNDING = 10.0  # beyond this a word the encoder's head doubts is simply never chosen
MAX_CONSENSUS = 200  # neighbours a caption is compared with (each costs ~5 CIDEr-D pairs)
MAX_CONSENSUS_WEIGHT = 100.0  # beyond this the search score alone decides


class DecodingError(OptionError):
    """A decoding setting is out of range; ``field`` names it, ``text`` says what is wrong."""


@dataclass(frozen=True)
class DecodingConfig:
    """One decoding setting; ``beam_size`` 1 is greedy search. Invalid values never exist:
    construction raises :class:`DecodingError` naming the field."""

    beam_size: int = DEFAULT_BEAM_SIZE
    n_best: int = 1  # captions per image, best first (at most beam_size)
    alpha: float = 0.0  # length normalisation: score = log-prob / length**alpha
    block_ngram: int = 0  # forbid repeating any n-gram within a caption (0: off)
    max_length: int | None = None  # tokens to generate at most (None: the model's maximum)
    # object grounding: a word naming an object family (dog, cat, bus, ...) scores
    # + grounding * log(mass the encoder's ImageNet head gives the family) (0: off;
    # captioner.inference.grounding; needs a model that carries the head)
    grounding: float = 0.0
    # and + grounding_boost * (2 * mass - 1) where the head is sure of the family (mass > 0.5)
    grounding_boost: float = 0.0
    # consensus reranking: the beam's captions are ordered by their CIDEr-D agreement with the
    # captions of the `consensus` most similar training images + consensus_weight * search
    # score (0: off; captioner.inference.consensus; needs a model that carries the index)
    consensus: int = 0
    consensus_weight: float = 1.0

    def __post_init__(self) -> None:
        _int("beam_size", self.beam_size, 1, MAX_BEAM_SIZE, " (1 = greedy)")
        _int("n_best", self.n_best, 1, self.beam_size, " (at most the beam size)")
        _number("alpha", self.alpha, 0.0, MAX_ALPHA)
        _int("block_ngram", self.block_ngram, 0, MAX_BLOCK_NGRAM, " (0 = off)")
        if self.max_length is not None:
            _int("max_length", self.max_length, 1, MAX_LENGTH)
        _number("grounding", self.grounding, 0.0, MAX_GROUNDING)
        _number("grounding_boost", self.grounding_boost, 0.0, MAX_GROUNDING)
        _int("consensus", self.consensus, 0, MAX_CONSENSUS, " (0 = off)")
        _number("consensus_weight", self.consensus_weight, 0.0, MAX_CONSENSUS_WEIGHT)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "grounding", float(self.grounding))
        object.__setattr__(self, "grounding_boost", float(self.grounding_boost))
        object.__setattr__(self, "consensus_weight", float(self.consensus_weight))

    def replace(self, **overrides: Any) -> DecodingConfig:
        """A copy with the given fields changed; ``None`` values leave a field as it is."""
        if unknown := sorted(set(overrides) - set(FIELDS)):
            raise DecodingError(
                unknown[0], f"is not a decoding setting (known: {', '.join(FIELDS)})"
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self

    def to_dict(self) -> dict[str, Any]:
        """The ``"decoding"`` object of ``config.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "decoding") -> DecodingConfig:
        """Read a ``"decoding"`` object (missing keys take the defaults); a bad value is one
        :class:`CaptionerError` line naming ``source`` and the field."""
        if not isinstance(data, dict):
            raise CaptionerError(
                f"{source}: decoding: must be an object, not {type(data).__name__}"
            )
        try:
            return cls().replace(**{k: _required(k, v) for k, v in data.items()})
        except DecodingError as exc:
            raise CaptionerError(
                f"{source}: decoding.{exc.field}: {exc.text}; fix it or remove "
                "the key (the default is used then)"
            ) from None

    def search_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`captioner.inference.captioner.Captioner.search`."""
        return self.to_dict()

    @property
    def label(self) -> str:
        """Short human name, e.g. ``"greedy"`` or ``"beam 3, alpha 0.7"``."""
        text = "greedy" if self.beam_size == 1 else f"beam {self.beam_size}"
        if self.alpha and self.beam_size > 1:
            text += f", alpha {self.alpha:g}"
        if self.block_ngram:
            text += f", no repeated {self.block_ngram}-grams"
        if self.grounding or self.grounding_boost:
            text += f", grounding {self.grounding:g}"
            text += f" (boost {self.grounding_boost:g})" if self.grounding_boost else ""
        if self.consensus and self.beam_size > 1:
            text += f", consensus of {self.consensus} neighbours"
        return text

    def to_json(self) -> dict[str, Any]:
        """The report's ``settings`` of a section."""
        return {
            "beam_size": self.beam_size,
            "alpha": self.alpha,
            "block_ngram": self.block_ngram,
            "grounding": self.grounding,
            "grounding_boost": self.grounding_boost,
            "consensus": self.consensus,
            "consensus_weight": self.consensus_weight,
            "search": "greedy" if self.beam_size == 1 else "beam",
            "label": self.label,
        }


FIELDS = tuple(f.name for f in dataclasses.fields(DecodingConfig))
DECIMAL_FIELDS = tuple(f.name for f in dataclasses.fields(DecodingConfig) if f.type == "float")


def _required(name: str, value: Any) -> Any:
    """A stored value may not be null except ``max_length`` (null: the model's maximum)."""
    if value is None and name != "max_length":
        raise DecodingError(name, "must be given, not null")
    return value


def _int(name: str, value: Any, low: int, high: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodingError(name, f"must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise DecodingError(name, f"must be from {low} to {high}{note}, not {value}")


def _number(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DecodingError(name, f"must be a number, not {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        raise DecodingError(name, f"must be from {low:g} to {high:g}, not {value}")


def cli_error(exc: DecodingError) -> CaptionerError:
    """The error of a decoding option given on the command line, naming its flag."""
    return CaptionerError(exc.flag_line())


def check_overrides(**overrides: Any) -> None:
    """Each given field (None: not given) on its own, before any model is loaded; ``n_best``
    is checked against ``beam_size`` only when both are given (else once the model's stored
    beam size is known)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    DecodingConfig(**{"beam_size": MAX_BEAM_SIZE, **given})
