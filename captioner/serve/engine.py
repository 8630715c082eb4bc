"""The model side of ``captioner serve``: decoded images in, captions (and attention) out.

:meth:`Engine.run` takes the images of several requests at once: all of them go through the
encoder as one batch, then each group of images asking for the same decoding (and attention)
is captioned as one batch by :meth:`captioner.inference.captioner.Captioner.caption`, the one call the
CLI uses too, so the service answers what ``captioner caption`` prints. Nothing here knows
about HTTP.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner.formats.decoding_config import DecodingConfig

ATTENTION = "attention"  # the per-image key added to the caption record when asked
WEIGHT_DIGITS = 4
REPORT_FILE = "report.json"
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@dataclass(frozen=True)
class Options:
    """Per-request options (checked by :func:`captioner.serve.uploads.parse_options`);
    ``decoding`` None: the model's stored decoding."""

    decoding: DecodingConfig | None = None
    attention: bool = False  # answer the attention grids
    heatmap: bool = False  # answer the heat map image (the page asks for it)


@dataclass
class Item:
    """One image of a request: RGB pixels at the encoder's input size and its options."""

    pixels: np.ndarray  # (H, W, 3) uint8
    options: Options


@dataclass
class Output:
    """Captions of one image, best first, and the attention of the best one when asked."""

    captions: list[Any]  # captioner.inference.decoding.Caption, best first; empty when ``error``
    attention: tuple[list[str], np.ndarray] | None = None  # words, weights (len(words), h*w)
    error: str | None = None  # non-finite features or decoder outputs: this image fails alone


