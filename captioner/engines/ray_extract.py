"""``captioner extract --engine ray``: the feature cache filled by a Ray Data pipeline.

Ray Data reads the rows the cache still lacks, decodes them in tasks (fractional CPUs), runs
the encoder in an actor pool (one model per actor) and streams the features back; only the
driver writes, through the same crash-safe :class:`~captioner.features.cache_writer.FeatureWriter` as the
local engine, so the file, its statuses and error texts, and resuming after a crash are
identical. Nothing to do: Ray is not started.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from captioner.encoders.images import DEFAULT_MAX_PIXELS
from captioner.engines.ray_runtime import (
    DECODE_CPUS,
    actor_threads,
    check_options,
    decode_batch,
    environment_json,
    limit_backend_threads,
    ray_session,
)
from captioner.features.cache_writer import FeatureWriter
from captioner.features.extract_plan import (
    ExtractPlan,
    ExtractSummary,
    finish_extract,
    plan_extract,
)
from captioner.features.extraction import _feature_shape, encoder_setup
from captioner.progress import progress as progress_bar


class EncoderActor:
    """Ray actor: builds the feature model once, then encodes decoded batches."""

    def __init__(self, build: Callable[[], Any], batch_size: int, dtype: str):
        limit_backend_threads(actor_threads())
        self.model = build()
        self.shape = _feature_shape(self.model)
        self.batch_size = batch_size
        self.dtype = dtype
        self.env = environment_json()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.flatnonzero(batch["error"] == "")
        feats = np.zeros((len(batch["row"]), *self.shape), self.dtype)  # (N, *feature_shape)
        x = np.zeros((self.batch_size, *batch["pixels"].shape[1:]), np.uint8)
        for lo in range(0, len(ok), self.batch_size):
            take = ok[lo : lo + self.batch_size]
            x[: len(take)] = batch["pixels"][take]
            x[len(take) :] = 0  # the local engine's padding: same shapes, same numbers
            out = np.asarray(self.model.predict_on_batch(x))[: len(take)]
            with np.errstate(over="ignore"):  # float16 overflow -> inf -> refused by commit
                feats[take] = out.astype(self.dtype)
        return {
            "row": batch["row"],
            "features": feats,
            "error": batch["error"],
            "env": np.array([self.env] * len(feats), dtype=object),
        }


def extract_ray(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    model: Callable[[], Any],
    identity: dict[str, Any],
    input_size: tuple[int, int],
    names: Sequence[str] | None = None,
    batch_size: int = 32,
    dtype: str = "float32",
    resample: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    strict: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
    address: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    mirror: bool = False,
) -> ExtractSummary:
    """:func:`captioner.features.extraction.extract` on Ray; ``model`` is a zero-argument builder that
    Ray can send to the actors (e.g. a ``functools.partial`` of a module-level function)."""
    start = time.perf_counter()
    check_options(actors, gpus_per_actor, batch_size)
    plan = plan_extract(
        paths, out, identity=identity, input_size=input_size, names=names, batch_size=batch_size,
        dtype=dtype, resample=resample, retry_failed=retry_failed, mirror=mirror,
    )  # fmt: skip
    if plan.todo:
        with ray_session(address) as ray:
            stream = _pipeline(ray, plan, model, batch_size, resample, max_pixels, actors,
                               gpus_per_actor, mirror)  # fmt: skip
            _drain(stream, plan, progress)
    return finish_extract(plan, start, strict)


def _pipeline(ray, plan: ExtractPlan, build, batch_size, resample, max_pixels, actors, gpus,
              mirror):
    """The lazy Ray Dataset: rows → decoded pixels (tasks) → features (actor pool)."""
    items = [{"row": it.row, "path": str(it.path)} for it in plan.todo]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch_size))
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"size": plan.input_size, "resample": resample, "max_pixels": max_pixels,
                   "mirror": mirror},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=DECODE_CPUS,
    )
    return ds.map_batches(
        EncoderActor,
        fn_constructor_kwargs={
            "build": build,
            "batch_size": batch_size,
            "dtype": plan.compare["dtype"],
        },  # fmt: skip
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=gpus or None,
    )


def _drain(stream, plan: ExtractPlan, progress: bool) -> None:
    """Commit each batch the pipeline yields, in its rows' order, through the cache writer."""
    names = {it.row: it.name for it in plan.todo}
    summary = plan.summary
    writer: FeatureWriter | None = None
    bar = progress_bar(total=len(plan.todo), desc=f"extract {plan.out.name} (ray)", unit="img",
                       enabled=None if progress else False)  # fmt: skip
    try:
        with bar:
            for batch in stream.iter_batches(batch_size=None, batch_format="numpy"):
                if writer is None:
                    plan.ensure_file(tuple(batch["features"].shape[1:]),
                                     json.loads(batch["env"][0]))  # fmt: skip
                    writer = FeatureWriter(plan.out)
                order = np.argsort(batch["row"], kind="stable")
                rows, errors = batch["row"][order], batch["error"][order]
                ok = errors == ""
                failed = {int(r): str(e) for r, e in zip(rows[~ok], errors[~ok], strict=True)}
                refused = writer.commit(  # non-finite features: recorded as failed
                    [int(r) for r in rows[ok]], batch["features"][order][ok], failed
                )
                failed |= refused
                summary.done += int(ok.sum()) - len(refused)
                summary.failed.update({names[r]: e for r, e in failed.items()})
                bar.update(len(rows))
    finally:
        if writer is not None:
            writer.close()


def extract_ray_with_spec(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    encoder: str = "vgg16",
    layer: str | None = None,
    weights: str | os.PathLike | None = "imagenet",
    *,
    mixed_precision: str | None = None,
    **kwargs: Any,
) -> ExtractSummary:
    """:func:`extract_ray` with a named encoder (as :func:`~captioner.features.extraction.extract_with_spec`)."""
    identity, build, input_size = encoder_setup(encoder, layer, weights, mixed_precision)
    return extract_ray(paths, out, model=build, identity=identity, input_size=input_size, **kwargs)
