"""A parsed caption file (captions by image, the problems met) and the helpers every format's
parser shares: the ``X.jpg.N`` copy-suffix rule, storing records, reading a JSON document.

:mod:`captioner.text.captions` picks the parser; :mod:`captioner.text.coco` and :mod:`captioner.text.karpathy`
are two of them. Pure Python.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from captioner.errors import CaptionerError

_COPY_SUFFIX = re.compile(r"^(?P<name>.+\.(?:jpe?g|png|bmp|gif|webp))\.\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    """One skipped or altered record: ``line`` is 1-based, or None for JSON records."""

    file: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.reason}"


@dataclass
class CaptionFile:
    """What :func:`captioner.text.captions.read_captions` found: ``captions`` (name -> raw captions) and ``problems``."""

    path: str
    format: str
    captions: dict[str, list[str]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    splits: dict[str, str] = field(default_factory=dict)  # name -> train/val/test (Karpathy)

    @property
    def n_captions(self) -> int:
        """Total number of captions kept."""
        return sum(len(c) for c in self.captions.values())


def split_copy_suffix(name: str) -> tuple[str, bool]:
    """``"X.jpg.1"`` -> ``("X.jpg", True)``; any other name -> ``(name, False)``."""
    match = _COPY_SUFFIX.match(name)
    return (match["name"], True) if match else (name, False)


def add_records(records: Sequence[tuple[int | None, str, str]], result: CaptionFile) -> None:
    """Store ``(line, image, caption)`` records, normalising ``X.jpg.N`` ids (see module doc)."""
    plain = {name for _, name, _ in records if not split_copy_suffix(name)[1]}
    for number, name, caption in records:
        base, suffixed = split_copy_suffix(name)
        if suffixed and base in plain:
            reason = f"dropped: {name!r} duplicates {base!r}, which has its own captions"
            result.problems.append(Problem(result.path, number, reason))
            continue
        if suffixed:
            reason = f"renamed {name!r} to {base!r}"
            result.problems.append(Problem(result.path, number, reason))
        result.captions.setdefault(base, []).append(caption)


def json_document(data: bytes, path: str) -> object:
    """The parsed JSON of a caption file; bad UTF-8 or JSON is one error line."""
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise CaptionerError(f"{path}: not UTF-8 text; save the JSON as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise CaptionerError(
            f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})"
        ) from None