class Engine:
    """A loaded :class:`~captioner.inference.captioner.Captioner` and what the service says about it."""

    def __init__(self, captioner, run_dir: str | os.PathLike | None = None):
        self.captioner = captioner
        self.run_dir = Path(run_dir) if run_dir else None

    @classmethod
    def from_run(cls, models: str | os.PathLike | Sequence[str | os.PathLike],
                 runtime: str | None = None) -> Engine:
        """Load the model (one run folder, or several decoded as one ensemble) and its encoder
        (``runtime``: keras, onnx, or None: onnx when the folder carries an export)."""
        from captioner.inference.loader import load_captioner

        captioner = load_captioner(models, runtime=runtime)
        captioner.encoder()  # built now, not on the first request
        if getattr(captioner, "runtime", "keras") == "onnx":
            return_freed_memory()
        first = models if isinstance(models, (str, os.PathLike)) else models[0]
        return cls(captioner, first)

    @property
    def decoding(self) -> DecodingConfig:
        """The model's stored decoding (what a request without options gets)."""
        return self.captioner.decoding

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) the encoder takes; uploads are resized to it when decoded."""
        return tuple(self.captioner.input_size)

    @property
    def resample(self) -> str:
        """The resize filter the run's features were made with."""
        return getattr(self.captioner, "resample", "bilinear")

    @property
    def onnx(self) -> bool:
        """Whether the model runs on ONNX Runtime (else Keras)."""
        return getattr(self.captioner, "runtime", "keras") == "onnx"

    @property
    def workers(self) -> int:
        """Batches the model may run at once: 1 on Keras (its compiled functions are never
        called from two threads); on ONNX Runtime, whose sessions take concurrent runs,
        ``CAPTIONER_SERVE_WORKERS`` (default 1: on the shared 2-core machine two workers halved
        the batches without adding images/s, and raised the memory; a quiet machine with more
        cores may gain from overlapping one batch's encoder with another's search)."""
        return max(1, int(os.environ.get("CAPTIONER_SERVE_WORKERS", "1"))) if self.onnx else 1

    @property
    def has_attention(self) -> bool:
        return getattr(self.captioner.decoder, "kind", None) == "attention"

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the attention grid."""
        return self.captioner.grid

    def run(self, items: Sequence[Item]) -> list[Output]:
        """Captions for ``items``, in order: one encoder batch, one search batch per option group."""
        if not items:
            return []
        features = self._encode(np.stack([i.pixels for i in items]))  # (B, *feature_shape)
        outputs: list[Output] = [Output([]) for _ in items]
        groups: dict[tuple[DecodingConfig, bool], list[int]] = {}
        for k, item in enumerate(items):
            wants = (item.options.attention or item.options.heatmap) and self.has_attention
            groups.setdefault((item.options.decoding or self.decoding, wants), []).append(k)
        for (decoding, wants), rows in groups.items():
            found = self.captioner.caption(features[rows], decoding, attention=wants,
                                           batch_size=len(rows))
            for k, r in zip(rows, found, strict=True):  # captions, or why the row failed
                outputs[k] = Output(r.captions, error=r.error)
                if wants and r.attention is not None:
                    outputs[k].attention = (r.words, r.attention.reshape(len(r.attention), -1))
        return outputs

    def _encode(self, pixels: np.ndarray) -> np.ndarray:
        """Features of (B, H, W, 3) pixels, on Keras run as a batch of :func:`bucket` (B) images
        (the last one repeated), so the encoder is compiled for a few batch sizes only; ONNX
        Runtime compiles nothing per batch size, so it encodes the B images alone (padding 5
        images to 8 cost 1.6x the encoder time)."""
        n = len(pixels)
        if self.onnx:
            return self.captioner.encode_images(pixels)
        padded = np.concatenate([pixels, np.repeat(pixels[-1:], bucket(n) - n, axis=0)])
        return self.captioner.encode_images(padded)[:n]

    def warm_up(self) -> float:
        """Run every compiled path once (batches of 1 and 2, greedy and beam, attention);
        returns the seconds it took."""
        start = time.perf_counter()
        blank = np.full((*self.input_size, 3), 127, dtype=np.uint8)
        greedy = Options(self.decoding.replace(beam_size=1, n_best=1))
        self.run([Item(blank, greedy)])
        self.run([Item(blank, Options(attention=True)), Item(blank, greedy)])
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        """Encoder, decoder, vocabulary size and the test scores found in the run folder."""
        config = self.captioner.config
        encoder, decoder = config.encoder, config.decoder
        return {
            "run": self.run_dir.name if self.run_dir else None,
            "preset": config.preset,
            "encoder": {"name": encoder.name, "layer": encoder.layer,
                        "input_size": list(self.input_size),
                        "feature_shape": list(encoder.feature_shape)},
            "decoder": {"kind": decoder.kind, **decoder.config},
            "ensemble_size": len(getattr(self.captioner, "members", [self.captioner])),
            "decoding": self.decoding.to_dict(),
            "vocabulary_size": self.captioner.tokenizer.vocab_size,
            "attention": self.has_attention,
            "attention_grid": list(self.grid) if self.has_attention else None,
            "test_scores": read_test_scores(self.run_dir) if self.run_dir else None,
            "created": config.created,
        }


def return_freed_memory() -> bool:
    """Have glibc give large freed blocks back to the system: ONNX Runtime (the encoder runs
    without a memory arena) allocates and frees tens of MB per batch, and glibc's adaptive
    mmap threshold otherwise keeps them in fragmented heaps (measured: 60 batches of 1-8
    photos, RSS 363 MiB without, 211 MiB with a fixed 1 MiB threshold, CPU +5 %). False
    where there is no glibc ``mallopt`` (other C libraries, other systems)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        return False


def bucket(n: int) -> int:
    """The batch size ``n`` images run as: the next power of two (1, 2, 4, 8, 16, ...)."""
    return 1 << max(n - 1, 0).bit_length()


def read_test_scores(run_dir: Path) -> dict[str, Any] | None:
    """Metrics per decoding setting from the ``captioner evaluate`` report kept in the run
    folder (``report.json`` or ``*/report.json``); None when the folder has none."""
    candidates = [run_dir / REPORT_FILE, *sorted(run_dir.glob(f"*/{REPORT_FILE}"))]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
            sections = {s["settings"]["label"]: s["metrics"] for s in data["sections"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not an evaluate report: look further
        return {"report": str(path.relative_to(run_dir)), "sections": sections}
    return None


def attention_record(words: Sequence[str], weights: np.ndarray, grid: tuple[int, int]) -> dict[str, Any]:
    """``{"grid": [h, w], "words": [...], "weights": [[[...]]]}``: one (h, w) grid of attention
    weights per word of the best caption, ``<end>`` last. ``weights`` is (len(words), h*w)."""
    h, w = grid
    cells = np.asarray(weights, dtype="float64").reshape(len(words), h, w)  # (T, h, w)
    return {"grid": [h, w], "words": list(words), "weights": np.round(cells, WEIGHT_DIGITS).tolist()}
