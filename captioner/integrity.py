"""Row checksums of the feature cache: what a row must satisfy to be read, and whole-file checks.

Each *done* row of a cache (format 2) carries a checksum written in the same commit as its
features, before the status byte that vouches for both: CRC-32 of the image name's UTF-8
bytes followed by the row's bytes as stored, kept as ``2**32 + crc`` in a ``uint64`` dataset.
Two other values are reserved: ``0`` (never written: a done row holding it is damaged) and
:data:`UNVERIFIED` (a row copied from a format-1 cache, which had no checksums).

A row is readable when its status byte is valid, its values are finite and its checksum
matches (or it is unverified). Caches of format 1 load unchanged; their rows are finite-checked
only and counted as *unverified* by ``captioner extract --verify``.

Only numpy and zlib here; the cache module (:mod:`captioner.features`) calls these.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
