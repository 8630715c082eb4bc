"""Training batches from cached image features and tokenised captions.

:class:`CaptionDataset` is the loader used for training: teacher forcing, one
``(image, caption)`` pair per sample, padding masked out through ``sample_weight``. (The
classic tutorial's generator, the benchmark baseline, lives in ``benchmarks/progressive.py``.)

Feature sources are duck-typed (:class:`FeatureSource`): ``read(names)`` and
``feature_shape``; the HDF5 ``FeatureReader`` fits, and so does a small in-memory fake.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import keras
import numpy as np

from captioner.errors import CaptionerError
from captioner.text.tokenizer import Tokenizer

READ_CHUNK = 1024  # images per read() when loading everything into RAM
MIRRORED_WORDS = (("left", "right"),)  # swapped in a caption read with the mirrored image
BUCKET_WINDOW = 50  # batches per window whose samples are sorted by length when bucketing
LENGTH_STEP = 4  # bucketed batches are trimmed to a multiple of this many steps


@runtime_checkable
class FeatureSource(Protocol):
    """Where image features come from.

    ``read(names)`` returns one row per name, in the given order, shaped
    ``(len(names), *feature_shape)``. ``feature_shape`` is ``(D,)`` (pooled vector), ``(L, D)``
    or ``(H, W, D)`` (spatial; batches flatten it to ``(H*W, D)``).

    Optional extras the loaders use when present: ``name in source`` (checked for every image
    up front) and ``prefers_sorted = True`` (batches then ask for their names in sorted order).
    """

    feature_shape: tuple[int, ...]

    def read(self, names: Sequence[str]) -> np.ndarray:
        """Feature rows for ``names``, in that order."""
        ...


def flat_feature_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Per-image shape as batches carry it: ``(H, W, D)`` -> ``(H*W, D)``, others unchanged."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        return (shape[0] * shape[1], shape[2])
    if len(shape) in (1, 2):
        return shape
    raise CaptionerError(
        f"feature shape {shape} is not supported; expected (D,), (L, D) or (H, W, D)"
    )


def check_features(features: FeatureSource, names: Sequence[str],
                   fix: str = "run `captioner extract` on those images or drop them from the "
                              "split") -> None:
    """CaptionerError naming the first image the source has no features for (if it can tell),
    and ``fix``, what to do about it."""
    if not hasattr(features, "__contains__"):
        return
    missing = [name for name in names if name not in features]
    if missing:
        raise CaptionerError(
            f"no cached features for {len(missing)} of {len(names)} image(s), e.g. "
            f"{missing[0]!r}; {fix}"
        )


def read_features(features: FeatureSource, names: Sequence[str]) -> np.ndarray:
    """``features.read(names)`` as float32 ``(len(names), *flat_feature_shape)``, asking in
    sorted order when the source prefers it and returning rows in the order of ``names``."""
    shape = flat_feature_shape(features.feature_shape)
    names = list(names)
    order = None
    if getattr(features, "prefers_sorted", False):
        order = sorted(range(len(names)), key=names.__getitem__)
        names = [names[i] for i in order]
    try:
        rows = np.asarray(features.read(names), dtype=np.float32)
    except KeyError as exc:
        missing = exc.args[0] if exc.args else names[0]
        raise CaptionerError(
            f"no cached features for image {missing!r}; run `captioner extract` on it"
        ) from None
    if rows.shape[:1] != (len(names),) or rows.shape[1:] not in (
        tuple(features.feature_shape),
        shape,
    ):
        raise CaptionerError(
            f"feature source returned shape {rows.shape} for {len(names)} image(s); "
            f"expected {(len(names), *features.feature_shape)}"
        )
    rows = rows.reshape(len(names), *shape)
    if order is not None:
        unsorted = np.empty_like(rows)
        unsorted[order] = rows
        rows = unsorted
    return rows


class CaptionDataset(keras.utils.PyDataset):
    """Teacher-forcing batches: one sample per (image, caption) pair.

    ``dataset[i]`` is ``((features (B, *F) float32, tokens_in (B, T-1) int32), tokens_out
    (B, T-1) int32, sample_weight (B, T-1) float32)`` with ``T = tokenizer.max_length``,
    ``tokens_in = tokens[:, :-1]``, ``tokens_out = tokens[:, 1:]`` and
    ``sample_weight = tokens_out != 0``, so padding never counts in the loss.

    Memory held: the token ids ``(N, T)`` int32 plus two int32 index arrays of length N (image
    of each sample, sample order), whatever the feature size; features are read per batch
    (each image once) unless ``in_memory=True`` loads them all up front.

    Order: with ``shuffle``, epoch ``e`` uses a permutation drawn from ``(seed, e)``. The epoch
    advances in :meth:`on_epoch_end`, but only once every batch of it was served after an
    :meth:`on_epoch_begin`: ``model.fit`` calls ``on_epoch_end`` once before its first epoch
    (TensorFlow), or after peeking at one batch to build the model (JAX); neither counts. Call
    :meth:`set_epoch` to resume mid-training with the same orders. Do not pass
    ``steps_per_epoch`` to ``fit``: Keras then prefetches the next epoch before reshuffling.

    Mirroring: with a ``mirrored`` source (the same images' features, extracted from their
    left-right mirrored photos), each sample of a shuffled epoch reads the mirrored features
    with probability one half, drawn from ``(seed, epoch)`` too, and its caption then says
    "right" for "left" and back (:data:`MIRRORED_WORDS`).
    """

    def __init__(
        self,
        features: FeatureSource,
        captions: Mapping[str, Sequence[str]],
        tokenizer: Tokenizer,
        batch_size: int = 64,
        shuffle: bool = True,
        seed: int = 0,
        in_memory: bool = False,
        bucket: bool = False,
        pad_to: int = 1,
        mirrored: FeatureSource | None = None,
        **kwargs,
    ) -> None:
        """``captions``: image name -> cleaned captions. ``bucket``: batch captions of similar
        length together and trim each batch to its longest caption (rounded up to
        ``LENGTH_STEP``), so no work is spent on padding. ``pad_to``: every batch's size is
        made a multiple of it (for data-parallel devices) by repeating its last sample with
        weight 0. ``mirrored``: features of the mirrored photos (see above; shuffled datasets
        only). ``kwargs`` go to ``PyDataset`` (``workers``, ``use_multiprocessing``,
        ``max_queue_size``)."""
        super().__init__(**kwargs)
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.features = features
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.pad_to = max(1, int(pad_to))
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.bucket = bool(bucket)
        self.feature_shape = flat_feature_shape(features.feature_shape)
        self.names = [name for name, caps in captions.items() if len(caps)]
        texts = [caption for name in self.names for caption in captions[name]]
        if not texts:
            raise CaptionerError("no captions to train on; check the caption file and the split")
        counts = [len(captions[name]) for name in self.names]
        self.image_index = np.repeat(np.arange(len(self.names), dtype=np.int32), counts)
        self.tokens = tokenizer.encode_batch(texts)
        check_features(features, self.names)
        self.mirrored = self._checked_mirror(mirrored)
        self._mirror_epoch: tuple[int, np.ndarray | None] = (-1, None)
        self.mirror_tokens = mirror_words(self.tokens, tokenizer) if self.mirrored else None
        self._table = self._load_all(features) if in_memory else None
        self._mirror_table = self._load_all(self.mirrored) if in_memory and self.mirrored else None
        self.epoch = 0
        self._order: np.ndarray | None = None
        self._in_epoch = False
        self._orders: dict[int, np.ndarray] = {}
        self.set_epoch(0)

    @property
    def num_samples(self) -> int:
        """Number of (image, caption) pairs."""
        return int(self.tokens.shape[0])

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range (0..{len(self) - 1})")
        self._served.add(index)
        return self._make_batch(self._order, index, self._mirrors)

    def epoch_batch(self, epoch: int, index: int):
        """Batch ``index`` of epoch ``epoch``: a pure function of (seed, epoch, index)."""
        return self._make_batch(self._order_for(epoch), index, self._mirrors_for(epoch))

    def _checked_mirror(self, mirrored: FeatureSource | None) -> FeatureSource | None:
        if mirrored is None:
            return None
        if not self.shuffle:
            raise CaptionerError("mirrored features augment training batches; a dataset read "
                                 "in order (validation) takes none")
        if flat_feature_shape(mirrored.feature_shape) != self.feature_shape:
            raise CaptionerError(f"the mirrored features have shape {tuple(mirrored.feature_shape)}"
                                 f", the training features {tuple(self.features.feature_shape)}; "
                                 "extract both with the same encoder and layer")
        check_features(mirrored, self.names)
        return mirrored

    def _mirrors_for(self, epoch: int) -> np.ndarray | None:
        """(N,) bool: the samples that read the mirrored view in ``epoch`` (None: no mirror)."""
        if self.mirrored is None:
            return None
        if self._mirror_epoch[0] != epoch:  # drawn once per epoch, not once per batch
            draw = np.random.default_rng((self.seed, epoch, 1)).random(self.num_samples) < 0.5
            self._mirror_epoch = (epoch, draw)
        return self._mirror_epoch[1]

    def _order_for(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return self._bucketed(np.arange(self.num_samples), None) if self.bucket else None
        cached = self._orders.get(epoch)
        if cached is None:
            rng = np.random.default_rng((self.seed, epoch))
            cached = rng.permutation(self.num_samples).astype(np.int32)
            if self.bucket:
                cached = self._bucketed(cached, rng)
            self._orders = {epoch: cached, **{k: v for k, v in self._orders.items() if k > epoch - 2}}
        return cached

    def _bucketed(self, order: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """``order`` with samples sorted by length inside windows of ``BUCKET_WINDOW`` batches,
        then whole batches shuffled (the last, possibly short, batch stays last), except that
        the batch of longest captions comes first and the one of shortest captions second."""
        window = self.batch_size * BUCKET_WINDOW
        parts = [order[i : i + window] for i in range(0, len(order), window)]
        lengths = (self.tokens != 0).sum(axis=1)  # (N,) incl. start/end; not kept in memory
        order = np.concatenate([p[np.argsort(lengths[p], kind="stable")] for p in parts])
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        full = len(order) // self.batch_size
        picks = list(rng.permutation(full) if rng is not None else range(full))
        if full >= 2:  # longest batch first (memory peaks at once), shortest second, so
            # frameworks that read a signature off the first two batches see lengths vary
            longest = [int(lengths[b].max()) for b in batches[:full]]
            first, second = int(np.argmax(longest)), int(np.argmin(longest))
            if first != second:
                picks = [first, second] + [i for i in picks if i not in (first, second)]
        return np.concatenate([batches[i] for i in picks] + batches[full:]).astype(np.int32)

    def _make_batch(self, order: np.ndarray | None, index: int, mirrors: np.ndarray | None):
        start, stop = index * self.batch_size, min((index + 1) * self.batch_size, self.num_samples)
        rows = np.arange(start, stop) if order is None else order[start:stop]
        real = len(rows)
        if real % self.pad_to:  # repeat the last sample, with weight 0 below
            rows = np.concatenate([rows, np.repeat(rows[-1:], self.pad_to - real % self.pad_to)])
        flip = mirrors[rows] if mirrors is not None else None  # (B,) bool
        tokens = self.tokens[rows] if flip is None else np.where(
            flip[:, None], self.mirror_tokens[rows], self.tokens[rows])
        if self.bucket:  # trim to the longest caption, rounded up to LENGTH_STEP steps + 1
            longest = int((tokens != 0).sum(axis=1).max())
            steps = -(-(longest - 1) // LENGTH_STEP) * LENGTH_STEP
            tokens = tokens[:, : min(steps + 1, tokens.shape[1])]
        tokens_in = np.ascontiguousarray(tokens[:, :-1])
        tokens_out = np.ascontiguousarray(tokens[:, 1:])
        weights = (tokens_out != 0).astype(np.float32)
        weights[real:] = 0.0
        features = self._batch_features(self.image_index[rows], flip)
        return (features, tokens_in), tokens_out, weights

    def set_epoch(self, epoch: int) -> None:
        """Use the sample order of ``epoch`` from now on (deterministic from seed and epoch)."""
        self.epoch = int(epoch)
        self._order = self._order_for(self.epoch)
        self._mirrors = self._mirrors_for(self.epoch)
        self._served: set[int] = set()  # batches of this epoch handed out so far

    def on_epoch_begin(self) -> None:
        self._in_epoch = True

    def on_epoch_end(self) -> None:
        """Advance to the next epoch's order (ignored unless a whole epoch was served)."""
        if self._in_epoch and len(self._served) >= len(self):
            self._in_epoch = False
            self.set_epoch(self.epoch + 1)

    def _batch_features(self, image_rows: np.ndarray, flip: np.ndarray | None) -> np.ndarray:
        """(B, *F) features of ``image_rows``, from the mirrored source where ``flip``."""
        if flip is None or not flip.any():
            return self._view(self.features, self._table, image_rows)
        out = np.empty((len(image_rows), *self.feature_shape), dtype=np.float32)
        out[~flip] = self._view(self.features, self._table, image_rows[~flip])
        out[flip] = self._view(self.mirrored, self._mirror_table, image_rows[flip])
        return out

    def _view(self, source: FeatureSource, table: np.ndarray | None,
              image_rows: np.ndarray) -> np.ndarray:
        if table is not None:
            return table[image_rows]
        if not len(image_rows):  # every sample of the batch reads the other view
            return np.empty((0, *self.feature_shape), dtype=np.float32)
        unique, inverse = np.unique(image_rows, return_inverse=True)
        rows = read_features(source, [self.names[i] for i in unique])
        return rows[inverse.reshape(-1)]

    def _load_all(self, source: FeatureSource) -> np.ndarray:
        table = np.empty((len(self.names), *self.feature_shape), dtype=np.float32)
        for start in range(0, len(self.names), READ_CHUNK):
            chunk = self.names[start : start + READ_CHUNK]
            table[start : start + len(chunk)] = read_features(source, chunk)
        return table


