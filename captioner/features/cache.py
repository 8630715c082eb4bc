"""Stage 2: the resumable HDF5 feature cache (storage, integrity, resume); the extraction
loop that fills it is :mod:`captioner.features.extraction`.

One file holds the features of one (encoder, layer, weights, preprocessing, input size,
resampling) combination for a list of images. Layout::

    features  (N, *feature_shape)  float32 or float16, chunked, uncompressed
    names     (N,)  fixed-length UTF-8 bytes, the image names (e.g. "1000268201_693b08cb0e.jpg")
    status    (N,)  uint8: 0 pending, 1 done, 2 failed
    errors    (N,)  fixed-length UTF-8 bytes: why an image failed ("truncated image", ...)
    checksums (N,)  uint64: per-row checksum written with the row (format 2, see
              :mod:`captioner.features.checksums`); readers verify every row they return
    attrs     encoder, layer, weights, input_size, preprocessing, resample, feature_shape,
              dtype, compute_dtype, backend, library versions, format_version

Crash safety: HDF5 files are corrupted when a process dies while HDF5 *metadata* is dirty.
So every piece of metadata is written once, when the file is created: all datasets are
allocated at full size (``H5D_ALLOC_TIME_EARLY``, fixed-length strings, no filters), the file
is built under a temporary name and ``os.replace``-d into place. Extraction then only
overwrites raw data in place: a batch's feature rows and checksums, flush + fsync, then
their status bytes, flush. A process killed at any instant (SIGKILL, OOM, Ctrl-C) leaves a file that opens and
whose ``status`` marks exactly the batches that were written; rerunning the same command
resumes. ``status`` is written only after the rows it vouches for reached the disk, so a
power cut cannot mark unwritten rows done either.

When a run asks for images the file does not hold, a new file holding the **union** (the old
names first, in their old rows, then the new ones) is built beside it, the old rows are copied
over, and it replaces the old file; so ``extract train.txt`` then ``extract test.txt`` into the
same ``--out`` gives one cache holding both splits. No Keras here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from captioner.errors import CacheMismatchError, CaptionerError
from captioner.features.checksums import (
    BAD_STATUS,
    DONE,
    FAILED,
    NOT_FINITE,
    PENDING,
    STATUS_NAMES,
    VerifiedReads,
)

FORMAT_VERSION = 2  # 2: per-row checksums; 1 (captioner 0.1.0) still loads, unverified
__all__ = ["DONE", "FAILED", "PENDING", "STATUS_NAMES"]  # re-exported status codes
ERROR_BYTES = 200  # failure reasons are cut (on a UTF-8 boundary) to this many bytes
CHUNK_BYTES = 1 << 16  # target size of one features chunk
STATUS_CHUNK = 4096
TEXT_CHUNK = 512
COPY_ROWS = 1024  # rows per block when copying a cache into a bigger one
DTYPES = ("float32", "float16")
ABSENT_MEANS = {"mirrored": False}  # attributes older caches lack, and what that meant
NON_FINITE_OUTPUT = f"encoder output: {NOT_FINITE}"


class MissingFeaturesError(CaptionerError, KeyError):
    """Features were asked for an image that has none (absent, pending or failed)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DamagedFeaturesError(CaptionerError):
    """A stored row fails its checks (checksum, finite values, readable HDF5 chunk)."""


def _open_problem(path: Path, exc: Exception) -> str:
    """One line saying why ``path`` cannot be opened as a cache, and what to do."""
    text = " ".join(str(exc).split())
    rebuild = "delete it and rerun `captioner extract` to rebuild it"
    if "truncated file" in text:
        size = path.stat().st_size if path.exists() else 0
        return (
            f"{path} is not a readable HDF5 file: truncated ({size} bytes; an interrupted copy "
            f"or a full disk cut it short); {rebuild}"
        )
    if "signature not found" in text:
        return (
            f"{path} is not a readable HDF5 file: it does not start like one; pass a feature "
            "cache written by `captioner extract`"
        )
    return f"{path} is not a readable HDF5 file ({text[:160]}); {rebuild}"


# --------------------------------------------------------------------------- helpers


def _plain(value: Any) -> Any:
    """An HDF5 attribute value as plain Python (tuples for arrays, str for bytes)."""
    if isinstance(value, bytes | np.bytes_):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return tuple(_plain(v) for v in value.tolist())
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fit_bytes(text: str, size: int) -> bytes:
    """``text`` as UTF-8, cut to at most ``size`` bytes without splitting a character."""
    return text.encode("utf-8")[:size].decode("utf-8", "ignore").encode("utf-8")


