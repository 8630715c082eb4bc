"""Stage 2: the resumable HDF5 feature cache (storage, integrity, resume); the extraction
loop that fills it is :mod:`captioner.extraction`.

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
from captioner.files import atomic_path, fsync_dir

FORMAT_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}
ERROR_BYTES = 200  # failure reasons are cut (on a UTF-8 boundary) to this many bytes
CHUNK_BYTES = 1 << 16  # target size of one features chunk
STATUS_CHUNK = 4096
TEXT_CHUNK = 512
COPY_ROWS = 1024  # rows per block when copying a cache into a bigger one
DTYPES = ("float32", "float16")


class MissingFeaturesError(CaptionerError, KeyError):
    """Features were asked for an image that has none (absent, pending or failed)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


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
    """One "key: file has X, expected Y" line per key of ``wanted`` that ``found`` differs on."""
    lines = []
    for key, value in wanted.items():
        have = _plain(found[key]) if key in found else "(absent)"
        if have != _plain(value):
            lines.append(f"{key}: file has {have!r}, expected {_plain(value)!r}")
    return lines


def mismatch(path: Path, lines: list[str]) -> CacheMismatchError:
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


def _temp_path(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.{kind}.h5.tmp")


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
        except OSError as exc:
            raise CaptionerError(f"{self.path} is not a readable HDF5 file ({exc}).") from exc
        try:
            self._load(expect)
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
        if expect and (lines := differences(self.attrs, expect)):
            raise mismatch(self.path, lines)
        self.names: list[str] = [n.decode("utf-8") for n in f["names"][()]]
        self._index = {n: i for i, n in enumerate(self.names)}
        self._status = np.asarray(f["status"][()])
        self._features = f["features"]

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
        return "absent" if i is None else STATUS_NAMES[int(self._status[i])]

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
        """Features of ``names`` as one array (len(names), *feature_shape), in the given order."""
        rows = np.fromiter((self._row(n) for n in names), dtype=np.int64, count=len(names))
        if not len(rows):
            return np.empty((0, *self.feature_shape), self.dtype)
        unique, inverse = np.unique(rows, return_inverse=True)
        lo, hi = int(unique[0]), int(unique[-1]) + 1
        if hi - lo <= 4 * len(unique):  # dense request: one contiguous read is faster
            block = self._features[lo:hi][unique - lo]
        else:
            block = self._features[unique]
        return block[inverse.reshape(-1)]

    def _row(self, name: str) -> int:
        i = self._index.get(name)
        if i is None:
            raise MissingFeaturesError(
                f"image {name!r} is not in the feature cache {self.path} ({len(self)} images); "
                "extract it first (`captioner extract ... --out` this file)."
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

    @staticmethod
    def create(
        path: str | os.PathLike,
        names: Sequence[str],
        feature_shape: tuple[int, ...],
        dtype: str,
        attrs: dict[str, Any],
    ) -> Path:
        """Write a new, all-pending cache at ``path`` (built under a temporary name)."""
        path = Path(path)
        if not names:
            raise CaptionerError(f"no images to put in {path}.")
        n = len(names)
        encoded = [name.encode("utf-8") for name in names]
        name_dtype = h5py.string_dtype("utf-8", max(1, max(map(len, encoded))))
        error_dtype = h5py.string_dtype("utf-8", ERROR_BYTES)
        row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
        feature_rows = CHUNK_BYTES // max(1, row_bytes)
        # atomic_path flushes the file and its folder entry before and after the rename
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:  # libver earliest: no flags
            _create_dataset(f, "features", (n, *feature_shape), np.dtype(dtype), feature_rows,
                            fill=False)
            _create_dataset(f, "names", (n,), name_dtype, TEXT_CHUNK, fill=True)
            _create_dataset(f, "status", (n,), np.dtype(np.uint8), STATUS_CHUNK, fill=True)
            _create_dataset(f, "errors", (n,), error_dtype, TEXT_CHUNK, fill=True)
            f["names"][:] = np.array(encoded, dtype=name_dtype)
            for key, value in attrs.items():
                f.attrs[key] = value
        return path

    def commit(self, rows: Sequence[int], features: np.ndarray, failed: dict[int, str]) -> None:
        """Store ``features`` in ``rows`` and the ``failed`` reasons, then mark them all.

        Order: data (features, reasons) → flush → fsync → status → flush. ``rows`` increase.
        """
        for start, stop, k in _runs(rows):
            self._features[start:stop] = features[k : k + stop - start]
        for row, reason in failed.items():
            self._errors[row] = np.array(_fit_bytes(reason, ERROR_BYTES), dtype=self._errors_dtype)
        self._file.flush()
        self._sync()
        self._set_status(rows, DONE)
        self._set_status(sorted(failed), FAILED)
        self._file.flush()

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


# --------------------------------------------------------------------------- resume


def prepare(
    out: Path, names: list[str], compare: dict[str, Any]
) -> tuple[dict[str, int], np.ndarray, dict[str, str], tuple[int, ...]] | None:
    """Check an existing cache against ``compare`` and grow it to hold ``names`` (a new file
    holding the union replaces it); None when there is no file yet.

    Returns (row of each file name, status, failure reasons, feature shape).
    """
    if not out.exists():
        return None
    with FeatureReader(out) as reader:
        if lines := differences(reader.attrs, compare):
            raise mismatch(out, lines)
        new = [n for n in names if n not in reader._index]
        if new:
            tmp = _temp_path(out, "union")
            try:
                FeatureWriter.create(
                    tmp,
                    reader.names + new,
                    reader.feature_shape,
                    str(reader.dtype),
                    dict(reader._file.attrs),
                )
                with FeatureWriter(tmp) as writer:
                    writer.copy_from(reader)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        all_names = reader.names + new
        status = np.concatenate([reader._status, np.zeros(len(new), np.uint8)])
        failed = reader.failed
        shape = reader.feature_shape
    if new:
        os.replace(tmp, out)
        fsync_dir(out)
    return {n: i for i, n in enumerate(all_names)}, status, failed, shape
