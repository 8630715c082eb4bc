"""Captioning with a trained run folder: compiled per-token steps driven by :mod:`decoding`
(one compiled ``step`` per backend, the LSTM state and image terms passed explicitly, so each
token costs one small call instead of a ``model.predict`` on the growing prefix).

:func:`load_captioner` is the one way to open a model (a run folder, a folder listing
``members``, or several folders decoded together); :meth:`Captioner.caption` is the one call
that captions (image files, arrays, PIL images or precomputed features), starting from the
decoding stored with the model (:class:`~captioner.formats.decoding_config.DecodingConfig`) and
overriding single fields. The CLI, ``serve``, ``evaluate``, the Ray engine and training's dev
scores are thin adapters over these two."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner.errors import CaptionerError
from captioner.formats.decoding_config import DecodingConfig
from captioner.formats.run_folder import (
    BEST_WEIGHTS,
    CONFIG_FILE,
    DEFAULT_RUN,
    LAST_WEIGHTS,
    TOKENIZER_FILE,
    RunConfig,
)
from captioner.inference.consensus import Neighbours, rerank
from captioner.inference.decoding import (
    Caption,
    Hypothesis,
    NonFiniteError,
    beam_search,
    greedy_search,
)
from captioner.inference.grounding import Grounding, grounded
from captioner.inference.per_image import indexed_state, indexed_step
from captioner.text.tokenizer import END, PAD, START, UNK, Tokenizer

# What :meth:`captioner.inference.captioner.Captioner.caption` returns per image, the attention
# grid of a feature shape, and the image side of a captioner (:class:`ImageEncoding`).


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
    """The image side of a captioner (mixed into :class:`captioner.inference.captioner.Captioner`): the
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
        from captioner.encoders.specs import get_spec

        return get_spec(self._run_config().encoder.name)

    def encoder(self):
        """The run's own feature model (built once, on first use)."""
        if self._encoder is None:
            from captioner.encoders.weights_source import run_encoder_weights

            enc = self._run_config().encoder
            weights = run_encoder_weights(enc, self.run_dir, self.encoder_spec)
            self._encoder = self.encoder_spec.feature_model(enc.layer, weights)
        return self._encoder

    max_memory: int | None = None  # bytes a batch may take (None: memory.MemoryBudget.default)
    _budget: Any = None

    def memory_budget(self):
        """The :class:`captioner.inference.memory.MemoryBudget` of this captioner's batches."""
        from captioner.inference.memory import MemoryBudget

        if self._budget is None or (self.max_memory and self._budget.limit != self.max_memory):
            self._budget = MemoryBudget(self.max_memory) if self.max_memory else MemoryBudget.default()
        return self._budget

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """Features for decoded RGB images (B, H, W, 3) in [0, 255], in pieces that fit the
        memory budget (:mod:`captioner.inference.memory`)."""
        from captioner.inference.memory import encoder_bytes, pieces

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
        from captioner.formats.run_folder import DEFAULT_RESAMPLE

        return self.config.encoder.resample if self.config else DEFAULT_RESAMPLE

    def encode_paths(
        self, items: Sequence[tuple[Any, str | os.PathLike]], batch_size: int
    ) -> Iterator[tuple[list[Any], np.ndarray | None, dict[Any, str]]]:
        """For ``(key, path)`` items, in batches: the keys read, their features (None when no
        image of the batch could be read) and ``{key: reason}`` for the unreadable ones, through
        the extraction pipeline with the run's own input size and resize method."""
        from functools import partial

        from captioner.encoders.images import load_image
        from captioner.features.extraction import encoded_batches

        load = partial(load_image, size=self.input_size, resample=self.resample)
        yield from encoded_batches(items, self.encode_images, load, batch_size)


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
        self.neighbours: Neighbours | None = None  # the run's neighbour index, when it has one
        self._encoded = False  # whether a batch went through the encoder yet

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike = DEFAULT_RUN, weights: str = "best") -> Captioner:
        """Rebuild the model from its run folder alone (config, read once: tokenizer, weights),
        each file checked against the others first (:mod:`captioner.formats.run_checks`). A folder listing
        ``members`` is an ensemble of its weight files (:class:`EnsembleCaptioner`)."""
        from captioner.formats import run_checks as runcheck
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
        from captioner.model.decoders import load_checked_decoder

        members = [path] + [run_dir / name for name in config.members if weights == "best"]
        if missing := [m for m in members if not m.is_file()]:
            raise CaptionerError(f"{missing[0]} is missing: {config_path} lists it among the "
                                 "ensemble's members; restore it or remove it from members")
        dec = config.decoder
        loaded = [cls(load_checked_decoder(dec.kind, dec.config, m, config_path), tokenizer, config)
                  for m in members]
        grounding = Grounding.from_run(run_dir, config.grounding, tokenizer.words)
        neighbours = Neighbours.from_run(run_dir, config.grounding)
        for captioner in loaded:  # the encoder weights may live there
            captioner.run_dir, captioner.grounding = run_dir, grounding
            captioner.neighbours = neighbours
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
        row's image index (:mod:`captioner.inference.per_image`)."""
        shared, beams, grouped = self.shared_parts(features, eager)
        return indexed_state(beams, len(features)), indexed_step(grouped, shared, len(features),
                                                                 _backend_take)

    def shared_parts(self, features: np.ndarray, eager: bool = False) -> tuple[dict, Any, Callable]:
        """(per-image backend arrays, per-beam numpy state, ``grouped(tokens, beams, shared)``
        step) for ``features`` (B, *F): see :func:`captioner.inference.per_image.indexed_step`."""
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
        if not (d.consensus and self.neighbours is not None):
            return beam_search(step, state, len(features), beam_size=d.beam_size,
                               alpha=d.alpha, n_best=d.n_best, **common)
        found = beam_search(step, state, len(features), beam_size=d.beam_size,
                            alpha=d.alpha, n_best=d.beam_size, **common)  # every beam a candidate
        return self.reranked(features, found, d)

    def reranked(self, features: np.ndarray, found: list[list[Hypothesis]],
                 decoding: DecodingConfig) -> list[list[Hypothesis]]:
        """Each image's candidates ordered by consensus with its training neighbours
        (:mod:`captioner.inference.consensus`), cut to ``decoding.n_best``."""
        texts = [[self.tokenizer.decode(tuple(int(t) for t in h.tokens)) for h in hyps]
                 for hyps in found]
        orders = rerank(self.neighbours, features, texts, [[h.score for h in hyps] for hyps in found],
                        decoding.consensus, decoding.consensus_weight)
        return [[hyps[i] for i in order[: decoding.n_best]]
                for hyps, order in zip(found, orders, strict=True)]

    def ground(self, features: np.ndarray, state: Any, step: Callable,
               decoding: DecodingConfig) -> tuple[Any, Callable]:
        """(state, step) with the object-grounding bonus of ``decoding.grounding`` when the
        model carries an ImageNet head (:mod:`captioner.inference.grounding`), else unchanged."""
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
        from captioner.encoders.images import pixels_of

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
        """Bytes one image adds to a search with ``settings`` (:func:`captioner.inference.memory.search_bytes`)."""
        from captioner.inference.memory import KEY_UNITS, search_bytes

        units = (self.config.decoder.config.get("attention_units") if self.config else None)
        members = getattr(self, "members_count", len(getattr(self, "members", [self])))
        return search_bytes(self.decoder.feature_shape, members, settings.beam_size,
                            len(self.tokenizer.words), units or KEY_UNITS)

    def words(self, tokens: Sequence[int]) -> list[str]:
        """The words of a caption's tokens, then ``<end>`` (one per attention row)."""
        return [self.tokenizer.decode([t]) or "<unk>" for t in tokens] + ["<end>"]