def differences(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """One "key: file has X, expected Y" line per key of ``wanted`` that ``found`` differs on
    (a key of :data:`ABSENT_MEANS` missing from an older file has its value there)."""
    lines = []
    for key, value in wanted.items():
        have = _plain(found[key]) if key in found else ABSENT_MEANS.get(key, "(absent)")
        if have != _plain(value):
            lines.append(f"{key}: file has {have!r}, expected {_plain(value)!r}")
    return lines


def mismatch(path: Path, lines: list[str]) -> CacheMismatchError:
    return CacheMismatchError(
        f"{path} was made with other settings ({'; '.join(lines)}). Write another file, "
        "or delete this one to re-extract."
    )


def _runs(indices: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """Split increasing row ``indices`` into contiguous runs: (start, stop, offset in list)."""
    start = 0
    for k in range(1, len(indices) + 1):
        if k == len(indices) or indices[k] != indices[k - 1] + 1:
            yield indices[start], indices[k - 1] + 1, start
            start = k


# --------------------------------------------------------------------------- reader


class FeatureReader(VerifiedReads):
    """Read a feature cache. ``expect``: attributes the caller requires (else CacheMismatchError).

    ``names`` lists every image in the file (in row order); only *done* rows are readable:
    ``name in reader`` is True exactly when ``reader[name]`` works. The status is read once,
    when the file is opened. Every row returned is verified (:mod:`captioner.features.checksums`).
    """

    def __init__(self, path: str | os.PathLike, expect: dict[str, Any] | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise CaptionerError(
                f"feature cache {self.path} does not exist; run `captioner extract`."
            )
        try:  # no lock: the metadata never changes after creation, so reading is always safe
            self._file = h5py.File(self.path, "r", locking=False)
        except Exception as exc:
            raise CaptionerError(_open_problem(self.path, exc)) from None
        try:
            self._load(expect)
        except CaptionerError:
            self._file.close()
            raise
        except Exception as exc:  # damaged HDF5 metadata: h5py raises many kinds
            self._file.close()
            raise CaptionerError(
                f"{self.path} is damaged ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
                "; delete it and rerun `captioner extract` to rebuild it"
            ) from None
        except BaseException:
            self._file.close()
            raise

    def _load(self, expect: dict[str, Any] | None) -> None:
        from captioner.formats.run_checks import check_h5_objects

        f = self._file
        missing = [k for k in ("features", "names", "status", "errors") if k not in f]
        if missing or "format_version" not in f.attrs:
            raise CaptionerError(
                f"{self.path} is not a captioner feature cache (missing {missing or 'attributes'})."
            )
        check_h5_objects(self.path, f, float_only=False)  # no reads from other files
        self.attrs: dict[str, Any] = {k: _plain(v) for k, v in f.attrs.items()}
        if self.attrs["format_version"] > FORMAT_VERSION:
            raise CaptionerError(
                f"{self.path} has format version {self.attrs['format_version']}; this captioner "
                f"reads up to {FORMAT_VERSION}. Upgrade captioner or re-extract."
            )
        if expect and (lines := differences(self.attrs, expect)):
            raise mismatch(self.path, lines)
        self.names: list[str] = [n.decode("utf-8") for n in f["names"][()]]
        self._index = {n: i for i, n in enumerate(self.names)}
        self._status = np.asarray(f["status"][()])
        self._features = f["features"]
        self._checksums = f["checksums"] if "checksums" in f else None
        if not len(self.names) == len(self._status) == len(self._features):
            raise CaptionerError(
                f"{self.path} is damaged (its datasets differ in length); delete it and rerun "
                "`captioner extract` to rebuild it"
            )

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one image's features, e.g. (4096,) or (7, 7, 1280)."""
        return tuple(self._features.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self._features.dtype

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        i = self._index.get(name)  # type: ignore[arg-type]
        return i is not None and self._status[i] == DONE

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read([name])[0]

    def status_of(self, name: str) -> str:
        """ "done", "pending", "failed" or "absent"."""
        i = self._index.get(name)
        return "absent" if i is None else STATUS_NAMES.get(int(self._status[i]), "damaged")

    @property
    def done_names(self) -> list[str]:
        return [n for n, s in zip(self.names, self._status, strict=True) if s == DONE]

    @property
    def failed(self) -> dict[str, str]:
        """Failed images and why."""
        rows = np.flatnonzero(self._status == FAILED)
        if not len(rows):
            return {}
        reasons = self._file["errors"][rows]
        return {
            self.names[i]: r.decode("utf-8", "replace") for i, r in zip(rows, reasons, strict=True)
        }

    def counts(self) -> dict[str, int]:
        """How many rows are done, pending and failed."""
        return {STATUS_NAMES[s]: int(np.sum(self._status == s)) for s in STATUS_NAMES}

    def read(self, names: Sequence[str]) -> np.ndarray:
        """Verified features of ``names`` as one array (len(names), *feature_shape), in the
        given order. :class:`MissingFeaturesError` for a name without features,
        :class:`DamagedFeaturesError` (naming the image and this file) for a damaged row;
        :meth:`read_valid` returns the others instead."""
        rows = np.fromiter((self._row(n) for n in names), dtype=np.int64, count=len(names))
        block, problems = self._checked(list(names), rows)
        for name, problem in zip(names, problems, strict=True):
            if problem:
                raise DamagedFeaturesError(
                    f"image {name!r} in {self.path}: {problem}; rerun `captioner extract` over "
                    "this cache to re-extract it"
                )
        return block

    def _row(self, name: str) -> int:
        i = self._index.get(name)
        if i is None:
            raise MissingFeaturesError(
                f"image {name!r} is not in the feature cache {self.path} ({len(self)} images); "
                "extract it first (`captioner extract ... --out` this file)."
            )
        if self._status[i] not in STATUS_NAMES:
            raise MissingFeaturesError(
                f"image {name!r} in {self.path}: {BAD_STATUS}; rerun `captioner extract` to "
                "re-extract it"
            )
        if self._status[i] != DONE:
            why = (
                f": {self._file['errors'][i].decode('utf-8', 'replace')}"
                if self._status[i] == FAILED
                else ""
            )
            raise MissingFeaturesError(
                f"image {name!r} has no features in {self.path} (status "
                f"{STATUS_NAMES[int(self._status[i])]}{why}); rerun `captioner extract"
                f"{' --retry-failed' if self._status[i] == FAILED else ''}` to fill it."
            )
        return i

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FeatureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_features(path: str | os.PathLike, expect: dict[str, Any] | None = None) -> FeatureReader:
    """Open a feature cache for reading, checking ``expect`` (see :class:`FeatureReader`)."""
    return FeatureReader(path, expect)

