"""CIDEr's n-gram TF-IDF vectors and their similarity (Vedantam et al. 2015): the one
implementation behind the CIDEr-D score of reports (:mod:`captioner.evaluation.metrics`), the
self-critical reward and consensus reranking (:mod:`captioner.inference.consensus`). Standard
library (numpy for :func:`cider_matrix`); captions are already-cleaned strings split on
whitespace."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

References = dict[str, list[str]]

NGram = tuple[str, ...]
CIDER_N = 4
CIDER_SIGMA = 6.0


def ngrams(words: list[str], n_max: int = CIDER_N) -> Counter[NGram]:
    """Counts of every 1..n_max-gram of ``words``."""
    counts: Counter[NGram] = Counter()
    for n in range(1, n_max + 1):
        for start in range(len(words) - n + 1):
            counts[tuple(words[start : start + n])] += 1
    return counts


def document_frequencies(caption_sets: Iterable[Sequence[str]]) -> Counter[NGram]:
    """In how many of the sets (an image's captions) each 1..4-gram occurs: CIDEr's df."""
    df: Counter[NGram] = Counter()
    for captions in caption_sets:
        df.update({gram for caption in captions for gram in ngrams(caption.split())})
    return df


class TfIdf:
    """TF-IDF vectors of one caption, one per n-gram order, with their Euclidean norms."""

    __slots__ = ("length", "norms", "vectors")

    def __init__(self, words: list[str], df: Counter[NGram], log_images: float) -> None:
        # pycocoevalcap counts bigrams (words - 1): the same length differences where it matters
        self.length = len(words)
        self.vectors: list[dict[NGram, float]] = [{} for _ in range(CIDER_N)]
        for gram, tf in ngrams(words).items():
            self.vectors[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, df[gram])))
        self.norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in self.vectors]


def cider_pair(hyp: TfIdf, ref: TfIdf) -> float:
    """Mean over n of the clipped cosine similarity, times the Gaussian length penalty."""
    penalty = math.exp(-((hyp.length - ref.length) ** 2) / (2 * CIDER_SIGMA**2))
    total = 0.0
    for h_vec, r_vec, h_norm, r_norm in zip(
        hyp.vectors, ref.vectors, hyp.norms, ref.norms, strict=True
    ):
        if h_norm == 0.0 or r_norm == 0.0:
            continue
        dot = sum(min(w, r_vec[g]) * r_vec[g] for g, w in h_vec.items() if g in r_vec)
        total += dot / (h_norm * r_norm)
    return penalty * total / CIDER_N


def cider_matrix(hyps: Sequence[TfIdf], refs: Sequence[TfIdf]):
    """(len(hyps), len(refs)) numpy array of :func:`cider_pair` for every pair, computed over
    the hypotheses' n-grams at once (the same numbers, to rounding)."""
    import numpy as np

    total = np.zeros((len(hyps), len(refs)))
    for n in range(CIDER_N):
        index = {g: i for i, g in enumerate({g for h in hyps for g in h.vectors[n]})}
        if not index:
            continue
        h_mat = np.zeros((len(hyps), len(index)))  # (H, G): the hypotheses' weights
        for row, hyp in enumerate(hyps):
            for gram, weight in hyp.vectors[n].items():
                h_mat[row, index[gram]] = weight
        r_mat = np.zeros((len(refs), len(index)))  # (R, G): the references' weights there
        for row, ref in enumerate(refs):
            for gram, weight in ref.vectors[n].items():
                if (col := index.get(gram)) is not None:
                    r_mat[row, col] = weight
        dots = (np.minimum(h_mat[:, None], r_mat[None]) * r_mat[None]).sum(axis=-1)  # (H, R)
        norms = np.outer([h.norms[n] for h in hyps], [r.norms[n] for r in refs])
        total += np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    gap = np.subtract.outer([h.length for h in hyps], [r.length for r in refs])
    return np.exp(-(gap**2) / (2 * CIDER_SIGMA**2)) * total / CIDER_N


class CiderScorer:
    """CIDEr-D of new captions against fixed references, with document frequencies taken once
    from all of ``references`` (e.g. the training split) — the reward of self-critical training.
    """

    def __init__(self, references: References) -> None:
        self.references = references
        self.df = document_frequencies(references.values())
        self.log_images = math.log(max(len(references), 2))
        self._refs: dict[str, list[TfIdf]] = {}

    def score(self, image: str, captions: list[str]) -> list[float]:
        """CIDEr-D of each caption in ``captions`` against the references of ``image``."""
        refs = self._refs.get(image)
        if refs is None:
            refs = [TfIdf(r.split(), self.df, self.log_images) for r in self.references[image]]
            self._refs[image] = refs
        scores = []
        for caption in captions:
            hyp = TfIdf(caption.split(), self.df, self.log_images)
            scores.append(10.0 * sum(cider_pair(hyp, ref) for ref in refs) / len(refs))
        return scores
