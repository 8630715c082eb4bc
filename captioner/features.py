"""Stage 2: the resumable HDF5 feature cache and the extraction loop that fills it.

One file holds the features of one (encoder, layer, weights, preprocessing, input size,
resampling) combination for a list of images. Layout::

    features  (N, *feature_shape)  float32 or float16, chunked, uncompressed
    names     (N,)  fixed-length UTF-8 bytes, the image names (e.g. "1000268201_693b08cb0b.jpg")
    status    (N,)  uint8: 0 pending, 1 done, 2 failed
    errors    (N,)  fixed-length UTF-8 bytes: why an image failed ("truncated image", ...)
    attrs     encoder, layer, weights, input_size, preprocessing, resample, feature_shape,
              dtype, compute_dtype, backend, library versions, format_version

Crash safety: HDF5 files are corrupted when a process dies while HDF5 *metadata* is dirty.
So every piece of metadata is written once, when the file is created: all datasets are
allocated at full size (``H5D_ALLOC_TIME_EARLY``, fixed-length strings, no filters), the file
is built under a temporary name and ``os.replace``-d into place. Extraction then only
overwrites raw data in place: a batch's feature rows, flush + fsync, then their status bytes,
flush. A process killed at any instant (SIGKILL, OOM, Ctrl-C) leaves a file that opens and
whose ``status`` marks exactly the batches that were written; rerunning the same command
resumes. ``status`` is written only after the rows it vouches for reached the disk, so a
power cut cannot mark unwritten rows done either.

When a run asks for images the file does not hold, a new file holding the **union** (the old
names first, in their old rows, then the new ones) is built beside it, the old rows are copied
over, and it replaces the old file; so ``extract train.txt`` then ``extract test.txt`` into the
same ``--out`` gives one cache holding both splits.

Keras is imported inside functions only.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from captioner import __version__
from captioner.errors import CacheMismatchError, CaptionerError, ImageError
from captioner.images import DEFAULT_MAX_PIXELS, load_image
from captioner.integrity import (
    BAD_STATUS,
    NO_CHECKSUM,
    NOT_FINITE,
    UNREADABLE,
    UNVERIFIED,
    VerifyReport,
    checksums,
    finite_rows,
    row_problems,
)
from captioner.progress import progress as progress_bar
from captioner.tempfiles import remove_stale, temp_path

FORMAT_VERSION = 2  # 2: per-row checksums (captioner.integrity); 1 still loads, unverified
PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}
ERROR_BYTES = 200  # failure reasons are cut (on a UTF-8 boundary) to this many bytes
CHUNK_BYTES = 1 << 16  # target size of one features chunk
STATUS_CHUNK = 4096
TEXT_CHUNK = 512
COPY_ROWS = 1024  # rows per block when copying a cache into a bigger one
PREFETCH_BATCHES = 2  # decoded batches kept ready while the model runs
DTYPES = ("float32", "float16")
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
    if "truncated file" in text:
        size = path.stat().st_size if path.exists() else 0
        return (
            f"{path} is not a readable HDF5 file: truncated ({size} bytes; an interrupted copy "
            "or a full disk cut it short); "
            "delete it and rerun `captioner extract` to rebuild it"
        )
    if "signature not found" in text:
        return (
            f"{path} is not a readable HDF5 file: it does not start like one; pass a feature cache "
            "written by `captioner extract`"
        )
    return (
        f"{path} is not a readable HDF5 file ({text[:160]}); delete it and rerun "
        "`captioner extract` to rebuild it"
    )


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


def _differences(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """One "key: file has X, expected Y" line per key of ``wanted`` that ``found`` differs on."""
    lines = []
    for key, value in wanted.items():
        have = _plain(found[key]) if key in found else "(absent)"
        if have != _plain(value):
            lines.append(f"{key}: file has {have!r}, expected {_plain(value)!r}")
    return lines


def _mismatch(path: Path, lines: list[str]) -> CacheMismatchError:
    return CacheMismatchError(
        f"{path} was made with other settings ({'; '.join(lines)}). Use another --out file, "
        "or delete this one to re-extract."
    )


def _runs(indices: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """Split increasing row ``indices`` into contiguous runs: (start, stop, offset in list)."""
    start = 0
    for k in range(1, len(indices) + 1):
        if k == len(indices) or indices[k] != indices[k - 1] + 1:
            yield indices[start], indices[k - 1] + 1, start
            start = k


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- reader


class FeatureReader:
    """Read a feature cache. ``expect``: attributes the caller requires (else CacheMismatchError).

    ``names`` lists every image in the file (in row order); only *done* rows are readable:
    ``name in reader`` is True exactly when ``reader[name]`` works. The status is read once,
    when the file is opened.
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
        f = self._file
        missing = [k for k in ("features", "names", "status", "errors") if k not in f]
        if missing or "format_version" not in f.attrs:
            raise CaptionerError(
                f"{self.path} is not a captioner feature cache (missing {missing or 'attributes'})."
            )
        self.attrs: dict[str, Any] = {k: _plain(v) for k, v in f.attrs.items()}
        if self.attrs["format_version"] > FORMAT_VERSION:
            raise CaptionerError(
                f"{self.path} has format version {self.attrs['format_version']}; this captioner "
                f"reads up to {FORMAT_VERSION}. Upgrade captioner or re-extract."
            )
        if expect and (lines := _differences(self.attrs, expect)):
            raise _mismatch(self.path, lines)
        self.names: list[str] = [n.decode("utf-8") for n in f["names"][()]]
        self._index = {n: i for i, n in enumerate(self.names)}
        self._status = np.asarray(f["status"][()])
        self._features = f["features"]
        self._checksums = f["checksums"] if "checksums" in f else None
        if len(self.names) != len(self._status) or len(self._status) != len(self._features):
            raise CaptionerError(
                f"{self.path} is damaged (its datasets differ in length); delete it and rerun "
                "`captioner extract` to rebuild it"
            )

    @property
    def checksummed(self) -> bool:
        """True when rows carry checksums (format 2); format-1 rows are read unverified."""
        return self._checksums is not None

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
        :class:`DamagedFeaturesError` (naming the image and this file) for a damaged row."""
        rows = np.fromiter((self._row(n) for n in names), dtype=np.int64, count=len(names))
        block, problems = self._checked(list(names), rows)
        for name, problem in zip(names, problems, strict=True):
            if problem:
                raise DamagedFeaturesError(
                    f"image {name!r} in {self.path}: {problem}; rerun `captioner extract` over "
                    "this cache to re-extract it"
                )
        return block

    def read_valid(self, names: Sequence[str]) -> tuple[list[str], np.ndarray, dict[str, str]]:
        """(readable names, their verified features, ``{name: why not}`` for the others):
        a missing or damaged row never costs the rest."""
        bad: dict[str, str] = {}
        wanted = []
        for name in names:
            try:
                wanted.append((name, self._row(name)))
            except MissingFeaturesError:
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
            block = _gather(self._features, unique)
            stored = None if self._checksums is None else _gather(self._checksums, unique)
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
        for lo in range(0, len(done), COPY_ROWS):
            part = done[lo : lo + COPY_ROWS]
            rows = np.array([self._index[n] for n in part], dtype=np.int64)
            _, problems = self._checked(part, rows)
            found |= {n: p for n, p in zip(part, problems, strict=True) if p}
        return found

    def verify(self) -> VerifyReport:
        """Check every row of the file (see :mod:`captioner.integrity`)."""
        report = VerifyReport(self.path, rows=len(self))
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
            except Exception:  # damaged checksum chunk: its rows are already in `damaged`
                unverified = np.zeros_like(ok)
        report.unverified = int(unverified.sum())
        report.verified = int(ok.sum()) - report.unverified
        return report

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
                f"{STATUS_NAMES[int(self._status[i])]}{why}); rerun `captioner extract`"
                f"{' --retry-failed' if self._status[i] == FAILED else ''} to fill it."
            )
        return i

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FeatureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gather(dataset: h5py.Dataset, unique: np.ndarray) -> np.ndarray:
    """Rows ``unique`` (sorted, distinct) of ``dataset``: one slice when dense, else fancy."""
    lo, hi = int(unique[0]), int(unique[-1]) + 1
    if hi - lo <= 4 * len(unique):  # dense request: one contiguous read is faster
        return dataset[lo:hi][unique - lo]
    return dataset[unique]


def open_features(path: str | os.PathLike, expect: dict[str, Any] | None = None) -> FeatureReader:
    """Open a feature cache for reading, checking ``expect`` (see :class:`FeatureReader`)."""
    return FeatureReader(path, expect)


# --------------------------------------------------------------------------- writer


def _create_dataset(
    f: h5py.File, name: str, shape: tuple[int, ...], dtype, chunk_rows: int, fill: bool
) -> None:
    """A chunked, unfiltered dataset whose chunks are all allocated now (no later metadata)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((max(1, min(chunk_rows, shape[0])), *shape[1:]))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC if fill else h5py.h5d.FILL_TIME_NEVER)
    tid = h5py.h5t.py_create(dtype, logical=True)
    h5py.h5d.create(f.id, name.encode(), tid, h5py.h5s.create_simple(shape), dcpl=dcpl)