def mirror_words(tokens: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """``tokens`` (N, T) with the ids of each pair in :data:`MIRRORED_WORDS` exchanged (pairs
    whose words are not both in the vocabulary stay as they are)."""
    swap = np.arange(tokenizer.vocab_size, dtype=tokens.dtype)  # (V,) id -> id
    for a, b in MIRRORED_WORDS:
        if a in tokenizer.index and b in tokenizer.index:
            i, j = tokenizer.index[a], tokenizer.index[b]
            swap[i], swap[j] = j, i
    return swap[tokens]


class EpochStream(keras.utils.PyDataset):
    """An endless, prefetch-safe view of a :class:`CaptionDataset` for ``model.fit``.

    Keras starts prefetching the next epoch before it calls ``on_epoch_end``, so a dataset that
    reshuffles in ``on_epoch_end`` races with the prefetch thread. Here batch ``i`` is batch
    ``i % n`` of epoch ``start_epoch + i // n`` — a pure function of its index — so the batches
    are the same whatever the timing, and resuming at ``start_epoch`` reproduces them. Use with
    ``fit(..., steps_per_epoch=len(dataset), shuffle=False)``.
    """

    def __init__(self, dataset: CaptionDataset, start_epoch: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dataset = dataset
        self.start_epoch = int(start_epoch)

    @property
    def num_batches(self) -> None:
        return None  # endless: Keras keeps one iterator across epochs

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        epoch, batch = divmod(int(index), len(self.dataset))
        return self.dataset.epoch_batch(self.start_epoch + epoch, batch)
