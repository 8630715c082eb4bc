"""Captioning with a trained run folder: compiled per-token steps driven by :mod:`decoding`
(one compiled ``step`` per backend, the LSTM state and image terms passed explicitly, so each
token costs one small call instead of a ``model.predict`` on the growing prefix).

:func:`load_captioner` is the one way to open a model (a run folder, a folder listing
``members``, or several folders decoded together); :meth:`Captioner.caption` is the one call
that captions (image files, arrays, PIL images or precomputed features), starting from the
decoding stored with the model (:class:`~captioner.decoding_config.DecodingConfig`) and
overriding single fields. The CLI, ``serve``, ``evaluate``, the Ray engine and training's dev
scores are thin adapters over these two."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captioner.compiled import compile_function, log_softmax_step, to_numpy
from captioner.decoding import Caption, Hypothesis, NonFiniteError, beam_search, greedy_search
from captioner.decoding_config import DecodingConfig
from captioner.ensemble import check_compatible, mean_step
from captioner.errors import CaptionerError
from captioner.grounding import Grounding, grounded
from captioner.image_captions import ImageCaptions, ImageEncoding, grid_of, image_name
from captioner.per_image import indexed_state, indexed_step
from captioner.runs import (
    BEST_WEIGHTS,
    CONFIG_FILE,
    DEFAULT_RUN,
    LAST_WEIGHTS,
    TOKENIZER_FILE,
    RunConfig,
)
from captioner.tokenizer import END, PAD, START, UNK, Tokenizer

NON_FINITE_FEATURES = "features are not finite (NaN or inf); re-extract this image"
NON_FINITE_STEP = "the decoder gave NaN or inf scores for these features; re-extract this image"
ACROSS_MEMBERS = ("features",)  # per-image state every ensemble member computes alike


def _backend_take(array: Any, index: np.ndarray) -> Any:
    from keras import ops

    return ops.take(array, index, axis=0)


class DecodingError(CaptionerError):
    """An image could not be captioned (its features or the decoder outputs are not finite)."""


class Captioner(ImageEncoding):
    """A decoder, its tokenizer, its run config and its decoding: features or images in,
    captions out. ``decoding`` defaults to the run config's (else the defaults)."""

    def __init__(self, decoder, tokenizer: Tokenizer, config: RunConfig | None = None,
                 decoding: DecodingConfig | None = None):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.config = config
        self.decoding = decoding or (config.decoding if config else DecodingConfig())
        self._eager_init = lambda feats: decoder.init_state(feats)
        self._eager_step = lambda tokens, state: log_softmax_step(decoder, tokens, state)
        self._eager_shared = lambda tokens, state, shared: log_softmax_step(
            decoder, tokens, state, shared)
        self._init = compile_function(self._eager_init)
        self._step = compile_function(self._eager_step)
        self._shared = compile_function(self._eager_shared)
        self._searched = False  # whether a batch was searched yet
        self._encoder = None
        self.run_dir: Path | None = None  # set by from_run: the encoder weights may live there
        self.grounding: Grounding | None = None  # the run's ImageNet head, when it has one
        self._encoded = False  # whether a batch went through the encoder yet

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike = DEFAULT_RUN, weights: str = "best") -> Captioner:
        """Rebuild the model from its run folder alone (config, read once: tokenizer, weights),
        each file checked against the others first (:mod:`captioner.runcheck`). A folder listing
        ``members`` is an ensemble of its weight files (:class:`EnsembleCaptioner`)."""
        from captioner import runcheck
        from captioner.quiet import quiet_keras_import

        quiet_keras_import()  # before the decoders import Keras: the API is as quiet as the CLI
        run_dir = Path(run_dir)
        config = RunConfig.load(run_dir)  # schema-checked
        config_path = run_dir / CONFIG_FILE
        runcheck.check_files(run_dir, config.files, config_path,
                             [TOKENIZER_FILE, BEST_WEIGHTS, LAST_WEIGHTS, *config.members,
                              *config.grounding.values()])
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
        grounding = Grounding.from_run(run_dir, config.grounding, tokenizer.words)
        for captioner in loaded:  # the encoder weights may live there
            captioner.run_dir, captioner.grounding = run_dir, grounding
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

    def prepare(self, features: np.ndarray, eager: bool = False) -> tuple[Any, Callable]:
        """(numpy state, step function) for a search over ``features`` (B, *F). The state no
        step changes (the decoder's ``per_image``: features, projected keys) stays on the
        backend once per image; the search's state holds the small per-beam leaves and each
        row's image index (:mod:`captioner.per_image`)."""
        shared, beams, grouped = self.shared_parts(features, eager)
        return indexed_state(beams, len(features)), indexed_step(grouped, shared, len(features),
                                                                 _backend_take)

    def shared_parts(self, features: np.ndarray, eager: bool = False) -> tuple[dict, Any, Callable]:
        """(per-image backend arrays, per-beam numpy state, ``grouped(tokens, beams, shared)``
        step) for ``features`` (B, *F): see :func:`captioner.per_image.indexed_step`."""
        init, step_fn = (self._eager_init, self._eager_shared) if eager else (self._init, self._shared)
        state = init(np.asarray(features, dtype="float32"))
        names = tuple(k for k in getattr(self.decoder, "per_image", ()) if k in state)
        shared = {k: state[k] for k in names}
        beams = to_numpy({k: v for k, v in state.items() if k not in names})

        def grouped(tokens: np.ndarray, beams, rows: dict):
            log_probs, new = step_fn(tokens.astype("int32"), beams, rows)
            return to_numpy(log_probs), to_numpy({k: v for k, v in new.items() if k not in names})

        return shared, beams, grouped

    def decoding_for(self, decoding: DecodingConfig | None = None, **overrides) -> DecodingConfig:
        """``decoding`` (default: the model's stored one) with the fields given in ``overrides``
        changed (None leaves a field as it is)."""
        return (decoding or self.decoding).replace(**overrides)

    def search(self, features: np.ndarray, decoding: DecodingConfig | None = None,
               **overrides) -> list[list[Hypothesis]]:
        """Hypotheses for one batch of features (see :meth:`decoding_for`): greedy when
        ``beam_size == 1``."""
        d = self.decoding_for(decoding, **overrides)
        max_length = d.max_length or self.tokenizer.max_length - 1
        eager = self._eager_first(len(features))
        common = dict(start_id=START, end_id=END, max_length=max_length,
                      block_ngram=d.block_ngram, banned_ids=(PAD, START, UNK))
        if d.beam_size == 1 and d.n_best == 1:
            state, step = self.ground(features, *self.prepare(features, eager), d)
            hyps = greedy_search(step, state, len(features), **common)
            return [[h] for h in hyps]
        state, step = self.ground(features, *self.prepare(features, eager), d)
        return beam_search(step, state, len(features), beam_size=d.beam_size,
                           alpha=d.alpha, n_best=d.n_best, **common)

    def ground(self, features: np.ndarray, state: Any, step: Callable,
               decoding: DecodingConfig) -> tuple[Any, Callable]:
        """(state, step) with the object-grounding bonus of ``decoding.grounding`` when the
        model carries an ImageNet head (:mod:`captioner.grounding`), else unchanged."""
        if not (decoding.grounding or decoding.grounding_boost) or self.grounding is None:
            return state, step
        bonus = self.grounding.word_bonus(features, decoding.grounding, decoding.grounding_boost)
        return grounded(state, step, bonus)

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
        """(n-best captions, None) or (None, reason) per row of features (N, *feature_shape);
        a damaged row fails alone. ``search``: ``decoding`` and single-field overrides."""
        found = self.caption(np.asarray(features), batch_size=batch_size, progress=progress,
                             **search)
        return [(r.captions or None, r.error) for r in found]

    def caption_features(
        self, features: np.ndarray, batch_size: int = 128, progress: bool = False, **search
    ) -> list[list[Caption]]:
        """Captions (n-best lists) for features (N, *feature_shape), in batches; a damaged row
        raises :class:`DecodingError` naming its position (see :meth:`caption`)."""
        results = []
        for i, (caps, error) in enumerate(self.caption_rows(features, batch_size, progress, **search)):
            if caps is None:
                raise DecodingError(f"features row {i}: {error}")
            results.append(caps)
        return results

    def _text(self, hyp: Hypothesis) -> Caption:
        tokens = tuple(int(t) for t in hyp.tokens)
        return Caption(tokens, float(hyp.log_prob), float(hyp.score), bool(hyp.finished),
                       self.tokenizer.decode(tokens))

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

    # ------------------------------------------------------------------ the one caption call

    def is_features(self, inputs: Any) -> bool:
        """Whether ``inputs`` is an array of precomputed features (N, *feature_shape), maps
        (H, W, D) also as (N, H*W, D)."""
        shape = tuple(getattr(self.decoder, "feature_shape", None) or ())
        if not isinstance(inputs, np.ndarray) or not shape:
            return False
        flat = (int(np.prod(shape[:-1])), shape[-1]) if len(shape) == 3 else shape
        return inputs.shape[1:] in (shape, flat)

    def caption(
        self, inputs: Any, decoding: DecodingConfig | None = None, *, attention: bool = False,
        batch_size: int = 16, progress: bool = False, **overrides,
    ) -> list[ImageCaptions]:
        """Captions of image files, arrays (H, W, 3) in [0, 255], PIL images, or precomputed
        features (an array (N, *feature_shape)), in batches.

        Decodes with ``decoding`` (default: the model's stored one, :attr:`decoding`) with the
        single fields in ``overrides`` changed (``beam_size=1``; None keeps the field). One
        :class:`ImageCaptions` per input, in order (``image``: the path as given, else the
        position); an unreadable input or a non-finite row gets ``error`` and the others go
        on. ``attention=True`` (attention runs) adds the best caption's words and their
        attention maps; ``progress=True``: a bar on a terminal."""
        from captioner.progress import progress as bar

        settings = self.decoding_for(decoding, **overrides)
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        batch_size = self.memory_budget().images(self.search_bytes(settings), batch_size)
        features = self.is_features(inputs)
        out: list[ImageCaptions] = []
        with bar(total=len(inputs), desc="captioning", unit="img", enabled=progress and None) as pbar:
            for start in range(0, len(inputs), batch_size):
                chunk = inputs[start:start + batch_size]
                if features:
                    results = [ImageCaptions(start + i, []) for i in range(len(chunk))]
                    self._decode(results, np.asarray(chunk, "float32"), settings, attention)
                else:
                    results = self._caption_images(chunk, start, settings, attention)
                out += results
                pbar.update(len(chunk))
        return out

    def _caption_images(self, chunk: Sequence[Any], start: int, settings: DecodingConfig,
                        attention: bool) -> list[ImageCaptions]:
        from captioner.images import pixels_of

        pixels = [pixels_of(item, self.input_size, self.resample) for item in chunk]
        results = [ImageCaptions(image_name(chunk[i], start + i), [], err, warning=warn)
                   for i, (_, warn, err) in enumerate(pixels)]
        good = [i for i, (_, _, err) in enumerate(pixels) if err is None]
        if good:
            feats = self.encode_images(np.stack([pixels[i][0] for i in good]))
            self._decode([results[i] for i in good], feats, settings, attention)
        return results

    def _decode(self, results: list[ImageCaptions], feats: np.ndarray, settings: DecodingConfig,
                attention: bool) -> None:
        """Fill ``results`` (one per row of ``feats``) with captions or the row's error."""
        for result, hyps in zip(results, self.search_rows(feats, decoding=settings), strict=True):
            if isinstance(hyps, str):  # non-finite features or scores: this row only
                result.error = hyps
            else:
                result.captions = [self._text(h) for h in hyps]
        ok = [k for k, r in enumerate(results) if r.captions]
        if attention and ok:
            best = [results[k].captions[0].tokens for k in ok]
            for k, tokens, amap in zip(ok, best, self.attention(feats[ok], best), strict=True):
                results[k].words = self.words(tokens)
                results[k].attention = amap

    def search_bytes(self, settings: DecodingConfig) -> int:
        """Bytes one image adds to a search with ``settings`` (:func:`captioner.memory.search_bytes`)."""
        from captioner.memory import KEY_UNITS, search_bytes

        units = (self.config.decoder.config.get("attention_units") if self.config else None)
        members = getattr(self, "members_count", len(getattr(self, "members", [self])))
        return search_bytes(self.decoder.feature_shape, members, settings.beam_size,
                            len(self.tokenizer.words), units or KEY_UNITS)

    def words(self, tokens: Sequence[int]) -> list[str]:
        """The words of a caption's tokens, then ``<end>`` (one per attention row)."""
        return [self.tokenizer.decode([t]) or "<unk>" for t in tokens] + ["<end>"]


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
        self.decoding = first.decoding
        self.run_dir, self._searched = first.run_dir, True
        self.grounding = first.grounding
        self._encoder, self._encoded = None, False

    def initial_state(self, features: np.ndarray, eager: bool = False) -> list[dict]:
        return [m.initial_state(features, eager) for m in self.members]

    def shared_parts(self, features: np.ndarray, eager: bool = False) -> tuple[dict, Any, Callable]:
        """The members' parts as one: their per-image arrays side by side (``m{i}_keys``; the
        features, alike in every member, once), their per-beam states as a list, and a grouped
        step averaging their log-probs as :func:`captioner.ensemble.mean_step` does."""
        shared, names, beams, steps = {}, [], [], []
        for i, member in enumerate(self.members):
            own, member_beams, grouped = member.shared_parts(features, eager)
            names.append({k: k if k in ACROSS_MEMBERS else f"m{i}_{k}" for k in own})
            for k, name in names[-1].items():
                shared.setdefault(name, own[k])
            beams.append(member_beams)
            steps.append(grouped)

        def step(tokens: np.ndarray, dyn: list, rows: dict):
            outs = [fn(tokens, d, {k: rows[n] for k, n in mine.items()})
                    for fn, d, mine in zip(steps, dyn, names, strict=True)]
            return np.mean([o[0] for o in outs], axis=0), [o[1] for o in outs]

        return shared, beams, step

    def step_function(self, eager: bool = False) -> Callable[[np.ndarray, Any], tuple]:
        return mean_step([m.step_function(eager) for m in self.members])