class EnsembleCaptioner(Captioner):
    """Several decoders over one encoder and vocabulary decoded as one model (mean per-step
    log-probabilities, :mod:`captioner.inference.captioner`); encoder and attention maps: the first's."""

    def __init__(self, members: list[Captioner], names: Sequence[Any] = ()):
        first = members[0]
        labels = list(names) if len(names) == len(members) else list(range(len(members)))
        for label, member in zip(labels[1:], members[1:], strict=True):
            check_compatible(first, member, label)
        self.members = members
        self.decoder, self.tokenizer, self.config = first.decoder, first.tokenizer, first.config
        self.decoding = first.decoding
        self.run_dir, self._searched = first.run_dir, True
        # one encoder, so one ImageNet head: any member's (a folder trained before the head
        # existed has none, and must not switch grounding off for the others)
        self.grounding = next((m.grounding for m in members if m.grounding is not None), None)
        self.neighbours = next((m.neighbours for m in members if m.neighbours is not None), None)
        self._encoder, self._encoded = None, False

    def initial_state(self, features: np.ndarray, eager: bool = False) -> list[dict]:
        return [m.initial_state(features, eager) for m in self.members]

    def shared_parts(self, features: np.ndarray, eager: bool = False) -> tuple[dict, Any, Callable]:
        """The members' parts as one: their per-image arrays side by side (``m{i}_keys``; the
        features, alike in every member, once), their per-beam states as a list, and a grouped
        step averaging their log-probs as :func:`captioner.inference.captioner.mean_step` does."""
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


# Compiled per-token decoder steps: one function per Keras backend (``tf.function``,
# ``jax.jit``, or eager PyTorch under ``no_grad``), used by
# :mod:`captioner.inference.captioner`.


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


def to_numpy(tree):
    import keras

    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    return keras.ops.convert_to_numpy(tree)


def log_softmax_step(decoder, tokens, state, shared=None):
    """Log-probabilities and new state of one decoder step (``shared``: the per-image state,
    one row per image block, for :meth:`~captioner.model.decoders.CaptionDecoder.step_shared`)."""
    from keras import ops

    if shared is None:
        logits, new_state = decoder.step(tokens, state)
    else:
        logits, new_state = decoder.step_shared(tokens, state, shared)
    return ops.log_softmax(ops.cast(logits, "float32"), axis=-1), new_state


# Ensembles: several decoders over the same encoder and vocabulary decoded as one model.


def mean_step(steps: list[Callable]) -> Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]:
    """A step running every member's step on its own state and averaging their log-probs."""

    def step(tokens: np.ndarray, state: list):
        outs = [fn(tokens, s) for fn, s in zip(steps, state, strict=True)]
        log_probs = np.mean([o[0] for o in outs], axis=0)  # (B, V), mean over members
        return log_probs, [o[1] for o in outs]

    return step


def check_compatible(first: Any, other: Any, name: Any) -> None:
    """CaptionerError unless captioner ``other`` shares ``first``'s vocabulary and encoder
    features (name, layer and feature shape)."""
    if first.tokenizer.words != other.tokenizer.words:
        raise CaptionerError(f"ensemble member {name} has another vocabulary than the first model")
    a, b = first.config.encoder, other.config.encoder
    for key in ("name", "layer", "feature_shape"):
        if tuple(_listed(getattr(a, key))) != tuple(_listed(getattr(b, key))):
            raise CaptionerError(
                f"ensemble member {name} uses encoder {key} {getattr(b, key)!r}, the first "
                f"model {getattr(a, key)!r}; ensembles need the same image features"
            )


def _listed(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
