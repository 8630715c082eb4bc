"""Captions of a large collection as a resumable JSON-lines file (``caption --out``).

The first line records what the file is made with: ``{"made_with": {"model": [run folders],
"decoding": {...}}}``; then one object per image, one line each: ``image`` (the path as given),
``caption``, ``score``, ``finished`` and ``captions`` (the n-best list), or ``caption: null``
and ``error`` for an image that could not be read. Lines are appended and flushed batch by
batch; a rerun reads the file, drops a torn last line (a killed run), refuses a file made with
another model or decoding (one line, like a feature cache made another way) and captions
only the images it lacks. Files written before the first line existed are continued as-is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.errors import CaptionerError
from captioner.formats import json_lines as records
from captioner.storage.faults import writing


def caption_record(image: str, captions: Sequence[Any] | None, error: str | None) -> dict:
    """The JSON object of one image (``captions``: n-best list of ``Caption``, best first),
    in the one format of :mod:`captioner.formats.json_lines`."""
    if error:
        return records.caption_error_record(image, error)
    return records.caption_record(image, captions)


MADE_WITH = "made_with"  # the first line's key: model folders and decoding of the file


def made_with(models: Sequence[str | os.PathLike], decoding: Any) -> dict[str, Any]:
    """What a caption file is made with: the run folders (resolved) and the decoding."""
    return {"model": [str(Path(m).resolve()) for m in models], "decoding": decoding.to_dict()}


def _describe(made: dict[str, Any]) -> str:
    models = " ".join(made.get("model") or ["?"])
    decoding = ", ".join(f"{k} {v}" for k, v in (made.get("decoding") or {}).items())
    return f"model {models} ({decoding})"


def check_made_with(path: Path, made: dict[str, Any] | None) -> bool:
    """True when ``path`` needs its first line (absent or empty); CaptionerError when its first
    line records another model or decoding than ``made``."""
    if made is None or not path.exists() or path.stat().st_size == 0:
        return made is not None
    with open(path, "rb") as f:
        first = f.readline()
    try:
        found = json.loads(first).get(MADE_WITH)
    except (ValueError, AttributeError):
        found = None
    if found is not None and found != made:
        raise CaptionerError(f"{path} holds captions made with {_describe(found)}, not "
                             f"{_describe(made)}; write another file, or delete this one "
                             "to start over")
    return False


def read_done(path: Path) -> set[str]:
    """Images already in the JSON-lines file ``path``; a torn last line is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # a last line without its newline was cut by a crash
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    done = set()
    for number, line in enumerate(data[:keep].splitlines(), 1):
        if not line.strip() or (number == 1 and MADE_WITH.encode() in line[:20]):
            continue
        try:
            done.add(json.loads(line)["image"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CaptionerError(
                f"{path} line {number} is not a caption record ({exc}); write another "
                "file, or delete this one to start over."
            ) from exc
    return done


@dataclass
class CaptionSummary:
    """What one ``caption --out`` run did."""

    out: Path
    captioned: int = 0
    skipped: int = 0
    failed: int = 0

    def line(self) -> str:
        return (f"captioned {self.captioned}, skipped {self.skipped} (already in {self.out.name}), "
                f"failed {self.failed} -> {self.out}")  # fmt: skip


class LineWriter:
    """Append records to a JSON-lines file; each :meth:`write` reaches the disk whole."""

    def __init__(self, path: Path, summary: CaptionSummary):
        self.path = path
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.summary = summary

    def write(self, lines: Iterable[dict]) -> None:
        lines = list(lines)
        text = "".join(records.dumps(record) + "\n" for record in lines)
        with writing(self.path, len(text.encode())):  # a torn last line is cut on resume
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())
        for record in lines:
            self.summary.failed += record.get("error") is not None
            self.summary.captioned += record.get("error") is None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:  # the write that failed is reported; a torn line is cut on resume
            pass

    def __enter__(self) -> LineWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pending(paths: Sequence[Path], out: Path,
            made: dict[str, Any] | None = None) -> tuple[list[Path], CaptionSummary]:
    """The images of ``paths`` that ``out`` lacks, and a summary counting the others; a new
    ``out`` gets its ``made`` line (see :func:`check_made_with`)."""
    first = check_made_with(out, made)
    done = read_done(out)
    if first:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write(records.dumps({MADE_WITH: made}) + "\n")
    summary = CaptionSummary(out=out, skipped=sum(str(p) in done for p in paths))
    seen: set[str] = set()
    todo = []
    for p in paths:
        if str(p) not in done and str(p) not in seen:
            seen.add(str(p))
            todo.append(p)
    return todo, summary


def caption_to_file(
    captioner: Any, paths: Sequence[Path], out: Path, batch_size: int, decoding: Any,
    models: Sequence[str | os.PathLike], progress: bool | None = None,
) -> CaptionSummary:
    """Caption ``paths`` into ``out`` in this process with ``decoding``, skipping the images
    already there (``models``: the run folders, recorded in the file's first line);
    ``progress``: a bar on a terminal (False: none)."""
    from captioner.progress import progress as progress_bar

    todo, summary = pending(paths, out, made_with(models, decoding))
    with LineWriter(out, summary) as writer, progress_bar(
        total=len(todo), desc=f"caption {out.name}", unit="img", enabled=progress
    ) as bar:
        for lo in range(0, len(todo), batch_size):
            chunk = todo[lo : lo + batch_size]
            results = captioner.caption(chunk, decoding, batch_size=batch_size)
            writer.write(caption_record(str(p), r.captions, r.error)
                         for p, r in zip(chunk, results, strict=True))
            bar.update(len(chunk))
    return summary
