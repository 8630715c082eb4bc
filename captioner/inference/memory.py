"""The memory budget of captioning: how many images one encoder call and one search take at once.

A larger ``--batch-size`` trades memory for speed: every image of a batch holds its pixels and
the encoder's activations while it is encoded, then its features, each ensemble member's
attention keys and its beams' state while it is searched. :class:`MemoryBudget` caps both so
that no batch size pushes the process past ``--max-memory`` (the memory batches may take on top
of the loaded model; default: :data:`DEFAULT_LIMIT`, or :data:`DEFAULT_FRACTION` of the memory
available when the model is first used if that is less): a batch that would exceed it is encoded
and searched in smaller pieces, with the same captions. On a CPU larger pieces buy no speed:
the encoder's images/s level off after a few dozen images (bundled model: 9.0 img/s at 8,
10.0 at 64 on ONNX Runtime), and a search step's cost per row after a hundred or so. Every entry point (``caption``, ``evaluate``, the Ray engine, the service) goes
through :meth:`captioner.inference.captioner.Captioner.caption` and ``encode_images``, which ask here.
Standard library only (the runtime-only install has no psutil).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LIMIT = 128 * 2**20  # bytes for the images of one call
DEFAULT_FRACTION = 0.5  # of the memory available at first use, when that is less
# Peak bytes of an encoder call per input pixel (activations of the widest layers and their
# inputs, float32): measured on the bundled EfficientNet-Lite2 at 260 x 260, 7.8 MiB per image
# on TensorFlow (the heavier runtime), 6.7 MiB on ONNX Runtime, batches of 64
ENCODER_BYTES_PER_PIXEL = 120
KEY_UNITS = 256  # attention units when the run config does not say
SEARCH_COPIES = 8  # float64 (rows, vocabulary) arrays the search holds per step
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``1.5G``, ``800M``, ``512MiB``, ``2gb`` or ``1000000`` (binary
    units); ValueError with the accepted forms otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a memory size; use e.g. 1.5G, 800M or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def available_bytes() -> int:
    """Memory available to this process now: MemAvailable of /proc/meminfo, under the cgroup's
    limit when one is set; the physical memory where neither exists."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(Path(path).read_text().strip())
            used = Path(path).with_name(
                "memory.current" if path.endswith("max") else "memory.usage_in_bytes"
            )
            found.append(limit - int(used.read_text().strip()))
        except (OSError, ValueError):
            continue
    if not found:
        found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return max(min(found), 0)


def encoder_bytes(input_size: Sequence[int]) -> int:
    """Peak bytes one image adds to an encoder call at ``input_size`` (h, w)."""
    return int(input_size[0]) * int(input_size[1]) * ENCODER_BYTES_PER_PIXEL


def search_bytes(
    feature_shape: Sequence[int], members: int, beam_size: int, vocab: int, key_units: int
) -> int:
    """Bytes one image adds to a search: its features and each member's keys once, and per beam
    the attention terms of a step and the search's float64 vocabulary arrays."""
    locations = math.prod(feature_shape[:-1]) if len(feature_shape) > 1 else 1
    per_image = 4 * (math.prod(feature_shape) + members * locations * key_units)
    per_beam = 4 * 2 * locations * key_units + 8 * SEARCH_COPIES * vocab
    return per_image + beam_size * per_beam


@dataclass(frozen=True)
class MemoryBudget:
    """At most ``limit`` bytes for the images of one call (see the module docstring)."""

    limit: int

    @classmethod
    def default(cls) -> MemoryBudget:
        return cls(min(DEFAULT_LIMIT, int(available_bytes() * DEFAULT_FRACTION)))

    def images(self, per_image: int, requested: int) -> int:
        """How many of ``requested`` images fit in one call at ``per_image`` bytes each (at
        least one: a single image is never split)."""
        return max(1, min(int(requested), self.limit // max(int(per_image), 1)))


def pieces(total: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` covering ``range(total)``."""
    return [slice(i, min(i + size, total)) for i in range(0, total, max(size, 1))]
