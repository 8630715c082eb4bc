"""Building a run's neighbour index from its training cache and captions (the index itself, its
file and its use at decode time: :mod:`captioner.inference.consensus`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captioner.inference.consensus import DIMS, NEIGHBOURS_FILE, Neighbours, pooled
from captioner.train.batches import read_features

CHUNK = 256  # images read at a time: the cache never has to fit in memory


def pooled_rows(reader: Any, names: Sequence[str], chunk: int = CHUNK) -> np.ndarray:
    """(N, C) :func:`~captioner.inference.consensus.pooled` vectors of ``names`` in a cache."""
    return np.concatenate([pooled(read_features(reader, names[start : start + chunk]))
                           for start in range(0, len(names), chunk)])


def attach(run_dir: str | os.PathLike, reader: Any, captions: dict[str, list[str]],
           config: Any = None, dims: int = DIMS) -> Path:
    """Give a run folder a neighbour index of ``captions`` (image -> cleaned captions) over
    their features in ``reader`` (the run's training cache), written into the folder and named
    in its ``config.json`` (``config``: the folder's RunConfig when the caller holds it)."""
    from captioner.formats.run_folder import RunConfig
    from captioner.storage.files import sha256sum

    run = Path(run_dir)
    config = config if config is not None else RunConfig.load(run)
    names = sorted(captions)
    index = Neighbours.build(pooled_rows(reader, names), [captions[n] for n in names], dims)
    index.save(run / NEIGHBOURS_FILE)
    config.grounding = {**config.grounding, "neighbours": NEIGHBOURS_FILE}
    if config.files:  # a folder whose files are listed lists this one too
        config.files[NEIGHBOURS_FILE] = {"size": (run / NEIGHBOURS_FILE).stat().st_size,
                                         "sha256": sha256sum(run / NEIGHBOURS_FILE)}
    config.save(run)
    return run / NEIGHBOURS_FILE
