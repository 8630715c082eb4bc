"""BENCHMARK BASELINE ONLY: the classic tutorial's "progressive loading" generator.

Measured against :class:`captioner.train.batches.CaptionDataset` by ``bench_train.py``; not part of the
package, since nothing trains with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from captioner.text.tokenizer import Tokenizer
from captioner.train.batches import FeatureSource, check_features, flat_feature_shape, read_features


class ProgressiveLoader:
    """BENCHMARK BASELINE ONLY: the classic tutorial's "progressive loading" generator.

    One step per photo: every caption prefix is its own sample, ``X1`` the photo's features
    repeated, ``X2`` the prefix left-padded with 0 to ``max_length - 1`` (like
    ``pad_sequences``' default), ``y`` the ONE-HOT next word (``vocab_size`` floats). It exists
    to measure what :class:`CaptionDataset` saves; do not train with it. Use as
    ``model.fit(loader.generate(), steps_per_epoch=loader.steps_per_epoch)``.
    """

    def __init__(
        self,
        features: FeatureSource,
        captions: Mapping[str, Sequence[str]],
        tokenizer: Tokenizer,
    ) -> None:
        self.features = features
        self.tokenizer = tokenizer
        self.captions = {name: list(caps) for name, caps in captions.items() if len(caps)}
        self.names = list(self.captions)
        self.feature_shape = flat_feature_shape(features.feature_shape)
        check_features(features, self.names)

    @property
    def steps_per_epoch(self) -> int:
        """One step per photo."""
        return len(self.names)

    def photo_arrays(self, name: str) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        """``((X1 (S, *F) float32, X2 (S, max_length-1) int32), y (S, vocab_size) float32)``.

        The inputs are a tuple (the tutorial yields a list, which Keras 3's generator adapter
        rejects); the arrays are the tutorial's."""
        width = self.tokenizer.max_length - 1
        prefixes, targets = [], []
        for caption in self.captions[name]:
            seq = self.tokenizer.encode(caption)
            for i in range(1, len(seq)):
                prefixes.append(seq[:i])
                targets.append(seq[i])
        x2 = np.zeros((len(prefixes), width), dtype=np.int32)
        for row, prefix in enumerate(prefixes):
            x2[row, width - len(prefix) :] = prefix
        y = np.zeros((len(targets), self.tokenizer.vocab_size), dtype=np.float32)
        y[np.arange(len(targets)), targets] = 1.0
        photo = read_features(self.features, [name])
        x1 = np.repeat(photo, len(prefixes), axis=0)
        return (x1, x2), y

    def generate(self) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], np.ndarray]]:
        """Yield :meth:`photo_arrays` for each photo in turn, forever."""
        while True:
            for name in self.names:
                yield self.photo_arrays(name)

    def __iter__(self) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], np.ndarray]]:
        return self.generate()
