"""Captioning with a trained run folder: compiled per-token steps driven by :mod:`decoding`.

The decoder's ``step`` runs as one compiled function per backend (``tf.function``, ``jax.jit``,
or eager PyTorch under ``no_grad``) with the LSTM state and the precomputed image terms passed
explicitly, so each token costs one small call instead of a ``model.predict`` on the growing
prefix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner.decoding import Hypothesis, NonFiniteError, beam_search, greedy_search
from captioner.errors import CaptionerError
from captioner.tokenizer import END, PAD, START, UNK, Tokenizer

RUN_FORMAT = "captioner.run"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
BEST_WEIGHTS = "best.weights.h5"
LAST_WEIGHTS = "last.weights.h5"
DEFAULT_RUN = Path(__file__).resolve().parent.parent / "weights" / "default"
NON_FINITE_FEATURES = "features are not finite (NaN or inf); re-extract this image"
NON_FINITE_STEP = "the decoder gave NaN or inf scores for these features; re-extract this image"


class DecodingError(CaptionerError):
    """An image could not be captioned (its features or the decoder outputs are not finite)."""


def compile_function(fn: Callable) -> Callable:
    """Compile ``fn`` for the active Keras backend (inference only)."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # only reached with the TensorFlow backend

        return tf.function(fn, reduce_retracing=True)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "torch":
        import torch

        def no_grad(*args):
            with torch.no_grad():
                return fn(*args)

        return no_grad
    return fn


def _to_numpy(tree):
    import keras

    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return keras.ops.convert_to_numpy(tree)


