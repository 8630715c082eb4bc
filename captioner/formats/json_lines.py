"""The one JSON-lines format of ``caption --json``, ``extract --json`` and ``evaluate --json``.

Every command that prints JSON prints one object per line, built here, so the same thing has
the same key everywhere (the HTTP service reuses these keys too):

* per image: ``image`` (the name or path as given), then either the result (``caption``,
  ``score``, ...) or ``error`` (one line saying what is wrong); ``file`` names the file the
  problem is in when it is not the image itself (a feature cache, a run folder file);
* one closing ``summary`` object per call with the counts.

Pure Python (json only), so any layer may import it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

IMAGE = "image"  # image name or path, as given on the command line / stored in the cache
CAPTION = "caption"  # the best caption (text)
SCORE = "score"  # its search score: log-prob / length**alpha (higher is better, <= 0)
FINISHED = "finished"  # the caption ended with the end token (not cut at max length)
CAPTIONS = "captions"  # n-best list: [{caption, score}], best first
ERROR = "error"  # why this image has no result (present only on failures)
FILE = "file"  # the file holding the problem, when it is not the image (cache, run folder)
STATUS = "status"  # extract: "done", "skipped", "failed", "damaged"
DECODING = "decoding"  # evaluate: "greedy", "beam 3", ...
REFERENCES = "references"  # evaluate: the cleaned reference captions
METRICS = "metrics"  # evaluate: per-image (or corpus, in the summary) metric values
SUMMARY = "summary"  # the closing object of a call: counts, totals, output paths
SCORE_DIGITS = 6


class CaptionLike(Protocol):
    text: str
    score: float
    finished: bool


def _number(value: float | None) -> float | None:
    """Finite floats rounded for printing; NaN/inf (never valid JSON) become None."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), SCORE_DIGITS)


def caption_record(image: str, captions: Iterable[CaptionLike]) -> dict[str, Any]:
    """``{image, caption, score, finished, captions}`` for an n-best list (best first)."""
    captions = list(captions)
    best = captions[0]
    return {
        IMAGE: image,
        CAPTION: best.text,
        SCORE: _number(best.score),
        FINISHED: bool(best.finished),
        CAPTIONS: [{CAPTION: c.text, SCORE: _number(c.score)} for c in captions],
    }


def error_record(image: str, error: str, file: str | None = None, **extra: Any) -> dict[str, Any]:
    """``{image, error}`` (plus ``file`` and any ``extra`` keys) for an image without a result."""
    record: dict[str, Any] = {IMAGE: image, **extra, ERROR: error}
    if file is not None:
        record[FILE] = file
    return record


def caption_error_record(image: str, error: str, file: str | None = None) -> dict[str, Any]:
    """A failed ``caption`` line: the caption keys set to null, so every line has them."""
    return error_record(image, error, file, **{CAPTION: None, SCORE: None})


def summary_record(**fields: Any) -> dict[str, Any]:
    """``{summary: {...}}``, the closing line of a call."""
    return {SUMMARY: fields}


def _strict(value: Any) -> Any:
    """``value`` with NaN and infinities (not JSON) replaced by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def dumps(record: Mapping[str, Any]) -> str:
    """One JSON line (strict JSON: NaN and infinities are written as null)."""
    return json.dumps(_strict(record), ensure_ascii=False, allow_nan=False, default=str)


def is_error(record: Mapping[str, Any]) -> bool:
    """True for a per-image failure line."""
    return bool(record.get(ERROR))
