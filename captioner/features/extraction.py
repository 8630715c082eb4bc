"""Stage 2: the extraction loop and the one image→features pipeline.

:func:`encoded_batches` decodes images (in threads, a bounded window ahead), runs an encoder on
fixed-size batches and reports unreadable images instead of stopping; :func:`extract` uses it
to fill the HDF5 cache of :mod:`captioner.features.cache` (resumable, crash-safe), and
:class:`captioner.inference.captioner.Captioner` uses it to caption and evaluate image files.

Keras is imported inside functions only.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from captioner import __version__
from captioner.encoders.images import DEFAULT_MAX_PIXELS, load_image
from captioner.errors import CaptionerError, ImageError, OptionError
from captioner.features.cache_writer import FeatureWriter
from captioner.features.extract_plan import ExtractSummary, Item, finish_extract, plan_extract
from captioner.progress import progress as progress_bar

PREFETCH_BATCHES = 2  # decoded batches kept ready while the model runs


# --------------------------------------------------------------------------- extraction


def _feature_shape(model) -> tuple[int, ...]:
    shape = tuple(model.output.shape[1:])
    if not all(isinstance(d, int) for d in shape):
        raise CaptionerError(
            f"model {model.name} has an output of unknown shape {shape}; give it a fixed input size."
        )
    return shape


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
    mirror: bool = False,
) -> ExtractSummary:
    """Run ``model`` over the images at ``paths`` into the cache ``out``; resumable.

    ``model`` maps RGB batches (B, H, W, 3) in [0, 255] to features (a Keras model, or a
    zero-argument callable building one: it is then only built if there is work to do).
    ``identity``: attributes naming the encoder (encoder, layer, weights, preprocessing, ...);
    an existing ``out`` made with other values is refused with :class:`CacheMismatchError`.
    ``input_size`` is (height, width). ``names`` default to the file names of ``paths``.
    Images already done are skipped, failed ones are retried only with ``retry_failed``.
    Bad images are recorded as failed and never stop the run; ``strict`` raises
    :class:`ImageError` at the end if any requested image has no features. ``mirror``
    encodes the photos flipped left-right (recorded as the cache's ``mirrored`` attribute).
    """
    start = time.perf_counter()
    plan = plan_extract(
        paths, out, identity=identity, input_size=input_size, names=names, batch_size=batch_size,
        dtype=dtype, resample=resample, retry_failed=retry_failed, mirror=mirror,
    )  # fmt: skip
    if plan.todo:
        model = model if hasattr(model, "predict_on_batch") else model()
        plan.ensure_file(_feature_shape(model), _environment())
        load = partial(load_image, size=plan.input_size, resample=resample,
                       max_pixels=max_pixels, mirror=mirror)
        with FeatureWriter(plan.out) as writer:
            _run(plan.todo, writer, model, load, batch_size, workers, dtype, plan.summary, progress)
    return finish_extract(plan, start, strict)


def _run(
    todo: list[Item],
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
            with np.errstate(over="ignore"):  # float16 overflow -> inf -> refused by commit
                rows = np.empty((0,), dtype) if feats is None else feats.astype(dtype)
            refused = writer.commit(
                [it.row for it in done], rows, {it.row: r for it, r in failed.items()}
            )
            failed |= {it: refused[it.row] for it in done if it.row in refused}
            summary.done += len(done) - len(refused)
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
    """(cache identity, zero-argument model builder, input size) of a named encoder. The
    builder is a ``partial`` of a module-level function: it can be sent to Ray actors."""
    from captioner.encoders.specs import get_spec

    spec = get_spec(encoder)
    layer = layer or spec.default_layer
    spec.layer(layer)  # an unknown layer fails here, before any work
    if mixed_precision not in (None, *MIXED_PRECISION):
        raise OptionError(
            "mixed_precision", f"must be one of {', '.join(MIXED_PRECISION)}, not {mixed_precision!r}."
        )
    policy = f"mixed_{mixed_precision}" if mixed_precision else "float32"
    identity = {
        "encoder": spec.name,
        "layer": layer,
        "weights": spec.weights_identity(weights, layer),
        "preprocessing": spec.preprocessing,
        "compute_dtype": policy,
    }
    return identity, partial(build_feature_model, spec, layer, weights, policy), spec.input_size


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
    """:func:`extract` with a named encoder (see ``captioner.encoders.specs.SPECS``).

    The model (``spec.feature_model(layer, weights)``, preprocessing included) is only built
    when some image still needs features. ``mixed_precision`` ("float16" or "bfloat16") builds
    it under the ``mixed_*`` dtype policy (for GPUs); features are still stored as ``dtype``.
    Other keyword arguments go to :func:`extract`.
    """
    identity, build, input_size = encoder_setup(encoder, layer, weights, mixed_precision)
    return extract(paths, out, model=build, identity=identity, input_size=input_size, **kwargs)
