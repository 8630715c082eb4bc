"""A run folder written without training (random weights): for loader and robustness tests."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import WORDS

from captioner.storage.files import sha256sum
from captioner.text.tokenizer import Tokenizer


def make_run(
    folder: Path, kind: str = "merge", feature_shape: tuple[int, ...] = (16,), seed: int = 0
) -> Path:
    """``folder`` holding config.json (the first release's layout), tokenizer.json and
    best.weights.h5 of an untrained ``kind`` decoder over ``feature_shape`` features."""
    import keras

    from captioner.model.decoders import build_decoder
    from captioner.text.cleaning import DEFAULT_RULES

    keras.utils.set_random_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.build([" ".join(WORDS)], min_count=1, max_length=8)
    tok.save(folder / "tokenizer.json")
    config = {
        "vocab_size": tok.vocab_size,
        "max_length": tok.max_length,
        "feature_shape": list(feature_shape),
        "embed_dim": 8,
        "units": 8,
        "dropout": 0.0,
    }
    if kind == "attention":
        config |= {"attention_units": 8}
    decoder = build_decoder(kind, **config)
    decoder.save_weights(folder / "best.weights.h5")
    layer = "conv" if len(feature_shape) == 3 else "pool"
    payload = {
        "format": "captioner.run",
        "version": 1,
        "decoder": {"kind": kind, "config": config},
        "encoder": {
            "name": "tiny",
            "layer": layer,
            "weights": "random",
            "input_size": [32, 32],
            "preprocessing": "tf",
            "feature_shape": list(feature_shape),
        },
        "cleaning": DEFAULT_RULES.to_dict(),
        "training": {},
        "train_images": 0,
        "seed": seed,
        "versions": {},
        "created": "2026-01-01T00:00:00+0000",
    }
    payload["files"] = {
        name: {"size": (folder / name).stat().st_size, "sha256": sha256sum(folder / name)}
        for name in ("tokenizer.json", "best.weights.h5")
    }
    (folder / "config.json").write_text(json.dumps(payload, indent=2))
    return folder