class FeatureWriter:
    """Fill an existing cache in place, writing raw data only (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r+", locking="best-effort")
        except OSError as exc:
            raise CaptionerError(
                f"cannot open {self.path} for writing ({exc}); is another `captioner extract` "
                "writing to it? Wait for it, or use another --out file."
            ) from exc
        self._features = self._file["features"]
        self._status = self._file["status"]
        self._errors = self._file["errors"]
        self._errors_dtype = self._errors.dtype
        f = self._file
        self._checksums = f["checksums"] if "checksums" in f else None  # None: format 1
        self._names = [n.decode("utf-8") for n in f["names"][()]] if self._checksums else []

    @staticmethod
    def create(
        path: str | os.PathLike,
        names: Sequence[str],
        feature_shape: tuple[int, ...],
        dtype: str,
        attrs: dict[str, Any],
        staged: bool = True,
    ) -> Path:
        """Write a new, all-pending cache at ``path``: built under a temporary name and renamed
        into place, or (``staged=False``, for a path that is itself temporary) directly."""
        path = Path(path)
        if not names:
            raise CaptionerError(f"no images to put in {path}.")
        n = len(names)
        encoded = [name.encode("utf-8") for name in names]
        name_dtype = h5py.string_dtype("utf-8", max(1, max(map(len, encoded))))
        error_dtype = h5py.string_dtype("utf-8", ERROR_BYTES)
        row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
        tmp = temp_path(path, "new") if staged else path
        try:
            with h5py.File(tmp, "w") as f:  # default libver: earliest, no consistency flags
                _create_dataset(
                    f,
                    "features",
                    (n, *feature_shape),
                    np.dtype(dtype),
                    CHUNK_BYTES // max(1, row_bytes),
                    fill=False,
                )
                _create_dataset(f, "names", (n,), name_dtype, TEXT_CHUNK, fill=True)
                _create_dataset(f, "status", (n,), np.dtype(np.uint8), STATUS_CHUNK, fill=True)
                _create_dataset(f, "errors", (n,), error_dtype, TEXT_CHUNK, fill=True)
                _create_dataset(f, "checksums", (n,), np.dtype(np.uint64), STATUS_CHUNK, fill=True)
                f["names"][:] = np.array(encoded, dtype=name_dtype)
                for key, value in {**attrs, "format_version": FORMAT_VERSION}.items():
                    f.attrs[key] = value
                f.flush()
                os.fsync(f.id.get_vfd_handle())
            if staged:
                os.replace(tmp, path)
                _fsync_dir(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def commit(
        self, rows: Sequence[int], features: np.ndarray, failed: dict[int, str]
    ) -> dict[int, str]:
        """Store ``features`` in ``rows`` with their checksums and the ``failed`` reasons, then
        mark them all. Rows whose features are not finite (in the stored dtype) are recorded
        as failed instead; they are returned as ``{row: reason}``.

        Order: data (features, checksums, reasons) → flush → fsync → status → flush.
        ``rows`` increase.
        """
        rows = list(rows)
        with np.errstate(over="ignore", invalid="ignore"):
            features = np.asarray(features).astype(self._features.dtype, copy=False)
        finite = finite_rows(features) if rows else np.ones(0, bool)
        refused = {row: NON_FINITE_OUTPUT for row, ok in zip(rows, finite, strict=True) if not ok}
        failed = {**failed, **refused}
        for start, stop, k in _runs(rows):
            self._features[start:stop] = features[k : k + stop - start]
        if self._checksums is not None and rows:
            sums = checksums([self._names[r] for r in rows], features)
            sums[~finite] = NO_CHECKSUM
            for start, stop, k in _runs(rows):
                self._checksums[start:stop] = sums[k : k + stop - start]
        rows = [row for row in rows if row not in refused]
        for row, reason in failed.items():
            self._errors[row] = np.array(_fit_bytes(reason, ERROR_BYTES), dtype=self._errors_dtype)
        self._file.flush()
        self._sync()
        self._set_status(rows, DONE)
        self._set_status(sorted(failed), FAILED)
        self._file.flush()
        return refused

    def _set_status(self, rows: Sequence[int], value: int) -> None:
        for start, stop, _ in _runs(rows):
            self._status[start:stop] = value

    def _sync(self) -> None:
        try:
            os.fsync(self._file.id.get_vfd_handle())
        except (OSError, ValueError, TypeError):  # a driver without a plain descriptor
            pass

    def copy_from(self, source: FeatureReader) -> None:
        """Copy every row of ``source`` (same names in the same first rows) into this file."""
        src = source._file
        n = len(source)
        for lo in range(0, n, COPY_ROWS):
            hi = min(n, lo + COPY_ROWS)
            self._features[lo:hi] = src["features"][lo:hi]
            self._errors[lo:hi] = src["errors"][lo:hi]
            if self._checksums is None:
                continue
            if "checksums" in src:
                self._checksums[lo:hi] = src["checksums"][lo:hi]
            else:  # format 1 had none: done rows stay unverified, never blessed
                done = src["status"][lo:hi] == DONE
                self._checksums[lo:hi] = np.where(done, UNVERIFIED, NO_CHECKSUM).astype(np.uint64)
        self._file.flush()
        self._sync()
        self._status[:n] = src["status"][:n]
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- extraction


@dataclass
class ExtractSummary:
    """What one :func:`extract` run did."""

    out: Path
    requested: int
    done: int = 0  # extracted by this run
    skipped: int = 0  # already done before this run
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason, after this run
    previously_failed: int = 0  # failed earlier and not retried (see --retry-failed)
    repaired: int = 0  # damaged rows found and re-extracted by this run
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """One-line human summary."""
        text = (
            f"extracted {self.done}, skipped {self.skipped} (already in the cache), "
            f"failed {len(self.failed)}"
        )
        if self.previously_failed:
            text += f" ({self.previously_failed} in an earlier run; --retry-failed retries them)"
        if self.repaired:
            text += f", re-extracted {self.repaired} damaged"
        return text + f" in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s) -> {self.out}"


@dataclass(frozen=True)
class _Item:
    row: int
    name: str
    path: Path


def _feature_shape(model) -> tuple[int, ...]:
    shape = tuple(model.output.shape[1:])
    if not all(isinstance(d, int) for d in shape):
        raise CaptionerError(
            f"model {model.name} has an output of unknown shape {shape}; give it a fixed input size."
        )
    return shape


def _check_names(names: Sequence[str]) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise CaptionerError(
                f"image name {name!r} appears twice (items {seen[name] + 1} and {i + 1}); "
                "names identify rows of the cache, so they must be unique."
            )
        seen[name] = i


def _prepare(
    out: Path, names: list[str], compare: dict[str, Any]
) -> tuple[dict[str, int], np.ndarray, dict[str, str], tuple[int, ...], dict[str, str]] | None:
    """Check an existing cache and grow it to hold ``names``; None when there is no file yet.

    Returns (row of each file name, status, failure reasons, feature shape, damaged rows among
    ``names`` with why). Damaged rows and rows with a damaged status byte come back *pending*,
    so the run re-extracts exactly them.
    """
    if not out.exists():
        return None
    with FeatureReader(out) as reader:
        if lines := _differences(reader.attrs, compare):
            raise _mismatch(out, lines)
        damaged = reader.damaged([n for n in names if n in reader])
        status = reader._status.copy()
        status[~np.isin(status, list(STATUS_NAMES))] = PENDING
        status[[reader._index[n] for n in damaged]] = PENDING
        new = [n for n in names if n not in reader._index]
        all_names = reader.names + new
        status = np.concatenate([status, np.zeros(len(new), np.uint8)])
        failed = reader.failed
        shape = reader.feature_shape
        if new:
            tmp = temp_path(out, "union")
            try:
                FeatureWriter.create(
                    tmp, all_names, shape, str(reader.dtype), dict(reader._file.attrs), staged=False
                )
                with FeatureWriter(tmp) as writer:
                    writer.copy_from(reader)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    if new:
        os.replace(tmp, out)
        _fsync_dir(out)
    return {n: i for i, n in enumerate(all_names)}, status, failed, shape, damaged


def _safe_load(
    load: Callable[[Path], np.ndarray], path: Path
) -> tuple[np.ndarray | None, str | None]:
    """(image, None) or (None, reason): no single image may abort a run."""
    try:
        return load(path), None
    except ImageError as exc:
        return None, getattr(exc, "reason", str(exc))
    except Exception as exc:  # a decoder bug or MemoryError on one file
        return None, f"unexpected error ({type(exc).__name__}: {exc})"


def _decoded(
    items: Sequence[_Item], load: Callable[[Path], np.ndarray], workers: int, window: int
) -> Iterator[tuple[_Item, np.ndarray | None, str | None]]:
    """Decode ``items`` in order with ``workers`` threads, at most ``window`` images ahead."""
    if workers <= 0:
        for item in items:
            yield (item, *_safe_load(load, item.path))
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="captioner-decode")
    queue: deque[tuple[_Item, Future]] = deque()
    it = iter(items)
    try:
        for item in islice(it, window):
            queue.append((item, pool.submit(_safe_load, load, item.path)))
        while queue:
            item, fut = queue.popleft()
            if (nxt := next(it, None)) is not None:
                queue.append((nxt, pool.submit(_safe_load, load, nxt.path)))
            yield (item, *fut.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _batches(
    decoded: Iterator[tuple[_Item, np.ndarray | None, str | None]], batch_size: int
) -> Iterator[tuple[list[_Item], list[np.ndarray], list[tuple[_Item, str]]]]:
    """Group good images into batches of ``batch_size``; failures ride along with the next one."""
    items: list[_Item] = []
    images: list[np.ndarray] = []
    failed: list[tuple[_Item, str]] = []
    for item, image, reason in decoded:
        if image is None:
            failed.append((item, reason or "unknown error"))
        else:
            items.append(item)
            images.append(image)
        if len(items) == batch_size:
            yield items, images, failed
            items, images, failed = [], [], []
    if items or failed:
        yield items, images, failed


def extract(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    model: Any,
    identity: dict[str, Any],
    input_size: tuple[int, int],
    names: Sequence[str] | None = None,
    batch_size: int = 32,
    workers: int = 4,
    dtype: str = "float32",
    resample: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    strict: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
) -> ExtractSummary:
    """Run ``model`` over the images at ``paths`` into the cache ``out``; resumable.

    ``model`` maps RGB batches (B, H, W, 3) in [0, 255] to features (a Keras model, or a
    zero-argument callable building one: it is then only built if there is work to do).
    ``identity``: attributes naming the encoder (encoder, layer, weights, preprocessing, ...);
    an existing ``out`` made with other values is refused with :class:`CacheMismatchError`.
    ``input_size`` is (height, width). ``names`` default to the file names of ``paths``.
    Images already done are skipped, failed ones are retried only with ``retry_failed``.
    Bad images are recorded as failed and never stop the run; ``strict`` raises
    :class:`ImageError` at the end if any requested image has no features.
    """
    start = time.perf_counter()
    out = Path(out)
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths] if names is None else list(names)
    if len(names) != len(paths):
        raise ValueError("names and paths must have the same length")
    if not paths:
        raise CaptionerError("no images to extract.")
    if dtype not in DTYPES:
        raise CaptionerError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.")
    if batch_size < 1:
        raise CaptionerError(f"--batch-size must be at least 1, not {batch_size}.")
    _check_names(names)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)  # temporary files of killed runs over this cache
    settings = {
        "input_size": tuple(int(v) for v in input_size),
        "resample": resample,
        "jpeg_draft": True,
        "dtype": dtype,
    }
    compare = {**identity, **settings}
    state = _prepare(out, names, compare)
    if state is None:
        rows, status, old_failed = (
            {n: i for i, n in enumerate(names)},
            np.zeros(len(names), np.uint8),
            {},
        )
    else:
        rows, status, old_failed, _, damaged = state
    summary = ExtractSummary(out=out, requested=len(names))
    if state is not None:
        summary.repaired = len(damaged)
        for name, why in list(damaged.items())[:10]:
            print(f"damaged: {name} in {out}: {why}; re-extracting it", file=sys.stderr)
    todo: list[_Item] = []
    for name, path in zip(names, paths, strict=True):
        row = rows[name]
        if status[row] == DONE:
            summary.skipped += 1
        elif status[row] == FAILED and not retry_failed:
            summary.previously_failed += 1
            summary.failed[name] = old_failed.get(name, "")
        else:
            todo.append(_Item(row, name, path))
    todo.sort(key=lambda item: item.row)
    if todo:
        model = model if hasattr(model, "predict_on_batch") else model()
        shape = _feature_shape(model)
        if state is None:
            attrs = {**_environment(), **compare, "feature_shape": shape}  # + format_version
            FeatureWriter.create(out, names, shape, dtype, attrs)
        elif state[3] != shape:
            raise _mismatch(out, [f"feature_shape: file has {state[3]}, expected {shape}"])
        load = partial(
            load_image, size=settings["input_size"], resample=resample, max_pixels=max_pixels
        )
        with FeatureWriter(out) as writer:
            _run(todo, writer, model, load, batch_size, workers, dtype, summary, progress)
    summary.seconds = time.perf_counter() - start
    if strict and summary.failed:
        shown = "; ".join(f"{n}: {r}" for n, r in islice(summary.failed.items(), 5))
        raise ImageError(f"{len(summary.failed)} image(s) have no features in {out} ({shown}).")
    return summary


def _run(
    todo: list[_Item],
    writer: FeatureWriter,
    model: Any,
    load: Callable[[Path], np.ndarray],
    batch_size: int,
    workers: int,
    dtype: str,
    summary: ExtractSummary,
    progress: bool,
) -> None:
    """Decode (threads), run the model on fixed-size batches, commit each batch."""
    window = batch_size * (PREFETCH_BATCHES + 1)
    decoded = _decoded(todo, load, workers, window)
    bar = progress_bar(
        total=len(todo),
        desc=f"extract {writer.path.name}",
        unit="img",
        enabled=None if progress else False,
    )
    x: np.ndarray | None = None
    with bar:
        for items, images, failed in _batches(decoded, batch_size):
            feats = np.empty((0,), dtype)
            if items:
                if x is None:
                    x = np.zeros((batch_size, *images[0].shape), np.uint8)
                x[: len(images)] = np.stack(images)
                x[len(images) :] = 0  # padding keeps the batch shape fixed: no retracing
                with np.errstate(over="ignore"):  # float16 overflow -> inf -> refused in commit
                    feats = np.asarray(model.predict_on_batch(x))[: len(items)].astype(dtype)
            refused = writer.commit(
                [it.row for it in items], feats, {it.row: r for it, r in failed}
            )
            failed += [(it, refused[it.row]) for it in items if it.row in refused]
            summary.done += len(items) - len(refused)
            summary.failed.update({it.name: r for it, r in failed})
            bar.update(len(items) + len(failed))
            if summary.failed:
                bar.set_postfix(failed=len(summary.failed), refresh=False)


def _environment() -> dict[str, Any]:
    """Library versions and backend recorded in a new cache (informational, not compared)."""
    import keras
    import PIL

    return {
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "numpy_version": np.__version__,
        "h5py_version": h5py.__version__,
        "hdf5_version": h5py.version.hdf5_version,
        "pillow_version": PIL.__version__,
        "captioner_version": __version__,
        "python_version": sys.version.split()[0],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


MIXED_PRECISION = ("float16", "bfloat16")


def extract_with_spec(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    encoder: str = "vgg16",
    layer: str | None = None,
    weights: str | os.PathLike | None = "imagenet",
    *,
    mixed_precision: str | None = None,
    **kwargs: Any,
) -> ExtractSummary:
    """:func:`extract` with a named encoder (see ``captioner.encoders.SPECS``).

    The model (``spec.feature_model(layer, weights)``, preprocessing included) is only built
    when some image still needs features. ``mixed_precision`` ("float16" or "bfloat16") builds
    it under the ``mixed_*`` dtype policy (for GPUs); features are still stored as ``dtype``.
    Other keyword arguments go to :func:`extract`.
    """
    from captioner.encoders import get_spec

    spec = get_spec(encoder)
    layer = layer or spec.default_layer
    spec.layer(layer)  # an unknown layer fails here, before any work
    if mixed_precision not in (None, *MIXED_PRECISION):
        raise CaptionerError(
            f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, not {mixed_precision!r}."
        )
    policy = f"mixed_{mixed_precision}" if mixed_precision else "float32"
    identity = {
        "encoder": spec.name,
        "layer": layer,
        "weights": spec.weights_identity(weights, layer),
        "preprocessing": spec.preprocessing,
        "compute_dtype": policy,
    }

    def build() -> Any:
        import keras

        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            return spec.feature_model(layer, weights)
        finally:
            keras.config.set_dtype_policy(previous)

    return extract(paths, out, model=build, identity=identity, input_size=spec.input_size, **kwargs)
