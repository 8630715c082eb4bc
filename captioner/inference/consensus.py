"""Consensus reranking: of the beam's captions, keep the one that the training captions of the
most similar training images agree with (the nearest-neighbour consensus of Devlin et al. 2015,
"Exploring Nearest Neighbor Approaches for Image Captioning").

A run folder carries a neighbour index, ``neighbours.npz``: every training image's pooled
feature vector (channel means of the map the decoder reads, unit length), projected on its
``dims`` main directions and stored as int8 codes with one scale per direction, the training
captions (cleaned, as the tokenizer saw them) and CIDEr's document frequencies over them (only
the n-grams of two or more images: a count of 1 weighs as 0 does, and counting them all at
load would cost a second). Its ``config.json`` names it under
``"grounding"``, beside the ImageNet head. At decode time, for each image:

1. the ``k`` training images whose vectors are nearest (cosine) are its neighbours, each
   weighted by ``exp(SHARPNESS * cosine)``;
2. each of the beam's captions gets ``utility`` = the weighted mean over neighbours of its
   CIDEr-D against that neighbour's captions (document frequencies over all index captions);
3. the captions are ordered by ``utility + weight * search score``.

Pure numpy and the standard library: the Keras and ONNX runtimes share it. The neighbour count
and the weight are decoding settings
(:attr:`captioner.formats.decoding_config.DecodingConfig.consensus`).
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captioner.errors import CaptionerError
from captioner.inference.grounding import channel_means
from captioner.text.cider import NGram, TfIdf, cider_matrix, document_frequencies

NEIGHBOURS_FILE = "neighbours.npz"
FORMAT = "captioner.neighbours"
VERSION = 1
DIMS = 192  # measured on Flickr8k dev: 192 int8 directions select as well as all 1,280 floats
SHARPNESS = 20.0  # neighbour weight exp(SHARPNESS * cosine): the nearest count most
REFERENCE_CACHE = 512  # training images whose caption vectors stay built (~8 MB; a service's
# memory stays flat however many photos it captions)
KEYS = ("format", "version", "projection", "codes", "scales", "captions", "caption_image",
        "ngrams", "ngram_counts")


class NeighbourError(CaptionerError):
    """The neighbour index is missing or malformed."""


def pooled(features: np.ndarray) -> np.ndarray:
    """(B, C) unit-length channel means of feature maps (B, H, W, C) or (B, L, C) or (B, C)."""
    x = channel_means(features)  # (B, C)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Neighbours:
    """A neighbour index: ``projection`` (C, D), the training images' ``vectors`` (N, D) and
    their ``captions`` (N lists of cleaned captions)."""

    def __init__(self, projection: np.ndarray, vectors: np.ndarray,
                 captions: Sequence[Sequence[str]], df: Counter[NGram] | None = None):
        self.projection = np.asarray(projection, np.float32)
        vectors = np.asarray(vectors, np.float32)
        self.vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        self.captions = [[" ".join(c.split()) for c in caps] for caps in captions]
        self._df = df  # None: counted from the captions on first use
        self._references = functools.lru_cache(maxsize=REFERENCE_CACHE)(self._vectors)

    @classmethod
    def build(cls, pooled_features: np.ndarray, captions: Sequence[Sequence[str]],
              dims: int = DIMS) -> Neighbours:
        """An index of training images: ``pooled_features`` (N, C) from :func:`pooled`,
        ``captions`` their cleaned captions; the projection keeps the ``dims`` main
        directions (uncentred, so the cosine is kept)."""
        x = np.asarray(pooled_features, np.float32)
        if x.ndim != 2 or len(x) != len(captions) or not len(x):
            raise NeighbourError(f"a neighbour index needs one caption list per feature row, "
                                 f"got {len(x)} rows and {len(captions)} lists")
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        projection = vt[: min(dims, len(vt))].T  # (C, D)
        return cls(projection, x @ projection, captions)

    # ------------------------------------------------------------------ file

    def save(self, path: str | os.PathLike) -> None:
        """Write the index as a compressed ``.npz`` of plain arrays (no pickle)."""
        scales = np.maximum(np.abs(self.vectors).max(axis=0), 1e-12) / 127  # (D,)
        codes = np.round(self.vectors / scales).astype(np.int8)  # (N, D)
        flat = [c for caps in self.captions for c in caps]
        image = np.repeat(np.arange(len(self.captions)), [len(c) for c in self.captions])
        shared = {g: n for g, n in self._frequencies()[0].items() if n > 1}
        np.savez_compressed(
            path, format=np.array(FORMAT), version=np.array(VERSION),
            projection=self.projection.astype(np.float16), codes=codes,
            scales=scales.astype(np.float32), captions=_lines(flat),
            caption_image=image.astype(np.int32),
            ngrams=_lines([" ".join(g) for g in shared]),
            ngram_counts=np.array(list(shared.values()), np.int32))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Neighbours:
        """Read and check an index written by :meth:`save`; a bad file is one line."""
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in KEYS if k not in data.files]
                arrays = {k: data[k] for k in KEYS if k in data.files}
        except (OSError, ValueError, EOFError) as exc:
            raise NeighbourError(f"{path}: cannot read the neighbour index ({exc}); rebuild it "
                                 "with `captioner neighbours` or remove 'neighbours' from "
                                 "config.json") from None
        if missing or str(arrays["format"]) != FORMAT:
            raise NeighbourError(f"{path}: not a neighbour index (missing {missing or 'format'}); "
                                 "rebuild it with `captioner neighbours`")
        if int(arrays["version"]) > VERSION:
            raise NeighbourError(f"{path}: neighbour index version {int(arrays['version'])} is "
                                 "newer than this captioner reads; upgrade captioner")
        return cls(*_checked(path, arrays))

    # ------------------------------------------------------------------ scoring

    def nearest(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows (B, k), cosines (B, k)) of the ``k`` nearest training images, nearest first."""
        x = pooled(features)
        if x.shape[1] != self.projection.shape[0]:
            raise NeighbourError(f"the neighbour index takes {self.projection.shape[0]} "
                                 f"channels, the features have {x.shape[1]}")
        q = x @ self.projection  # (B, D)
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        sims = q @ self.vectors.T  # (B, N)
        k = min(k, sims.shape[1])
        rows = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, rows, 1), axis=1)
        rows = np.take_along_axis(rows, order, 1)
        return rows, np.take_along_axis(sims, rows, 1)

    def utility(self, captions: Sequence[str], rows: np.ndarray, sims: np.ndarray) -> np.ndarray:
        """(len(captions),) similarity-weighted mean CIDEr-D of each caption against the
        captions of the neighbours ``rows`` (k,) with cosines ``sims`` (k,)."""
        df, log_images = self._frequencies()
        weights = np.exp(SHARPNESS * (sims - sims.max()))
        weights /= weights.sum()
        hyps = [TfIdf(c.split(), df, log_images) for c in captions]
        groups = [self._references(int(row)) for row in rows]
        pairs = cider_matrix(hyps, [r for refs in groups for r in refs])  # (C, all captions)
        per = np.zeros((len(captions), len(rows)))  # (C, k): mean CIDEr-D per neighbour
        start = 0
        for j, refs in enumerate(groups):
            if refs:
                per[:, j] = 10.0 * pairs[:, start : start + len(refs)].mean(axis=1)
            start += len(refs)
        return per @ weights

    def _frequencies(self) -> tuple[Counter[NGram], float]:
        """CIDEr's document frequencies over the index's images, and log(#images)."""
        if self._df is None:
            self._df = document_frequencies(self.captions)
        return self._df, math.log(max(len(self.captions), 2))

    def _vectors(self, row: int) -> list[TfIdf]:
        """The TF-IDF vectors of training image ``row``'s captions."""
        df, log_images = self._frequencies()
        return [TfIdf(c.split(), df, log_images) for c in self.captions[row]]

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, settings: Any) -> Neighbours | None:
        """The index a run folder carries (``settings``: its config's ``"grounding"``), or None."""
        if not isinstance(settings, dict) or not settings.get("neighbours"):
            return None
        return cls.load(Path(run_dir) / str(settings["neighbours"]))


