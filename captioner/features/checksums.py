"""Row checksums of the feature cache: what a row must satisfy to be read, and whole-file checks.

Each *done* row of a cache (format 2) carries a checksum written in the same commit as its
features, before the status byte that vouches for both: CRC-32 of the image name's UTF-8
bytes followed by the row's bytes as stored, kept as ``2**32 + crc`` in a ``uint64`` dataset.
Two other values are reserved: ``0`` (never written: a done row holding it is damaged) and
:data:`UNVERIFIED` (a row copied from a format-1 cache, which had no checksums).

A row is readable when its status byte is valid, its values are finite and its checksum
matches (or it is unverified). Caches of format 1 load unchanged; their rows are finite-checked
only and counted as *unverified* by ``captioner extract --verify``.

:class:`VerifiedReads` gives :class:`captioner.features.cache.FeatureReader` its checked reads; only
numpy, h5py datasets it is handed, and zlib here.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captioner.errors import CaptionerError

PENDING, DONE, FAILED = 0, 1, 2  # the status byte of a row
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}
VERIFY_ROWS = 1024  # rows per block when checking a whole file

NO_CHECKSUM = 0
PRESENT = 1 << 32
UNVERIFIED = 1 << 33
NOT_FINITE = "features are not finite (NaN or inf)"
MISMATCH = "checksum mismatch (the stored features were altered after they were written)"
UNWRITTEN = "no checksum (the write of this row was cut short)"
BAD_STATUS = "status byte damaged"
UNREADABLE = "unreadable row (HDF5 error: {})"
SHOWN = 5  # damaged names listed in a summary line


def row_checksum(name: str, row: np.ndarray) -> int:
    """The stored checksum of one row: ``2**32 + crc32(name + row bytes)``."""
    crc = zlib.crc32(name.encode("utf-8"))
    return PRESENT + zlib.crc32(np.ascontiguousarray(row).tobytes(), crc)


def checksums(names: Sequence[str], rows: np.ndarray) -> np.ndarray:
    """:func:`row_checksum` of each (name, row) as a ``uint64`` array."""
    return np.array([row_checksum(n, r) for n, r in zip(names, rows, strict=True)], np.uint64)


def finite_rows(rows: np.ndarray) -> np.ndarray:
    """Boolean per row of ``rows`` (N, ...): every value finite."""
    return np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)


def row_problems(
    names: Sequence[str], rows: np.ndarray, stored: np.ndarray | None
) -> list[str | None]:
    """Per row: None when it may be read, else why not. ``stored``: the rows' checksums, or
    None for a cache without them (format 1: finite check only)."""
    finite = finite_rows(rows)
    problems: list[str | None] = []
    for i, name in enumerate(names):
        if not finite[i]:
            problems.append(NOT_FINITE)
            continue
        value = None if stored is None else int(stored[i])
        if value is None or value == UNVERIFIED:
            problems.append(None)
        elif value == NO_CHECKSUM:
            problems.append(UNWRITTEN)
        elif value != row_checksum(name, rows[i]):
            problems.append(MISMATCH)
        else:
            problems.append(None)
    return problems


@dataclass
class VerifyReport:
    """What ``captioner extract --verify`` found in one cache."""

    path: Path
    rows: int = 0
    done: int = 0
    pending: int = 0
    failed: int = 0
    verified: int = 0  # done rows whose checksum matched
    unverified: int = 0  # done rows without a checksum (format 1 or copied from one)
    damaged: dict[str, str] = field(default_factory=dict)  # name -> why

    @property
    def ok(self) -> bool:
        return not self.damaged

    def line(self) -> str:
        """The one-line summary."""
        text = (
            f"{self.path}: {self.rows} rows, {self.done} done ({self.verified} verified"
            f"{f', {self.unverified} unverified: written before checksums' if self.unverified else ''}"
            f"), {self.failed} failed, {self.pending} pending, {len(self.damaged)} damaged"
        )
        if not self.damaged:
            return text + " - OK"
        shown = ", ".join(list(self.damaged)[:SHOWN]) + (
            ", ..." if len(self.damaged) > SHOWN else ""
        )
        return (
            f"{text} ({shown}); rerun the `captioner extract` command that made it to "
            "re-extract exactly the damaged rows"
        )


def gather(dataset: Any, unique: np.ndarray) -> np.ndarray:
    """Rows ``unique`` (sorted, distinct) of ``dataset``: one slice when dense, else fancy."""
    lo, hi = int(unique[0]), int(unique[-1]) + 1
    if hi - lo <= 4 * len(unique):  # dense request: one contiguous read is faster
        return dataset[lo:hi][unique - lo]
    return dataset[unique]


class VerifiedReads:
    """Checked reads for the cache reader, which provides ``path``, ``names``, ``_index``,
    ``_status``, ``_features``, ``_checksums`` (None for format 1), ``feature_shape``,
    ``dtype``, ``_row(name)`` (raising for a name without features), ``status_of``,
    ``failed`` and ``counts``."""

    @property
    def checksummed(self) -> bool:
        """True when rows carry checksums (format 2); format-1 rows are read unverified."""
        return self._checksums is not None

    def read_valid(self, names: Sequence[str]) -> tuple[list[str], np.ndarray, dict[str, str]]:
        """(readable names, their verified features, ``{name: why not}`` for the others): a
        missing or damaged row never costs the rest."""
        bad: dict[str, str] = {}
        wanted = []
        for name in names:
            try:
                wanted.append((name, self._row(name)))
            except CaptionerError:
                bad[name] = self._why_missing(name)
        rows = np.array([r for _, r in wanted], dtype=np.int64)
        block, problems = self._checked([n for n, _ in wanted], rows)
        keep = [k for k, p in enumerate(problems) if p is None]
        bad |= {
            wanted[k][0]: f"damaged row in {self.path}: {p}" for k, p in enumerate(problems) if p
        }
        return [wanted[k][0] for k in keep], block[keep], bad

    def _why_missing(self, name: str) -> str:
        status = self.status_of(name)
        if status == "absent":
            return f"not in the feature cache {self.path}"
        if status == "failed":
            return f"features failed in {self.path}: {self.failed.get(name, '')}"
        return f"features {status} in {self.path}"

    def _checked(self, names: list[str], rows: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        """Features of ``rows`` and, per row, why it may not be used (None when it may)."""
        if not len(rows):
            return np.empty((0, *self.feature_shape), self.dtype), []
        unique, inverse = np.unique(rows, return_inverse=True)
        inverse = inverse.reshape(-1)
        try:
            block = gather(self._features, unique)
            stored = None if self._checksums is None else gather(self._checksums, unique)
        except Exception:  # a damaged chunk: find the rows it holds, one at a time
            return self._checked_one_by_one(names, rows)
        problems = row_problems([self.names[int(i)] for i in unique], block, stored)
        return block[inverse], [problems[k] for k in inverse]

    def _checked_one_by_one(
        self, names: list[str], rows: np.ndarray
    ) -> tuple[np.ndarray, list[str | None]]:
        block = np.zeros((len(rows), *self.feature_shape), self.dtype)
        problems: list[str | None] = []
        for k, row in enumerate(rows.tolist()):
            try:
                block[k] = self._features[row]
                stored = None if self._checksums is None else self._checksums[row : row + 1]
            except Exception as exc:
                problems.append(UNREADABLE.format(" ".join(str(exc).split())[:80]))
                continue
            problems.append(row_problems([names[k]], block[k : k + 1], stored)[0])
        return block, problems

    def damaged(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """Done rows among ``names`` (default: all) that fail their checks, with why."""
        done = [n for n in (self.names if names is None else names) if n in self]
        found: dict[str, str] = {}
        for lo in range(0, len(done), VERIFY_ROWS):
            part = done[lo : lo + VERIFY_ROWS]
            rows = np.array([self._index[n] for n in part], dtype=np.int64)
            _, problems = self._checked(part, rows)
            found |= {n: p for n, p in zip(part, problems, strict=True) if p}
        return found

    def verify(self) -> VerifyReport:
        """Check every row of the file."""
        report = VerifyReport(self.path, rows=len(self.names))
        counts = self.counts()
        report.done, report.pending, report.failed = (
            counts["done"],
            counts["pending"],
            counts["failed"],
        )
        bad_status = np.flatnonzero(~np.isin(self._status, list(STATUS_NAMES)))
        report.damaged |= {self.names[int(i)]: BAD_STATUS for i in bad_status}
        report.damaged |= self.damaged()
        ok = self._status == DONE
        ok[[self._index[n] for n in report.damaged]] = False
        unverified = ok
        if self._checksums is not None:
            try:
                unverified = ok & (np.asarray(self._checksums[()]) == UNVERIFIED)
            except Exception:  # a damaged checksum chunk: its rows are already in `damaged`
                unverified = np.zeros_like(ok)
        report.unverified = int(unverified.sum())
        report.verified = int(ok.sum()) - report.unverified
        return report