@dataclass
class Caption:
    """One generated caption."""

    text: str
    tokens: tuple[int, ...]
    score: float
    log_prob: float
    finished: bool


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run folder's ``config.json``, checked against the schema (:mod:`runcheck`); every
    problem is one :class:`CaptionerError` line naming the file and the field."""
    from captioner.runcheck import check_config

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CaptionerError(
            f"{run_dir} is not a captioner run folder (no {CONFIG_FILE}); pass the folder that "
            "`captioner train --out` wrote"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CaptionerError(f"{path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise CaptionerError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    return check_config(config, path)


class Captioner:
    """A decoder, its tokenizer and its run config: features or images in, captions out."""

    def __init__(self, decoder, tokenizer: Tokenizer, config: dict[str, Any] | None = None):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.config = config or {}
        self._init = compile_function(lambda feats: decoder.init_state(feats))
        self._step = compile_function(lambda tokens, state: _log_softmax_step(decoder, tokens, state))
        self._encoder = None
        self.run_dir: Path | None = None  # set by from_run: the encoder weights may live there

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike = DEFAULT_RUN, weights: str = "best") -> Captioner:
        """Rebuild the model from its run folder alone (config, tokenizer, weights)."""
        from captioner.runcheck import (
            build_checked_decoder,
            check_files,
            check_tokenizer,
            check_weights,
        )

        run_dir = Path(run_dir)
        config = read_run_config(run_dir)
        config_path = run_dir / CONFIG_FILE
        check_files(run_dir, config, config_path, [TOKENIZER_FILE, BEST_WEIGHTS, LAST_WEIGHTS])
        tokenizer = Tokenizer.load(run_dir / TOKENIZER_FILE)
        check_tokenizer(tokenizer, config, run_dir / TOKENIZER_FILE, config_path)
        decoder = build_checked_decoder(config, config_path)
        path = run_dir / (BEST_WEIGHTS if weights == "best" else LAST_WEIGHTS)
        if not path.is_file() and weights == "best":
            path = run_dir / LAST_WEIGHTS
        if not path.is_file():
            raise CaptionerError(f"{run_dir} has no weights ({BEST_WEIGHTS} or {LAST_WEIGHTS})")
        check_weights(decoder, path, config_path)
        try:
            decoder.load_weights(path)
        except Exception as exc:
            raise CaptionerError(
                f"{path} does not fit the decoder in {config_path}: "
                f"{' '.join(str(exc).split())[:200]}"
            ) from None
        captioner = cls(decoder, tokenizer, config)
        captioner.run_dir = run_dir
        return captioner

    # ------------------------------------------------------------------ search

    def step_function(self) -> Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]:
        """The numpy-in, numpy-out step the pure search drives."""

        def step(tokens: np.ndarray, state):
            log_probs, new_state = self._step(tokens.astype("int32"), state)
            return _to_numpy(log_probs), _to_numpy(new_state)

        return step

    def initial_state(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Decoder state for a batch of image features (B, *feature_shape)."""
        return _to_numpy(self._init(np.asarray(features, dtype="float32")))

    def search(
        self,
        features: np.ndarray,
        beam_size: int = 1,
        alpha: float = 0.0,
        n_best: int = 1,
        max_length: int | None = None,
        block_ngram: int = 0,
    ) -> list[list[Hypothesis]]:
        """Hypotheses for one batch of features: greedy when ``beam_size == 1``."""
        max_length = max_length or self.tokenizer.max_length - 1
        state = self.initial_state(features)
        common = dict(start_id=START, end_id=END, max_length=max_length,
                      block_ngram=block_ngram, banned_ids=(PAD, START, UNK))
        if beam_size == 1 and n_best == 1:
            hyps = greedy_search(self.step_function(), state, len(features), **common)
            return [[h] for h in hyps]
        return beam_search(self.step_function(), state, len(features), beam_size=beam_size,
                           alpha=alpha, n_best=n_best, **common)

    def search_rows(self, features: np.ndarray, **search) -> list[list[Hypothesis] | str]:
        """:meth:`search` that never aborts the batch: per row the hypotheses, or a one-line
        reason when the row's features or the decoder's outputs for it are not finite."""
        flat = np.asarray(features, dtype="float32").reshape(len(features), -1)
        finite = np.isfinite(flat).all(axis=1)
        results: list[list[Hypothesis] | str] = [NON_FINITE_FEATURES] * len(features)
        good = np.flatnonzero(finite)
        if not len(good):
            return results
        try:
            found = self.search(features[good], **search)
        except NonFiniteError:  # find the culprit(s): one row at a time
            found = [self._search_one(features[i : i + 1], search) for i in good]
        for i, hyps in zip(good, found, strict=True):
            results[i] = hyps
        return results

    def _search_one(self, row: np.ndarray, search: dict) -> list[Hypothesis] | str:
        try:
            return self.search(row, **search)[0]
        except NonFiniteError:
            return NON_FINITE_STEP

    def caption_rows(
        self, features: np.ndarray, batch_size: int = 128, progress: bool = False, **search
    ) -> list[tuple[list[Caption] | None, str | None]]:
        """(n-best captions, None) or (None, reason) per row of features (N, *feature_shape),
        in batches; a damaged row fails alone."""
        from captioner.progress import progress as bar

        results: list[tuple[list[Caption] | None, str | None]] = []
        with bar(total=len(features), desc="captioning", unit="img", enabled=progress or None) as pbar:
            for start in range(0, len(features), batch_size):
                chunk = features[start:start + batch_size]
                for hyps in self.search_rows(chunk, **search):
                    if isinstance(hyps, str):
                        results.append((None, hyps))
                    else:
                        results.append(([self._caption(h) for h in hyps], None))
                pbar.update(len(chunk))
        return results

    def caption_features(
        self, features: np.ndarray, batch_size: int = 128, progress: bool = False, **search
    ) -> list[list[Caption]]:
        """Captions (n-best lists) for features (N, *feature_shape), in batches; a damaged row
        raises :class:`DecodingError` naming its position (see :meth:`caption_rows`)."""
        results = []
        for i, (caps, error) in enumerate(self.caption_rows(features, batch_size, progress, **search)):
            if caps is None:
                raise DecodingError(f"features row {i}: {error}")
            results.append(caps)
        return results

    def _caption(self, hyp: Hypothesis) -> Caption:
        return Caption(self.tokenizer.decode(hyp.tokens), hyp.tokens, hyp.score, hyp.log_prob,
                       hyp.finished)

    # ------------------------------------------------------------------ images

    @property
    def encoder_spec(self):
        from captioner.encoders import get_spec

        return get_spec(self.config["encoder"]["name"])

    def encoder(self):
        """The run's own feature model (built once, on first use)."""
        if self._encoder is None:
            from captioner.encoder_weights import run_encoder_weights

            enc = self.config["encoder"]
            weights = run_encoder_weights(enc, self.run_dir, self.encoder_spec)
            self._encoder = self.encoder_spec.feature_model(enc["layer"], weights)
        return self._encoder

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """Features for decoded RGB images (B, H, W, 3) in [0, 255]."""
        return np.asarray(self.encoder().predict_on_batch(images), dtype="float32")

    @property
    def input_size(self) -> tuple[int, int]:
        """Image size the run's encoder takes (from the run config, else the spec)."""
        size = self.config.get("encoder", {}).get("input_size")
        return tuple(size) if size else tuple(self.encoder_spec.input_size)

    def encode_paths(
        self, items: Sequence[tuple[Any, str | os.PathLike]], batch_size: int
    ) -> Iterator[tuple[list[Any], np.ndarray | None, dict[Any, str]]]:
        """For ``(key, path)`` items, in batches: the keys read, their features (None when no
        image of the batch could be read) and ``{key: reason}`` for the unreadable ones."""
        from captioner.errors import ImageError
        from captioner.images import load_image

        for start in range(0, len(items), batch_size):
            good, pixels, failed = [], [], {}
            for key, path in items[start:start + batch_size]:
                try:
                    pixels.append(load_image(path, self.input_size))
                    good.append(key)
                except ImageError as exc:
                    failed[key] = getattr(exc, "reason", None) or str(exc)
                except Exception as exc:  # a decoder bug or MemoryError on one file
                    failed[key] = f"unexpected error ({type(exc).__name__}: {exc})"
            feats = self.encode_images(np.stack(pixels)) if pixels else None
            yield good, feats, failed

    def caption_images(
        self, paths: Sequence[str | os.PathLike], batch_size: int = 16, **search
    ) -> list[tuple[Path, list[Caption] | None, str | None]]:
        """(path, captions, error) per image, in the given order; a bad image gets an error
        and the rest go on."""
        items = list(enumerate(paths))
        results: dict[int, tuple[Path, list[Caption] | None, str | None]] = {}
        for good, feats, failed in self.encode_paths(items, batch_size):
            results |= {i: (Path(paths[i]), None, reason) for i, reason in failed.items()}
            if good:
                for i, (caps, error) in zip(good, self.caption_rows(feats, **search), strict=True):
                    results[i] = (Path(paths[i]), caps, error)
        return [results[i] for i in range(len(paths))]


def _log_softmax_step(decoder, tokens, state):
    from keras import ops

    logits, new_state = decoder.step(tokens, state)
    return ops.log_softmax(ops.cast(logits, "float32"), axis=-1), new_state
