"""Caption cleaning: the rules a run records in its config and applies to every caption.

Standard library only.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

from captioner.errors import CaptionerError

_PUNCTUATION = frozenset(string.punctuation)


@dataclass(frozen=True)
class CleaningRules:
    """How :func:`clean_caption` normalises text. Steps, in this order:

    1. ``lowercase``: ``str.lower()``.
    2. ``strip_punctuation``: delete ASCII punctuation and every Unicode punctuation (category
       P*) character, inside words too (``"dog's"`` -> ``"dogs"``, ``"tri-colored"`` ->
       ``"tricolored"``).
    3. split on whitespace.
    4. ``drop_numeric``: drop tokens that contain any digit (``"2"``, ``"3rd"``).
    5. drop tokens shorter than ``min_token_length`` characters unless listed in ``keep_short``
       (compared in lower case).
    """

    lowercase: bool = True
    strip_punctuation: bool = True
    drop_numeric: bool = True
    min_token_length: int = 2
    keep_short: tuple[str, ...] = ("a",)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict (``keep_short`` as a list)."""
        data = asdict(self)
        data["keep_short"] = list(self.keep_short)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> CleaningRules:
        """Inverse of :meth:`to_dict`; unknown keys raise CaptionerError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CaptionerError(
                f"unknown cleaning rule(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        values = dict(data)
        if "keep_short" in values:
            values["keep_short"] = tuple(str(t) for t in values["keep_short"])  # type: ignore[union-attr]
        return cls(**values)  # type: ignore[arg-type]


DEFAULT_RULES = CleaningRules()


def _is_punctuation(ch: str) -> bool:
    return ch in _PUNCTUATION or unicodedata.category(ch).startswith("P")


def clean_caption(text: str, rules: CleaningRules = DEFAULT_RULES) -> str:
    """Normalise one caption with ``rules`` (see :class:`CleaningRules`); tokens joined by one
    space. Deterministic; also used for BLEU references. May return ``""``."""
    if rules.lowercase:
        text = text.lower()
    if rules.strip_punctuation:
        text = "".join(ch for ch in text if not _is_punctuation(ch))
    keep = {t.lower() for t in rules.keep_short}
    tokens = []
    for token in text.split():
        if rules.drop_numeric and any(ch.isdigit() for ch in token):
            continue
        if len(token) < rules.min_token_length and token.lower() not in keep:
            continue
        tokens.append(token)
    return " ".join(tokens)


def clean_captions(
    captions: Mapping[str, Sequence[str]], rules: CleaningRules = DEFAULT_RULES
) -> dict[str, list[str]]:
    """:func:`clean_caption` over every caption; keeps names, order and counts (a caption that
    cleans to ``""`` is kept as ``""`` so references stay aligned)."""
    return {name: [clean_caption(c, rules) for c in caps] for name, caps in captions.items()}
