"""``captioner caption --engine ray --out FILE.jsonl``: a large collection captioned on Ray.

Images the output file lacks are decoded in Ray tasks; an actor pool holds the model (every
``--model`` folder, loaded by :func:`captioner.inference.loader.load_captioner` once per actor) and
returns one JSON record per image; the driver appends them to the file
(:mod:`captioner.inference.caption_lines`), so a rerun completes it. The decoding is the first folder's
stored one with the command line's overrides, resolved once in the driver.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from captioner.encoders.images import DEFAULT_MAX_PIXELS
from captioner.engines.ray_runtime import (
    DECODE_CPUS,
    actor_threads,
    check_options,
    decode_batch,
    limit_backend_threads,
    ray_session,
)
from captioner.inference.caption_lines import (
    CaptionSummary,
    LineWriter,
    caption_record,
    made_with,
    pending,
)
from captioner.progress import progress as progress_bar


class CaptionActor:
    """Ray actor: the model's encoder and decoders, built once; pixels in, JSON records out."""

    def __init__(self, models: list[str], decoding: dict[str, Any], max_memory: int | None = None):
        limit_backend_threads(actor_threads())
        from captioner.formats.decoding_config import DecodingConfig
        from captioner.inference.loader import load_captioner

        self.captioner = load_captioner(models)
        self.captioner.max_memory = max_memory  # None: the default budget (captioner.inference.memory)
        self.decoding = DecodingConfig.from_dict(decoding)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.flatnonzero(batch["error"] == "")
        records: list[dict | None] = [
            caption_record(str(img), None, str(err)) if err else None
            for img, err in zip(batch["image"], batch["error"], strict=True)
        ]
        if len(ok):
            feats = self.captioner.encode_images(batch["pixels"][ok])
            # captions or the reason per row: a non-finite row fails alone
            found = self.captioner.caption(feats, self.decoding, batch_size=len(ok))
            for i, r in zip(ok, found, strict=True):
                records[i] = caption_record(str(batch["image"][i]), r.captions, r.error)
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def run_settings(run_dir: Path, overrides: dict[str, Any]):
    """(input size, resize method, decoding) of the first run folder, from its config alone
    (no model built; a bad decoding field raises :class:`DecodingError`)."""
    from captioner.encoders.specs import get_spec
    from captioner.formats.run_folder import RunConfig

    config = RunConfig.load(run_dir)
    size = config.encoder.input_size or get_spec(config.encoder.name).input_size
    decoding = config.decoding.replace(**overrides)
    return (int(size[0]), int(size[1])), config.encoder.resample, decoding


def caption_ray(
    models: list[Path],
    paths: list[Path],
    out: Path,
    *,
    batch_size: int = 16,
    address: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    max_memory: int | None = None,
) -> CaptionSummary:
    """Caption ``paths`` into the JSON-lines file ``out`` on Ray with every folder of
    ``models`` (an ensemble when several), skipping images it holds; ``overrides``: decoding
    fields that replace the first folder's stored ones (None: keep)."""
    check_options(actors, gpus_per_actor, batch_size)
    size, resample, decoding = run_settings(models[0], overrides or {})
    todo, summary = pending(paths, out, made_with(models, decoding))
    if not todo:
        return summary
    with ray_session(address) as ray, LineWriter(out, summary) as writer:
        ds = ray.data.from_items([{"image": str(p), "path": str(p)} for p in todo],
                                 override_num_blocks=max(1, len(todo) // batch_size))  # fmt: skip
        ds = ds.map_batches(
            decode_batch,
            fn_kwargs={"size": size, "resample": resample, "max_pixels": DEFAULT_MAX_PIXELS},
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=DECODE_CPUS,
        )
        ds = ds.map_batches(
            CaptionActor,
            fn_constructor_kwargs={"models": [str(m) for m in models],
                                   "decoding": decoding.to_dict(), "max_memory": max_memory},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
            num_gpus=gpus_per_actor or None,
        )
        bar = progress_bar(total=len(todo), desc=f"caption {out.name} (ray)", unit="img",
                           enabled=None if progress else False)  # fmt: skip
        with bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.write(json.loads(r) for r in batch["record"])
                bar.update(len(batch["record"]))
    return summary
