"""Stage 2: writing the feature cache of :mod:`captioner.features.cache`: creating a file (every dataset
allocated at once), committing rows with their checksums, and growing a file into the union of
its names and new ones (``prepare``, which also finds the damaged rows a run must redo).

Only raw data is written after creation (see :mod:`captioner.features.cache` for why). No Keras here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from captioner.errors import CaptionerError
from captioner.features.cache import (
    CHUNK_BYTES,
    COPY_ROWS,
    ERROR_BYTES,
    FORMAT_VERSION,
    NON_FINITE_OUTPUT,
    STATUS_CHUNK,
    TEXT_CHUNK,
    FeatureReader,
    _fit_bytes,
    _runs,
    differences,
    mismatch,
)
from captioner.features.checksums import (
    DONE,
    FAILED,
    NO_CHECKSUM,
    PENDING,
    STATUS_NAMES,
    UNVERIFIED,
    checksums,
    finite_rows,
)
from captioner.storage.faults import H5PY_ERRORS, abandon_hdf5, as_fault, check_space, writing
from captioner.storage.files import atomic_path, fsync_dir
from captioner.storage.temp_files import target_of, temp_path

# --------------------------------------------------------------------------- writer


def _create_dataset(
    f: h5py.File, name: str, shape: tuple[int, ...], dtype, chunk_rows: int, fill: bool
) -> h5py.h5d.DatasetID:
    """A chunked, unfiltered dataset whose chunks are all allocated now (no later metadata)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((max(1, min(chunk_rows, shape[0])), *shape[1:]))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC if fill else h5py.h5d.FILL_TIME_NEVER)
    tid = h5py.h5t.py_create(dtype, logical=True)
    return h5py.h5d.create(f.id, name.encode(), tid, h5py.h5s.create_simple(shape), dcpl=dcpl)


def _fill_new(
    f: h5py.File,
    n: int,
    feature_shape: tuple[int, ...],
    dtype: str,
    encoded: list[bytes],
    attrs: dict[str, Any],
) -> list[h5py.h5d.DatasetID]:
    """Every dataset and attribute of a new, all-pending cache of ``n`` rows; returns the
    datasets, which the caller keeps open until the file is flushed (see :func:`_write_new`)."""
    name_dtype = h5py.string_dtype("utf-8", max(1, max(map(len, encoded))))
    row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
    feature_rows = CHUNK_BYTES // max(1, row_bytes)
    error_dtype = h5py.string_dtype("utf-8", ERROR_BYTES)
    ids = [
        _create_dataset(f, "features", (n, *feature_shape), np.dtype(dtype), feature_rows, False),
        _create_dataset(f, "names", (n,), name_dtype, TEXT_CHUNK, fill=True),
        _create_dataset(f, "status", (n,), np.dtype(np.uint8), STATUS_CHUNK, fill=True),
        _create_dataset(f, "errors", (n,), error_dtype, TEXT_CHUNK, fill=True),
        _create_dataset(f, "checksums", (n,), np.dtype(np.uint64), STATUS_CHUNK, fill=True),
    ]
    f["names"][:] = np.array(encoded, dtype=name_dtype)
    for key, value in {**attrs, "format_version": FORMAT_VERSION}.items():
        f.attrs[key] = value
    return ids


def _write_new(path: Path, fill: Callable[[h5py.File], list]) -> None:
    """Create the HDF5 file ``path`` and ``fill`` it, in the one order that cannot crash on a
    machine fault: no chunk cache (a failed write fails at once), every object kept open
    until the file is flushed, and a file whose write failed abandoned, never closed as it
    is (:func:`captioner.storage.faults.abandon_hdf5`)."""
    f = h5py.File(path, "w", rdcc_nbytes=0)  # libver earliest: no flags
    try:
        ids = fill(f)
        f.flush()
    except BaseException:
        abandon_hdf5(f.id)
        raise
    del ids
    f.close()


DTYPE_HINT = " (`--dtype float16` halves a float32 cache)"


def new_cache_bytes(rows: int, feature_shape: Sequence[int], dtype: str) -> int:
    """About the size of a filled cache of ``rows`` rows: features, reasons, names, checksums
    and metadata."""
    row = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
    return rows * (row + ERROR_BYTES + 64) + (1 << 15)


