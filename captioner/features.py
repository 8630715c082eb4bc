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
from captioner.progress import progress as progress_bar

FORMAT_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}
ERROR_BYTES = 200  # failure reasons are cut (on a UTF-8 boundary) to this many bytes
CHUNK_BYTES = 1 << 16  # target size of one features chunk
STATUS_CHUNK = 4096
TEXT_CHUNK = 512
COPY_ROWS = 1024  # rows per block when copying a cache into a bigger one
PREFETCH_BATCHES = 2  # decoded batches kept ready while the model runs
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


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.h5.tmp")


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
        if expect and (lines := _differences(self.attrs, expect)):
            raise _mismatch(self.path, lines)
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
        tmp = _temp_path(path)
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
                f["names"][:] = np.array(encoded, dtype=name_dtype)
                for key, value in attrs.items():
                    f.attrs[key] = value
                f.flush()
                os.fsync(f.id.get_vfd_handle())
            os.replace(tmp, path)
            _fsync_dir(path)
        finally:
            tmp.unlink(missing_ok=True)
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
) -> tuple[dict[str, int], np.ndarray, dict[str, str], tuple[int, ...]] | None:
    """Check an existing cache and grow it to hold ``names``; None when there is no file yet.

    Returns (row of each file name, status, failure reasons, feature shape).
    """
    if not out.exists():
        return None
    with FeatureReader(out) as reader:
        if lines := _differences(reader.attrs, compare):
            raise _mismatch(out, lines)
        new = [n for n in names if n not in reader._index]
        if new:
            tmp = out.with_name(f".{out.stem}.{os.getpid()}.union.h5.tmp")
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
        _fsync_dir(out)
    return {n: i for i, n in enumerate(all_names)}, status, failed, shape


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


@dataclass
class ExtractPlan:
    """What an extraction run must do, decided before any model is built (any engine)."""

    out: Path
    names: list[str]
    compare: dict[str, Any]  # identity + settings an existing cache must match
    todo: list[_Item]  # rows to fill, in row order
    summary: ExtractSummary
    existing_shape: tuple[int, ...] | None  # the cache's feature shape; None: no file yet

    @property
    def input_size(self) -> tuple[int, int]:
        return self.compare["input_size"]

    def ensure_file(self, shape: tuple[int, ...], environment: dict[str, Any]) -> None:
        """Create the cache for ``shape`` (first run), or check an existing one's shape."""
        if self.existing_shape is None:
            attrs = {**environment, **self.compare, "feature_shape": shape}
            FeatureWriter.create(self.out, self.names, shape, self.compare["dtype"], attrs)
            self.existing_shape = shape
        elif tuple(self.existing_shape) != tuple(shape):
            raise _mismatch(
                self.out, [f"feature_shape: file has {self.existing_shape}, expected {shape}"]
            )


def plan_extract(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    identity: dict[str, Any],
    input_size: tuple[int, int],
    names: Sequence[str] | None = None,
    batch_size: int = 32,
    dtype: str = "float32",
    resample: str = "bilinear",
    retry_failed: bool = False,
) -> ExtractPlan:
    """Validate the arguments, check and grow an existing cache, list the rows to fill."""
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
    settings = {
        "format_version": FORMAT_VERSION,
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
        rows, status, old_failed, _ = state
    summary = ExtractSummary(out=out, requested=len(names))
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
    shape = None if state is None else state[3]
    return ExtractPlan(out, names, compare, todo, summary, shape)


def finish_extract(plan: ExtractPlan, start: float, strict: bool) -> ExtractSummary:
    """Time the run; with ``strict``, raise :class:`ImageError` if any image has no features."""
    summary = plan.summary
    summary.seconds = time.perf_counter() - start
    if strict and summary.failed:
        shown = "; ".join(f"{n}: {r}" for n, r in islice(summary.failed.items(), 5))
        raise ImageError(f"{len(summary.failed)} image(s) have no features in {plan.out} ({shown}).")
    return summary


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
    plan = plan_extract(
        paths, out, identity=identity, input_size=input_size, names=names,
        batch_size=batch_size, dtype=dtype, resample=resample, retry_failed=retry_failed,
    )  # fmt: skip
    if plan.todo:
        model = model if hasattr(model, "predict_on_batch") else model()
        plan.ensure_file(_feature_shape(model), _environment())
        load = partial(load_image, size=plan.input_size, resample=resample, max_pixels=max_pixels)
        with FeatureWriter(plan.out) as writer:
            _run(plan.todo, writer, model, load, batch_size, workers, dtype, plan.summary, progress)
    return finish_extract(plan, start, strict)


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
                feats = np.asarray(model.predict_on_batch(x))[: len(items)].astype(dtype)
            writer.commit([it.row for it in items], feats, {it.row: r for it, r in failed})
            summary.done += len(items)
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


def build_feature_model(spec: Any, layer: str, weights: Any, policy: str) -> Any:
    """The feature model of an encoder spec, built under the dtype ``policy``."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        return spec.feature_model(layer, weights)
    finally:
        keras.config.set_dtype_policy(previous)


def encoder_setup(
    encoder: str, layer: str | None, weights: Any, mixed_precision: str | None
) -> tuple[dict[str, Any], Callable[[], Any], tuple[int, int]]:
    """(cache identity, zero-argument model builder, input size) of a named encoder.

    The builder is a ``functools.partial`` of a module-level function, so it can be sent to
    other processes (Ray actors) and built there.
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
    build = partial(build_feature_model, spec, layer, weights, policy)
    return identity, build, spec.input_size


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
    identity, build, input_size = encoder_setup(encoder, layer, weights, mixed_precision)
    return extract(paths, out, model=build, identity=identity, input_size=input_size, **kwargs)