def _lines(texts: Sequence[str]) -> np.ndarray:
    """Texts as one uint8 array of UTF-8, one per line (plain arrays load without pickle)."""
    return np.frombuffer("\n".join(texts).encode("utf-8"), np.uint8)


def _unlines(array: np.ndarray, count: int) -> list[str] | None:
    """The ``count`` texts of :func:`_lines`, or None when they are not that."""
    if array.dtype != np.uint8 or array.ndim != 1:
        return None
    try:
        texts = array.tobytes().decode("utf-8").split("\n") if count else []
    except UnicodeDecodeError:
        return None
    return texts if len(texts) == count else None


def _checked(path: Any, a: dict[str, np.ndarray]) -> tuple:
    """(projection, vectors, captions per image, document frequencies) of a loaded index, or
    one NeighbourError line."""
    proj, codes, scales, image = a["projection"], a["codes"], a["scales"], a["caption_image"]
    counts = a["ngram_counts"]
    n = len(codes)
    ok = (proj.ndim == 2 and proj.dtype.kind == "f" and np.isfinite(proj).all()
          and codes.ndim == 2 and codes.dtype == np.int8 and codes.shape[1] == proj.shape[1]
          and scales.shape == (proj.shape[1],) and np.isfinite(scales).all() and n > 0
          and image.ndim == 1 and image.dtype.kind == "i"
          and (image.size == 0 or (image.min() >= 0 and image.max() < n))
          and counts.ndim == 1 and counts.dtype.kind == "i" and (counts > 1).all())
    texts = _unlines(a["captions"], image.size) if ok else None
    grams = _unlines(a["ngrams"], counts.size) if ok else None
    if texts is None or grams is None:
        raise NeighbourError(f"{path}: the neighbour index's arrays do not fit together; "
                             "rebuild it with `captioner neighbours`")
    captions: list[list[str]] = [[] for _ in range(n)]
    for text, row in zip(texts, image.tolist(), strict=True):
        captions[row].append(text)
    df = Counter(dict(zip((tuple(g.split(" ")) for g in grams), counts.tolist(), strict=True)))
    return proj, codes.astype(np.float32) * scales, captions, df


def rerank(neighbours: Neighbours, features: np.ndarray, texts: Sequence[Sequence[str]],
           scores: Sequence[Sequence[float]], k: int, weight: float) -> list[list[int]]:
    """Per image, the order of its candidates (``texts[b]``, search ``scores[b]``) by
    ``utility + weight * score``, best first; ``features`` (B, ...) are the images'."""
    rows, sims = neighbours.nearest(features, k)
    orders = []
    for b, (captions, found) in enumerate(zip(texts, scores, strict=True)):
        if len(captions) < 2:
            orders.append(list(range(len(captions))))
            continue
        total = neighbours.utility(captions, rows[b], sims[b]) + weight * np.asarray(found)
        orders.append([int(i) for i in np.argsort(-total, kind="stable")])
    return orders

