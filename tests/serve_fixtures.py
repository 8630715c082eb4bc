"""Shared by the ``captioner serve`` tests: a tiny attention run whose "encoder" maps photo k
(red level 40*k) to feature row k, so every photo has a known caption."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from helpers import WORDS
from PIL import Image

from captioner.inference.captioner import Captioner
from captioner.serve.engine import Engine
from captioner.text.tokenizer import Tokenizer

N_IMAGES = 6


def tiny_attention_run(tmp: Path) -> tuple[Path, np.ndarray, list[str]]:
    """(run folder, feature table (N, 2, 2, 16), caption of photo k).

    The decoder is untrained (seeded random weights): the tests compare the service with the
    :class:`Captioner` itself. The first seed whose captions are all different and non-empty
    is kept (the backends draw different weights), so a mix-up of photos would show."""
    table = np.random.default_rng(0).normal(0, 2.0, (N_IMAGES, 2, 2, 16)).astype("float32")
    for seed in range(1, 30):
        run = tmp / f"run{seed}"
        _write_run(run, seed)
        captioner = Captioner.from_run(run, weights="last")
        expected = [c[0].text for c in captioner.caption_features(table, beam_size=3)]
        if len(set(expected)) == N_IMAGES and all(expected):
            return run, table, expected
    raise AssertionError(f"no seed gave {N_IMAGES} different captions")


def _write_run(run: Path, seed: int) -> None:
    """A run folder (config, tokenizer, weights) of a tiny random attention decoder."""
    import keras

    from captioner.model.decoders import build_decoder

    keras.utils.set_random_seed(seed)
    tokenizer = Tokenizer(WORDS, [1] * len(WORDS), max_length=8)
    decoder_config = {"vocab_size": tokenizer.vocab_size, "max_length": 8,
                      "feature_shape": [2, 2, 16], "embed_dim": 16, "units": 32, "dropout": 0.0,
                      "attention_units": 16}
    run.mkdir()
    decoder = build_decoder("attention", **decoder_config)
    decoder.set_weights([2.0 * w for w in decoder.get_weights()])  # sharper, more varied words
    decoder.save_weights(run / "last.weights.h5")
    tokenizer.save(run / "tokenizer.json")
    config = {"format": "captioner.run", "version": 1,
              "decoder": {"kind": "attention", "config": decoder_config},
              "encoder": {"name": "tiny", "layer": "conv", "weights": "random",
                          "input_size": [32, 32], "feature_shape": [2, 2, 16]}}
    (run / "config.json").write_text(json.dumps(config))


class FakeEncoder:
    """An encoder model whose features are row k of ``table`` for photo k (red level 40*k of
    pixel (0, 0)); stands in for :meth:`Captioner.encoder`'s Keras model."""

    def __init__(self, table: np.ndarray):
        self.table = table

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        rows = np.rint(np.asarray(images)[:, 0, 0, 0] / 40.0).astype(int)
        return self.table[rows]

    def __call__(self, images, training: bool = False) -> np.ndarray:
        """Eager call (the Captioner's first small batch), as a Keras model."""
        import keras

        return self.predict_on_batch(keras.ops.convert_to_numpy(images))


def tiny_engine(run: Path, table: np.ndarray) -> Engine:
    captioner = Captioner.from_run(run, weights="last")
    captioner.encoder = lambda: FakeEncoder(table)  # the instance's own "feature model"
    return Engine(captioner, run)


def photo(k: int, fmt: str = "PNG", size: tuple[int, int] = (40, 30)) -> bytes:
    """Photo k: one colour whose red level is 40*k."""
    out = io.BytesIO()
    Image.new("RGB", size, (40 * k, 90, 160)).save(out, fmt)
    return out.getvalue()
