"""Test helpers: tiny feature caches and caption files written on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from captioner.features.cache import FeatureReader
from captioner.features.cache_writer import FeatureWriter

WORDS = ["dog", "cat", "runs", "sits", "on", "grass", "the", "red", "ball", "blue", "sofa", "jumps"]


def write_cache(
    path: Path, features: dict[str, np.ndarray], encoder: str = "tiny", layer: str = "pool",
    mirrored: bool = False,
) -> Path:
    """A complete (all rows done) feature cache holding ``features`` (``mirrored``: marked as
    features of mirrored photos, as `captioner extract --mirror` writes)."""
    names = list(features)
    shape = tuple(np.asarray(features[names[0]]).shape)
    attrs = {
        "encoder": encoder,
        "layer": layer,
        "weights": "random",
        "input_size": [32, 32],
        "preprocessing": "tf",
        "feature_shape": list(shape),
        "dtype": "float32",
        "format_version": 1,
        **({"mirrored": True} if mirrored else {}),
    }
    FeatureWriter.create(path, names, shape, "float32", attrs)
    with FeatureWriter(path) as w:
        w.commit(list(range(len(names))), np.stack([features[n] for n in names]), {})
    FeatureReader(path).close()
    return path


def toy_dataset(tmp: Path, n_images: int = 12, spatial: bool = False, seed: int = 0):
    """Images whose captions are a deterministic function of their features.

    Returns (captions file, train cache, val cache, {name: [captions]})."""
    rng = np.random.default_rng(seed)
    captions, feats = {}, {}
    for i in range(n_images):
        name = f"img{i:03d}.jpg"
        a, b, c = WORDS[i % 4], WORDS[2 + i % 3], WORDS[5 + i % 6]
        captions[name] = [f"a {a} {b} on the {c}", f"the {a} {b} on {c}"]
        vec = np.zeros(16, "float32")
        vec[i % 16] = 3.0
        vec += rng.normal(0, 0.05, 16).astype("float32")
        feats[name] = np.tile(vec, (4, 1)).reshape(2, 2, 16) if spatial else vec
    lines = [f"{n}#{k}\t{c}" for n, caps in captions.items() for k, c in enumerate(caps)]
    (tmp / "captions.txt").write_text("\n".join(lines) + "\n")
    names = list(feats)
    write_cache(tmp / "train.h5", feats, layer="conv" if spatial else "pool")
    write_cache(
        tmp / "val.h5",
        {n: feats[n] for n in names[: max(2, n_images // 3)]},
        layer="conv" if spatial else "pool",
    )
    return tmp / "captions.txt", tmp / "train.h5", tmp / "val.h5", captions


# a tiny decoder that learns toy_dataset's captions in a few epochs
TINY_TRAINING = dict(batch_size=8, embed_dim=16, units=32, dropout=0.0, min_count=1,
                     learning_rate=0.02, val_bleu_images=4, patience=0)  # fmt: skip


def train_toy(tmp: Path, spatial: bool = False, epochs: int = 12, seed: int = 0, dataset=None):
    """A merge (``spatial``: attention) run trained on :func:`toy_dataset` (8 images; 6 when
    ``spatial``), or on ``dataset`` (toy_dataset's four values) when given, in ``tmp / "run"``
    (``"run{seed}"`` for another seed).

    Returns a namespace: tmp, caps, features (the train cache), val, run, refs, names."""
    from types import SimpleNamespace

    from captioner.train.training import TrainConfig, train

    if dataset is None:
        dataset = toy_dataset(tmp, n_images=6 if spatial else 8, spatial=spatial)
    caps, train_h5, val_h5, refs = dataset
    config = TrainConfig(captions=str(caps), train_features=str(train_h5), val_features=str(val_h5),
                         out=str(tmp / ("run" if seed == 0 else f"run{seed}")),
                         decoder="attention" if spatial else "merge", epochs=epochs, seed=seed,
                         **TINY_TRAINING)  # fmt: skip
    run = train(config, verbose=0)
    return SimpleNamespace(tmp=tmp, caps=caps, features=train_h5, val=val_h5, run=run, refs=refs,
                           names=list(refs))  # fmt: skip
