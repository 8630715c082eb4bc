"""What an extraction run must do, whatever engine runs it: validate the request, check and
grow an existing cache (:func:`captioner.features.cache_writer.prepare`), list the rows still to fill, and sum
up what was done. Used by the local loop (:mod:`captioner.features.extraction`) and the Ray engine.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from captioner.errors import CaptionerError, ImageError, OptionError
from captioner.features.cache import DONE, DTYPES, FAILED, mismatch
from captioner.features.cache_writer import FeatureWriter, check_cache_space, prepare
from captioner.storage.faults import check_writable, writing
from captioner.storage.temp_files import remove_stale


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
class Item:
    row: int
    name: str
    path: Path


def _check_names(names: Sequence[str]) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise CaptionerError(
                f"image name {name!r} appears twice (items {seen[name] + 1} and {i + 1}); "
                "names identify rows of the cache, so they must be unique."
            )
        seen[name] = i


@dataclass
class ExtractPlan:
    """What an extraction run must do, decided before any model is built (any engine)."""

    out: Path
    names: list[str]
    compare: dict[str, Any]  # identity + settings an existing cache must match
    todo: list[Item]  # rows to fill, in row order
    summary: ExtractSummary
    existing_shape: tuple[int, ...] | None  # the cache's feature shape; None: no file yet

    @property
    def input_size(self) -> tuple[int, int]:
        return self.compare["input_size"]

    def ensure_file(self, shape: tuple[int, ...], environment: dict[str, Any]) -> None:
        """Create the cache for ``shape`` (first run), or check an existing one's shape."""
        if self.existing_shape is not None and tuple(self.existing_shape) != tuple(shape):
            raise mismatch(
                self.out, [f"feature_shape: file has {self.existing_shape}, expected {shape}"]
            )
        check_cache_space(self.out, len(self.todo), shape, self.compare["dtype"])
        if self.existing_shape is None:
            attrs = {**environment, **self.compare, "feature_shape": shape}
            FeatureWriter.create(self.out, self.names, shape, self.compare["dtype"], attrs)
            self.existing_shape = shape


def plan_extract(
    paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, identity: dict[str, Any],
    input_size: tuple[int, int], names: Sequence[str] | None = None, batch_size: int = 32,
    dtype: str = "float32", resample: str = "bilinear", retry_failed: bool = False,
    mirror: bool = False,
) -> ExtractPlan:  # fmt: skip
    """Validate the arguments, check and grow an existing cache, list the rows to fill."""
    out = Path(out)
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths] if names is None else list(names)
    if len(names) != len(paths):
        raise ValueError("names and paths must have the same length")
    if not paths:
        raise CaptionerError("no images to extract.")
    if dtype not in DTYPES:
        raise OptionError("dtype", f"must be one of {', '.join(DTYPES)}, not {dtype!r}.")
    if batch_size < 1:
        raise OptionError("batch_size", f"must be at least 1, not {batch_size}.")
    _check_names(names)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)  # temporary files of killed runs over this cache
    settings = {  # compared with an existing cache (the format version is not: 1 still loads)
        "input_size": tuple(int(v) for v in input_size),
        "resample": resample,
        "jpeg_draft": True,
        "dtype": dtype,
        "mirrored": bool(mirror),  # photos flipped left-right (training augmentation)
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
        rows, status, old_failed, _, damaged = state
    summary = ExtractSummary(out=out, requested=len(names))
    if state is not None:
        summary.repaired = len(damaged)
        for name, why in islice(damaged.items(), 10):
            print(f"damaged: {name} in {out}: {why}; re-extracting it", file=sys.stderr)
    todo: list[Item] = []
    for name, path in zip(names, paths, strict=True):
        row = rows[name]
        if status[row] == DONE:
            summary.skipped += 1
        elif status[row] == FAILED and not retry_failed:
            summary.previously_failed += 1
            summary.failed[name] = old_failed.get(name, "")
        else:
            todo.append(Item(row, name, path))
    todo.sort(key=lambda item: item.row)
    if todo:  # a read-only or full folder: one line now, before the model is built
        check_writable(out.parent, out)
    return ExtractPlan(out, names, compare, todo, summary, None if state is None else state[3])


def finish_extract(plan: ExtractPlan, start: float, strict: bool) -> ExtractSummary:
    """Time the run; with ``strict``, raise :class:`ImageError` if any image has no features."""
    summary = plan.summary
    summary.seconds = time.perf_counter() - start
    if strict and summary.failed:
        shown = "; ".join(f"{n}: {r}" for n, r in islice(summary.failed.items(), 5))
        raise ImageError(
            f"{len(summary.failed)} image(s) have no features in {plan.out} ({shown})."
        )
    return summary