def check_cache_space(path: Path, rows: int, feature_shape: Sequence[int], dtype: str) -> None:
    """One line before extraction when the disk of ``path`` clearly cannot take ``rows`` more
    rows: a new cache needs them all; an existing one only its unwritten chunks (holes of a
    sparse file; on a file system without holes they are allocated already)."""
    if path.exists():
        stat = path.stat()
        row = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
        need = min(rows * row, max(0, stat.st_size - getattr(stat, "st_blocks", 0) * 512))
    else:
        need = new_cache_bytes(rows, feature_shape, dtype)
    hint = DTYPE_HINT if np.dtype(dtype) == np.float32 else ""
    check_space(path, need, f"the feature cache {path} ({rows} rows to write)", hint)


class FeatureWriter:
    """Fill an existing cache in place, writing raw data only (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:  # no chunk cache: a write that fails, fails at once (and leaves nothing dirty)
            self._file = h5py.File(self.path, "r+", locking="best-effort", rdcc_nbytes=0)
        except OSError as exc:
            if fault := as_fault(exc, target_of(self.path)):
                raise fault from None
            raise CaptionerError(
                f"cannot open {self.path} for writing ({exc}); is another `captioner extract` "
                "writing to it? Wait for it, or write another file."
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

        def fill(f: h5py.File) -> list:
            return _fill_new(f, n, feature_shape, dtype, encoded, attrs)

        # atomic_path flushes the file and its folder entry before and after the rename

        size = new_cache_bytes(n, feature_shape, dtype)
        if not staged:
            with writing(target_of(path), size, DTYPE_HINT):
                _write_new(path, fill)
            return path
        with atomic_path(path, nbytes=size, hint=DTYPE_HINT) as tmp:
            _write_new(tmp, fill)
        return path

    def commit(
        self, rows: Sequence[int], features: np.ndarray, failed: dict[int, str]
    ) -> dict[int, str]:
        """Store ``features`` in ``rows`` with their checksums and the ``failed`` reasons, then
        mark them all. Rows whose features are not finite (in the stored dtype) are recorded
        as failed instead, and returned as ``{row: reason}``.

        Order: data (features, checksums, reasons) → flush → fsync → status → flush.
        ``rows`` increase.
        """
        rows = list(rows)
        with np.errstate(over="ignore", invalid="ignore"):
            features = np.asarray(features).astype(self._features.dtype, copy=False)
        finite = finite_rows(features) if rows else np.ones(0, bool)
        refused = {row: NON_FINITE_OUTPUT for row, ok in zip(rows, finite, strict=True) if not ok}
        with self._writing(features.nbytes):
            self._commit(rows, features, {**failed, **refused}, refused, finite)
        return refused

    def _commit(self, rows: list[int], features: np.ndarray, failed: dict[int, str],
                refused: dict[int, str], finite: np.ndarray) -> None:  # fmt: skip
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

    @contextmanager
    def _writing(self, nbytes: int) -> Iterator[None]:
        """A failed write abandons the file (nothing more reaches it; the rows committed
        before stay valid) and a machine fault becomes its one line."""
        try:
            yield
        except H5PY_ERRORS as exc:
            abandon_hdf5(self._file.id)
            if fault := as_fault(exc, target_of(self.path), nbytes, DTYPE_HINT):
                raise fault from exc
            raise

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
        with self._writing(source._file["features"].nbytes):
            self._copy_from(source)

    def _copy_from(self, source: FeatureReader) -> None:
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
            else:  # format 1 had none: its done rows stay unverified, never blessed
                done = src["status"][lo:hi] == DONE
                self._checksums[lo:hi] = np.where(done, UNVERIFIED, NO_CHECKSUM).astype(np.uint64)
        self._file.flush()
        self._sync()
        self._status[:n] = src["status"][:n]
        self._file.flush()

    def close(self) -> None:
        """Flush while every dataset is open, then close: a close cannot fail on a write."""
        if self._file.id.valid:
            with self._writing(0):
                self._file.flush()
            self._file.close()

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- resume


def prepare(
    out: Path, names: list[str], compare: dict[str, Any]
) -> tuple[dict[str, int], np.ndarray, dict[str, str], tuple[int, ...], dict[str, str]] | None:
    """Check an existing cache against ``compare`` and grow it to hold ``names`` (a new file
    holding the union replaces it); None when there is no file yet.

    Returns (row of each file name, status, failure reasons, feature shape, damaged rows among
    ``names`` with why). Damaged rows and rows with a damaged status byte come back *pending*,
    so the run re-extracts exactly them.
    """
    if not out.exists():
        return None
    with FeatureReader(out) as reader:
        if lines := differences(reader.attrs, compare):
            raise mismatch(out, lines)
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
        fsync_dir(out)
    return {n: i for i, n in enumerate(all_names)}, status, failed, shape, damaged
