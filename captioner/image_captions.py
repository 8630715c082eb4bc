"""What :meth:`captioner.inference.Captioner.caption` returns per image, the attention grid
of a feature shape, and the image side of a captioner (:class:`ImageEncoding`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from captioner.decoding import Caption


@dataclass
class ImageCaptions:
    """What :meth:`Captioner.caption` says about one image."""

    image: Any  # the path as given, else the input's position in the list
    captions: list[Caption]  # best first; empty when the image failed
    error: str | None = None  # why the image could not be captioned
    warning: str | None = None  # e.g. a tiny image, whose caption is a guess
    words: list[str] | None = None  # best caption's words and "<end>" (attention=True)
    attention: np.ndarray | None = None  # (len(words), h, w) weights, each row sums to 1

    @property
    def text(self) -> str | None:
        """The best caption, or None when the image failed."""
        return self.captions[0].text if self.captions else None

    @property
    def score(self) -> float | None:
        """The best caption's search score (log-probability, length-normalised by alpha)."""
        return self.captions[0].score if self.captions else None


def image_name(item: Any, index: int) -> Any:
    """How a result names its input: the path as given, else its position in the list."""
    return item if isinstance(item, (str, os.PathLike)) else index


def grid_of(feature_shape: Sequence[int]) -> tuple[int, int]:
    """The (h, w) attention grid of spatial features (H, W, D) or (L, D) with square L."""
    if len(feature_shape) == 3:
        return int(feature_shape[0]), int(feature_shape[1])
    side = int(round(np.sqrt(feature_shape[0])))
    return side, int(feature_shape[0]) // side


class ImageEncoding:
    """The image side of a captioner (mixed into :class:`captioner.inference.Captioner`): the
    run's own encoder, input size and resize method. Needs ``config`` (a RunConfig) and
    ``run_dir`` (where the encoder weights may live)."""

    config: Any
    run_dir: Any
    _encoder: Any = None
    _encoded: bool = False  # whether a batch went through the encoder yet

    def _run_config(self):
        from captioner.errors import CaptionerError

        if self.config is None:
            raise CaptionerError("this captioner has no run config, so no encoder; load it with "
                                 "Captioner.from_run(RUN_DIR)")
        return self.config

    @property
    def encoder_spec(self):
        from captioner.encoders import get_spec

        return get_spec(self._run_config().encoder.name)

    def encoder(self):
        """The run's own feature model (built once, on first use)."""
        if self._encoder is None:
            from captioner.encoder_weights import run_encoder_weights

            enc = self._run_config().encoder
            weights = run_encoder_weights(enc, self.run_dir, self.encoder_spec)
            self._encoder = self.encoder_spec.feature_model(enc.layer, weights)
        return self._encoder

    max_memory: int | None = None  # bytes a batch may take (None: memory.MemoryBudget.default)
    _budget: Any = None

    def memory_budget(self):
        """The :class:`captioner.memory.MemoryBudget` of this captioner's batches."""
        from captioner.memory import MemoryBudget

        if self._budget is None or (self.max_memory and self._budget.limit != self.max_memory):
            self._budget = MemoryBudget(self.max_memory) if self.max_memory else MemoryBudget.default()
        return self._budget

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """Features for decoded RGB images (B, H, W, 3) in [0, 255], in pieces that fit the
        memory budget (:mod:`captioner.memory`)."""
        from captioner.memory import encoder_bytes, pieces

        size = self.memory_budget().images(encoder_bytes(self.input_size), len(images))
        if size >= len(images):
            return self._encode_batch(images)
        return np.concatenate([self._encode_batch(images[p]) for p in pieces(len(images), size)])

    def _encode_batch(self, images: np.ndarray) -> np.ndarray:
        """Features for one encoder call.

        A first batch of one or two images runs eagerly: compiling ``predict_on_batch`` costs
        more (about a second on a CPU) than it saves on such a batch; later batches use it."""
        import keras

        model = self.encoder()
        if not self._encoded and len(images) <= 2:
            self._encoded = True
            features = model(keras.ops.convert_to_tensor(images, "float32"), training=False)
            return np.asarray(keras.ops.convert_to_numpy(features), dtype="float32")
        self._encoded = True
        return np.asarray(model.predict_on_batch(images), dtype="float32")

    @property
    def input_size(self) -> tuple[int, int]:
        """Image size the run's encoder takes (from the run config, else the spec)."""
        size = self._run_config().encoder.input_size
        return tuple(size) if size else tuple(self.encoder_spec.input_size)

    @property
    def resample(self) -> str:
        """The resizing filter the run's feature cache was made with."""
        from captioner.runs import DEFAULT_RESAMPLE

        return self.config.encoder.resample if self.config else DEFAULT_RESAMPLE

    def encode_paths(
        self, items: Sequence[tuple[Any, str | os.PathLike]], batch_size: int
    ) -> Iterator[tuple[list[Any], np.ndarray | None, dict[Any, str]]]:
        """For ``(key, path)`` items, in batches: the keys read, their features (None when no
        image of the batch could be read) and ``{key: reason}`` for the unreadable ones, through
        the extraction pipeline with the run's own input size and resize method."""
        from functools import partial

        from captioner.extraction import encoded_batches
        from captioner.images import load_image

        load = partial(load_image, size=self.input_size, resample=self.resample)
        yield from encoded_batches(items, self.encode_images, load, batch_size)
