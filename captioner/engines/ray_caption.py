"""``captioner caption --engine ray --out FILE.jsonl``: a large collection captioned on Ray.

Images the output file lacks are decoded in Ray tasks; an actor pool holds the run's
encoder and decoder (built once per actor) and returns one JSON record per image; the driver
appends them to the file (:mod:`captioner.caption_lines`), so a rerun completes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from captioner.caption_lines import CaptionSummary, LineWriter, caption_record, pending
from captioner.engines.ray_runtime import (
    DECODE_CPUS,
    actor_threads,
    check_options,
    decode_batch,
    limit_backend_threads,
    ray_session,
)
from captioner.images import DEFAULT_MAX_PIXELS
from captioner.progress import progress as progress_bar


class CaptionActor:
    """Ray actor: the run's encoder and decoder, built once; pixels in, JSON records out."""

    def __init__(self, run_dir: str, search: dict[str, Any]):
        limit_backend_threads(actor_threads())
        from captioner.inference import Captioner

        self.captioner = Captioner.from_run(run_dir)
        self.search = search

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.flatnonzero(batch["error"] == "")
        records: list[dict | None] = [
            caption_record(str(img), None, str(err)) if err else None
            for img, err in zip(batch["image"], batch["error"], strict=True)
        ]
        if len(ok):
            feats = self.captioner.encode_images(batch["pixels"][ok])
            # (captions, None) or (None, reason) per row: a non-finite row fails alone
            found = self.captioner.caption_rows(feats, **self.search)
            for i, (caps, error) in zip(ok, found, strict=True):
                records[i] = caption_record(str(batch["image"][i]), caps, error)
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def run_image_settings(run_dir: Path) -> tuple[tuple[int, int], str]:
    """(input size, resize method) of the run's encoder, from its config (no model built)."""
    from captioner.encoders import get_spec
    from captioner.runs import RunConfig

    encoder = RunConfig.load(run_dir).encoder
    size = encoder.input_size or get_spec(encoder.name).input_size
    return (int(size[0]), int(size[1])), encoder.resample


def caption_ray(
    run_dir: Path,
    paths: list[Path],
    out: Path,
    *,
    batch_size: int = 16,
    address: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    progress: bool = True,
    **search: Any,
) -> CaptionSummary:
    """Caption ``paths`` into the JSON-lines file ``out`` on Ray, skipping images it holds."""
    check_options(actors, gpus_per_actor, batch_size)
    size, resample = run_image_settings(run_dir)
    todo, summary = pending(paths, out)
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
            fn_constructor_kwargs={"run_dir": str(run_dir), "search": search},
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
