"""Stage 2: the extraction loop and the one image→features pipeline.

:func:`encoded_batches` decodes images (in threads, a bounded window ahead), runs an encoder on
fixed-size batches and reports unreadable images instead of stopping; :func:`extract` uses it
to fill the HDF5 cache of :mod:`captioner.cache` (resumable, crash-safe), and
:class:`captioner.inference.Captioner` uses it to caption and evaluate image files.

Keras is imported inside functions only.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from captioner import __version__
from captioner.cache import DONE, DTYPES, FAILED, FORMAT_VERSION, FeatureWriter, mismatch, prepare
from captioner.errors import CaptionerError, ImageError
from captioner.images import DEFAULT_MAX_PIXELS, load_image
from captioner.progress import progress as progress_bar

PREFETCH_BATCHES = 2  # decoded batches kept ready while the model runs


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


def _safe_load(
    load: Callable[[Path], np.ndarray], path: Path
) -> tuple[np.ndarray | None, str | None]:
    """(image, None) or (None, reason): no single image may abort a run."""
    try:
        return load(path), None
    except ImageError as exc:
        return None, getattr(exc, "reason", None) or str(exc)
    except Exception as exc:  # a decoder bug or MemoryError on one file
        return None, f"unexpected error ({type(exc).__name__}: {exc})"


Key = Hashable
Decoded = tuple[Key, "np.ndarray | None", "str | None"]


def _decoded(
    items: Sequence[tuple[Key, Path]], load: Callable[[Path], np.ndarray], workers: int, window: int
) -> Iterator[Decoded]:
    """(key, image or None, reason) per item, in order, decoded by ``workers`` threads at most
    ``window`` images ahead (``workers`` 0: in this thread)."""
    if workers <= 0:
        for key, path in items:
            yield (key, *_safe_load(load, path))
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="captioner-decode")
    queue: deque[tuple[Key, Future]] = deque()
    it = iter(items)
    try:
        for key, path in islice(it, window):
            queue.append((key, pool.submit(_safe_load, load, path)))
        while queue:
            key, fut = queue.popleft()
            if (nxt := next(it, None)) is not None:
                queue.append((nxt[0], pool.submit(_safe_load, load, nxt[1])))
            yield (key, *fut.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _batches(
    decoded: Iterator[Decoded], batch_size: int
) -> Iterator[tuple[list[Key], list[np.ndarray], dict[Key, str]]]:
    """Group good images into batches of ``batch_size``; failures ride along with the next one."""
    keys: list[Key] = []
    images: list[np.ndarray] = []
    failed: dict[Key, str] = {}
    for key, image, reason in decoded:
        if image is None:
            failed[key] = reason or "unknown error"
        else:
            keys.append(key)
            images.append(image)
        if len(keys) == batch_size:
            yield keys, images, failed
            keys, images, failed = [], [], {}
    if keys or failed:
        yield keys, images, failed


def encoded_batches(
    items: Sequence[tuple[Key, str | os.PathLike]],
    encode: Callable[[np.ndarray], Any],
    load: Callable[[Path], np.ndarray],
    batch_size: int,
    *,
    workers: int = 0,
    pad: bool = False,
) -> Iterator[tuple[list[Key], np.ndarray | None, dict[Key, str]]]:
    """The image→features pipeline: for ``(key, path)`` items, in order and in batches, the
    keys encoded, their features (B, *feature_shape) float32 (None when no image of the batch
    could be read) and ``{key: reason}`` for the unreadable ones.

    ``load(path)`` decodes one image to (H, W, 3) uint8; ``encode`` maps RGB batches
    (B, H, W, 3) to features (e.g. a Keras model's ``predict_on_batch``). With ``pad`` every batch is padded to ``batch_size`` rows, so a
    compiled model sees one shape only (no retracing).
    """
    window = batch_size * (PREFETCH_BATCHES + 1)
    x: np.ndarray | None = None
    for keys, images, failed in _batches(_decoded(items, load, workers, window), batch_size):
        if not keys:
            yield keys, None, failed
            continue
        if not pad:
            x = np.stack(images)
        elif x is None or x.shape[1:] != images[0].shape:
            x = np.zeros((batch_size, *images[0].shape), np.uint8)
        if pad:
            x[: len(images)] = np.stack(images)
            x[len(images) :] = 0
        feats = np.asarray(encode(x))[: len(keys)]
        yield keys, feats.astype("float32", copy=False), failed


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
    settings = {
        "format_version": FORMAT_VERSION,
        "input_size": tuple(int(v) for v in input_size),
        "resample": resample,
        "jpeg_draft": True,
        "dtype": dtype,
    }
    compare = {**identity, **settings}
    state = prepare(out, names, compare)
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
    if todo:
        model = model if hasattr(model, "predict_on_batch") else model()
        shape = _feature_shape(model)
        if state is None:
            attrs = {**_environment(), **compare, "feature_shape": shape}
            FeatureWriter.create(out, names, shape, dtype, attrs)
        elif state[3] != shape:
            raise mismatch(out, [f"feature_shape: file has {state[3]}, expected {shape}"])
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
    """Encode ``todo`` through :func:`encoded_batches` and commit each batch to the cache."""
    bar = progress_bar(
        total=len(todo),
        desc=f"extract {writer.path.name}",
        unit="img",
        enabled=None if progress else False,
    )
    items = [(item, item.path) for item in todo]
    with bar:
        for done, feats, failed in encoded_batches(
            items, model.predict_on_batch, load, batch_size, workers=workers, pad=True
        ):
            rows = np.empty((0,), dtype) if feats is None else feats.astype(dtype)
            writer.commit([it.row for it in done], rows, {it.row: r for it, r in failed.items()})
            summary.done += len(done)
            summary.failed.update({it.name: r for it, r in failed.items()})
            bar.update(len(done) + len(failed))
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
