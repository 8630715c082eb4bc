"""Captioning with a trained run folder: compiled per-token steps driven by :mod:`decoding`
(one compiled ``step`` per backend, the LSTM state and image terms passed explicitly, so each
token costs one small call instead of a ``model.predict`` on the growing prefix)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captioner.compiled import compile_function, log_softmax_step, to_numpy
from captioner.decoding import Caption, Hypothesis, NonFiniteError, beam_search, greedy_search
from captioner.ensemble import check_compatible, mean_step
from captioner.errors import CaptionerError
from captioner.image_captions import ImageCaptions, grid_of, image_name
from captioner.runs import (
    BEST_WEIGHTS,
    CONFIG_FILE,
    DEFAULT_RESAMPLE,
    DEFAULT_RUN,
    LAST_WEIGHTS,
    TOKENIZER_FILE,
    RunConfig,
)
from captioner.tokenizer import END, PAD, START, UNK, Tokenizer

NON_FINITE_FEATURES = "features are not finite (NaN or inf); re-extract this image"
NON_FINITE_STEP = "the decoder gave NaN or inf scores for these features; re-extract this image"


class DecodingError(CaptionerError):
    """An image could not be captioned (its features or the decoder outputs are not finite)."""


STATIC_STATE = ("features", "keys")  # decoder state that is per image and never changes


class Captioner:
    """A decoder, its tokenizer and its run config: features or images in, captions out."""

    def __init__(self, decoder, tokenizer: Tokenizer, config: RunConfig | None = None):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.config = config
        self._eager_init = lambda feats: decoder.init_state(feats)
        self._eager_step = lambda tokens, state: log_softmax_step(decoder, tokens, state)
        self._init = compile_function(self._eager_init)
        self._step = compile_function(self._eager_step)
        self._searched = False  # whether a batch was searched yet
        self._encoder = None
        self.run_dir: Path | None = None  # set by from_run: the encoder weights may live there
        self._encoded = False  # whether a batch went through the encoder yet

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike = DEFAULT_RUN, weights: str = "best") -> Captioner:
        """Rebuild the model from its run folder alone (config, tokenizer, weights), each file
        checked against the others first (:mod:`captioner.runcheck`). A folder listing
        ``members`` is an ensemble of its weight files (:class:`EnsembleCaptioner`)."""
        from captioner import runcheck

        run_dir = Path(run_dir)
        config = RunConfig.load(run_dir)  # schema-checked
        config_path = run_dir / CONFIG_FILE
        runcheck.check_files(run_dir, config.files, config_path,
                             [TOKENIZER_FILE, BEST_WEIGHTS, LAST_WEIGHTS, *config.members])
        tokenizer = Tokenizer.load(run_dir / TOKENIZER_FILE)
        runcheck.check_tokenizer(tokenizer, config.decoder.config, run_dir / TOKENIZER_FILE,
                                 config_path)
        path = run_dir / (BEST_WEIGHTS if weights == "best" else LAST_WEIGHTS)
        if not path.is_file() and weights == "best":
            path = run_dir / LAST_WEIGHTS
        if not path.is_file():
            raise CaptionerError(f"{run_dir} has no weights ({BEST_WEIGHTS} or {LAST_WEIGHTS})")
        from captioner.decoders import load_checked_decoder

        members = [path] + [run_dir / name for name in config.members if weights == "best"]
        if missing := [m for m in members if not m.is_file()]:
            raise CaptionerError(f"{missing[0]} is missing: {config_path} lists it among the "
                                 "ensemble's members; restore it or remove it from members")
        dec = config.decoder
        loaded = [cls(load_checked_decoder(dec.kind, dec.config, m, config_path), tokenizer, config)
                  for m in members]
        for captioner in loaded:  # the encoder weights may live there
            captioner.run_dir = run_dir
        if len(loaded) == 1:
            return loaded[0]
        return EnsembleCaptioner(loaded, [m.name for m in members])

    # ------------------------------------------------------------------ search

    def step_function(self, eager: bool = False) -> Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]:
        """The numpy-in, numpy-out step the pure search drives (compiled unless ``eager``)."""
        fn = self._eager_step if eager else self._step

        def step(tokens: np.ndarray, state):
            log_probs, new_state = fn(tokens.astype("int32"), state)
            return to_numpy(log_probs), to_numpy(new_state)

        return step

    def initial_state(self, features: np.ndarray, eager: bool = False) -> dict[str, np.ndarray]:
        """Decoder state for a batch of image features (B, *feature_shape)."""
        init = self._eager_init if eager else self._init
        return to_numpy(init(np.asarray(features, dtype="float32")))

    def _eager_first(self, batch: int) -> bool:
        """A first batch of one or two images is searched eagerly: tracing the compiled step
        (about a second on a CPU) costs more than it saves on so few images."""
        import keras

        eager = not self._searched and batch <= 2 and keras.backend.backend() != "torch"
        self._searched = True
        return eager

    def prepare(self, features: np.ndarray, repeat: int = 1,
                eager: bool = False) -> tuple[Any, Callable]:
        """(numpy state, step function) for a search over ``features`` (B, *F). The state that
        no step changes (``STATIC_STATE``) stays on the backend, repeated ``repeat`` times per
        image (the beam size) and bound into the step, so the search never reorders it."""
        from keras import ops

        init, step_fn = (self._eager_init, self._eager_step) if eager else (self._init, self._step)
        state = init(np.asarray(features, dtype="float32"))
        static = {k: state[k] for k in STATIC_STATE if k in state}
        if repeat > 1:
            static = {k: ops.repeat(v, repeat, axis=0) for k, v in static.items()}
        dynamic = to_numpy({k: v for k, v in state.items() if k not in static})

        def step(tokens: np.ndarray, dyn):
            log_probs, new = step_fn(tokens.astype("int32"), {**dyn, **static})
            return to_numpy(log_probs), to_numpy({k: v for k, v in new.items() if k not in static})

        return dynamic, step

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
        eager = self._eager_first(len(features))
        common = dict(start_id=START, end_id=END, max_length=max_length,
                      block_ngram=block_ngram, banned_ids=(PAD, START, UNK))
        if beam_size == 1 and n_best == 1:
            state, step = self.prepare(features, eager=eager)
            hyps = greedy_search(step, state, len(features), **common)
            return [[h] for h in hyps]
        state, step = self.prepare(features, repeat=beam_size, eager=eager)
        return beam_search(step, state, len(features), beam_size=beam_size,
                           alpha=alpha, n_best=n_best, **common)

    def search_rows(self, features: np.ndarray, **search) -> list[list[Hypothesis] | str]:
        """:meth:`search` that never aborts the batch: per row the hypotheses, or a one-line
        reason when the row's features or the decoder's outputs for it are not finite."""
        flat = np.asarray(features, dtype="float32").reshape(len(features), -1)
        results: list[list[Hypothesis] | str] = [NON_FINITE_FEATURES] * len(features)
        good = np.flatnonzero(np.isfinite(flat).all(axis=1))
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

    def search_captions(self, features: np.ndarray, **search) -> list[list[Caption]]:
        """:meth:`search` with the captions' text filled in."""
        return [[self._caption(h) for h in hyps] for hyps in self.search(features, **search)]

    def _caption(self, hyp: Hypothesis) -> Caption:
        tokens = tuple(int(t) for t in hyp.tokens)
        return Caption(tokens, float(hyp.log_prob), float(hyp.score), bool(hyp.finished),
                       self.tokenizer.decode(tokens))

    # ------------------------------------------------------------------ images

    def _run_config(self) -> RunConfig:
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

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """Features for decoded RGB images (B, H, W, 3) in [0, 255].

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

    # ------------------------------------------------------------------ attention

    @property
    def grid(self) -> tuple[int, int]:
        """The (h, w) attention grid of the decoder's spatial features."""
        return grid_of(self.decoder.feature_shape)

    def attention(self, features: np.ndarray, captions: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Attention weights (len(tokens) + 1, h, w) of each caption's words, then of its
        ``<end>`` step, teacher-forced; ``features`` is (B, *feature_shape), one per caption."""
        from keras import ops

        if self.decoder.kind != "attention":
            raise CaptionerError(f"this run's decoder is '{self.decoder.kind}', which has no "
                                 "attention; use a run trained with --decoder attention")
        longest = max((len(c) for c in captions), default=0)
        inputs = np.zeros((len(captions), longest + 1), dtype="int32")  # <start> w1 .. wn, pad
        inputs[:, 0] = START
        for row, tokens in enumerate(captions):
            inputs[row, 1:len(tokens) + 1] = tokens
        alphas = ops.convert_to_numpy(self.decoder.attention_weights(features, inputs))  # (B, T, L)
        return [np.asarray(alphas[row, :len(t) + 1], "float32").reshape(-1, *self.grid)
                for row, t in enumerate(captions)]

    # ------------------------------------------------------------------ any images

    def caption(
        self, images: Sequence[Any], *, batch_size: int = 16, attention: bool = False,
        beam_size: int = 3, n_best: int = 1, alpha: float = 0.0, block_ngram: int = 0,
        max_length: int | None = None,
    ) -> list[ImageCaptions]:
        """Captions of image files, arrays (H, W, 3) in [0, 255] and PIL images, in batches.

        One :class:`ImageCaptions` per input, in order; an unreadable input gets ``error`` and
        the others go on. ``attention=True`` (attention runs) adds the best caption's words
        and their attention maps."""
        from captioner.images import pixels_of

        search = {"beam_size": beam_size, "n_best": n_best, "alpha": alpha,
                  "block_ngram": block_ngram, "max_length": max_length}
        out: list[ImageCaptions] = []
        for start in range(0, len(images), batch_size):
            chunk = [pixels_of(item, self.input_size, self.resample)
                     for item in images[start:start + batch_size]]
            good = [(i, px) for i, (px, _, err) in enumerate(chunk) if err is None]
            results = [ImageCaptions(image_name(images[start + i], start + i), [], err, warning=warn)
                       for i, (_, warn, err) in enumerate(chunk)]
            if good:
                feats = self.encode_images(np.stack([px for _, px in good]))
                for (i, _), hyps in zip(good, self.search_rows(feats, **search), strict=True):
                    if isinstance(hyps, str):  # non-finite features or scores: this image only
                        results[i].error = hyps
                    else:
                        results[i].captions = [self._caption(h) for h in hyps]
                ok = [k for k, (i, _) in enumerate(good) if results[i].captions]
                if attention and ok:
                    best = [results[good[k][0]].captions[0].tokens for k in ok]
                    maps = self.attention(feats[ok], best)
                    for k, tokens, amap in zip(ok, best, maps, strict=True):
                        results[good[k][0]].words = self.words(tokens)
                        results[good[k][0]].attention = amap
            out += results
        return out

    def words(self, tokens: Sequence[int]) -> list[str]:
        """The words of a caption's tokens, then ``<end>`` (one per attention row)."""
        return [self.tokenizer.decode([t]) or "<unk>" for t in tokens] + ["<end>"]

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


def load_captioner(run_dirs: Sequence[str | os.PathLike], weights: str = "best") -> Captioner:
    """One run folder as :meth:`Captioner.from_run`; several as an :class:`EnsembleCaptioner`."""
    if len(run_dirs) == 1:
        return Captioner.from_run(run_dirs[0], weights)
    return EnsembleCaptioner([Captioner.from_run(r, weights) for r in run_dirs], list(run_dirs))


class EnsembleCaptioner(Captioner):
    """Several decoders over one encoder and vocabulary decoded as one model (mean per-step
    log-probabilities, :mod:`captioner.ensemble`); encoder and attention maps: the first's."""

    def __init__(self, members: list[Captioner], names: Sequence[Any] = ()):
        first = members[0]
        labels = list(names) if len(names) == len(members) else list(range(len(members)))
        for label, member in zip(labels[1:], members[1:], strict=True):
            check_compatible(first, member, label)
        self.members = members
        self.decoder, self.tokenizer, self.config = first.decoder, first.tokenizer, first.config
        self.run_dir, self._searched = first.run_dir, True
        self._encoder, self._encoded = None, False

    def initial_state(self, features: np.ndarray, eager: bool = False) -> list[dict]:
        return [m.initial_state(features, eager) for m in self.members]

    def prepare(self, features: np.ndarray, repeat: int = 1,
                eager: bool = False) -> tuple[Any, Callable]:
        parts = [m.prepare(features, repeat, eager) for m in self.members]
        return [p[0] for p in parts], mean_step([p[1] for p in parts])

    def step_function(self, eager: bool = False) -> Callable[[np.ndarray, Any], tuple]:
        return mean_step([m.step_function(eager) for m in self.members])
