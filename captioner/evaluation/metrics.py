"""Caption metrics: corpus BLEU-1..4, CIDEr-D, ROUGE-L, diversity (METEOR: ``evaluation/meteor.py``).

Every function takes already-cleaned captions and splits them on whitespace:
``references`` maps image id -> list of reference captions, ``hypotheses`` maps image id ->
one generated caption. Both must hold the same ids. numpy + nltk only; CIDEr-D and ROUGE-L
follow the papers and agree with pycocoevalcap (a test-only dependency) to 1e-6.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from typing import Any

from captioner.text.cider import TfIdf, cider_pair, document_frequencies

References = dict[str, list[str]]
Hypotheses = dict[str, str]

BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
# the scores every report shows; METEOR (1.5, coco-caption's jar) comes from captioner.evaluation.meteor
METRIC_KEYS = (*BLEU_KEYS, "CIDEr-D", "ROUGE-L", "METEOR")
# Cumulative uniform weights: BLEU-n is the geometric mean of p_1..p_n times the brevity penalty.
BLEU_WEIGHTS = tuple(tuple([1.0 / n] * n) for n in range(1, 5))
ROUGE_BETA = 1.2

def check_ids(references: References, hypotheses: Hypotheses) -> list[str]:
    """The image ids in reference order; ValueError naming the first id that does not match."""
    for image_id in references:
        if image_id not in hypotheses:
            raise ValueError(f"no hypothesis for image id {image_id!r}")
        if not references[image_id]:
            raise ValueError(f"no reference captions for image id {image_id!r}")
    for image_id in hypotheses:
        if image_id not in references:
            raise ValueError(f"no references for image id {image_id!r}")
    if not references:
        raise ValueError("no images to evaluate")
    return list(references)


class _NoSmoothing:
    """nltk's "no smoothing" (method0) without its warning, remembering the first order with no
    match: nltk puts the smallest float there to keep log() finite, which leaves ~1e-78 instead
    of the exact 0 that BLEU is for that order and every higher one."""

    def __init__(self) -> None:
        self.first_zero_order: int | None = None

    def __call__(self, p_n: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        for order, p in enumerate(p_n, start=1):
            if p.numerator == 0 and self.first_zero_order is None:
                self.first_zero_order = order
        return [p if p.numerator != 0 else sys.float_info.min for p in p_n]


def corpus_bleu_scores(references: References, hypotheses: Hypotheses) -> dict[str, float]:
    """Corpus BLEU-1..4 (nltk ``corpus_bleu``, cumulative uniform weights, no smoothing), in [0, 1].

    n-gram counts are summed over the corpus before the precisions are taken; the brevity
    penalty uses, per image, the reference length closest to the hypothesis (ties: shorter).
    BLEU-n is exactly 0.0 when some order up to n has no match at all.
    """
    from nltk.translate.bleu_score import corpus_bleu

    ids = check_ids(references, hypotheses)
    refs = [[r.split() for r in references[i]] for i in ids]
    hyps = [hypotheses[i].split() for i in ids]
    smoothing = _NoSmoothing()
    scores = corpus_bleu(refs, hyps, weights=list(BLEU_WEIGHTS), smoothing_function=smoothing)
    zero_from = smoothing.first_zero_order or len(BLEU_KEYS) + 1
    return {
        key: 0.0 if n >= zero_from else float(value)
        for n, (key, value) in enumerate(zip(BLEU_KEYS, scores, strict=True), start=1)
    }


def sentence_bleu4(refs: list[str], hyp: str) -> float:
    """Sentence BLEU-4 of one caption, smoothed with nltk's ``method1``.

    ``method1`` replaces a zero n-gram match count by epsilon=0.1, so a short caption missing
    every 4-gram still gets a small, comparable score instead of 0.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smoothing = SmoothingFunction().method1
    ref_tokens = [r.split() for r in refs]
    return float(sentence_bleu(ref_tokens, hyp.split(), smoothing_function=smoothing))


def pycocoevalcap_bleu(references: References, hypotheses: Hypotheses) -> dict[str, float] | None:
    """BLEU-1..4 as pycocoevalcap computes them (None when it is not installed).

    For comparison only: pycocoevalcap breaks ties of the closest reference length differently
    and adds tiny epsilons, so its numbers differ slightly from :func:`corpus_bleu_scores`.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
    except ImportError:
        return None
    ids = check_ids(references, hypotheses)
    gts = {i: list(references[i]) for i in ids}
    res = {i: [hypotheses[i]] for i in ids}
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {key: float(value) for key, value in zip(BLEU_KEYS, scores, strict=True)}


def cider_d(references: References, hypotheses: Hypotheses) -> tuple[float, dict[str, float]]:
    """CIDEr-D (Vedantam et al. 2015): corpus score (mean over images) and per-image scores.

    For n = 1..4, captions become TF-IDF vectors of raw n-gram counts, with the document frequency
    taken over the reference sets of the evaluated images (idf = log(#images) - log(max(1, df))).
    The hypothesis weights are clipped by the reference weights, each cosine is multiplied by
    exp(-(len_hyp - len_ref)^2 / (2 * 6^2)), and the result is averaged over n and references
    and multiplied by 10, as in pycocoevalcap's ``Cider``.
    """
    import numpy as np

    ids = check_ids(references, hypotheses)
    ref_words = {i: [r.split() for r in references[i]] for i in ids}
    df = document_frequencies(references[i] for i in ids)
    log_images = math.log(len(ids))
    per_image: dict[str, float] = {}
    for i in ids:
        hyp = TfIdf(hypotheses[i].split(), df, log_images)
        refs = [TfIdf(words, df, log_images) for words in ref_words[i]]
        per_image[i] = 10.0 * sum(cider_pair(hyp, ref) for ref in refs) / len(refs)
    return float(np.mean(list(per_image.values()))), per_image


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_sentence(refs: list[str], hyp: str, beta: float = ROUGE_BETA) -> float:
    """ROUGE-L F-measure of one caption from the best precision and best recall over references.

    As in pycocoevalcap's ``Rouge``: P = max_j LCS/len(hyp), R = max_j LCS/len(ref_j) (each
    maximum taken on its own), F = (1 + beta^2) P R / (R + beta^2 P), 0 when P or R is 0.
    """
    hyp_words = hyp.split()
    if not hyp_words:
        return 0.0
    precision = recall = 0.0
    for ref in refs:
        ref_words = ref.split()
        if not ref_words:
            continue
        lcs = _lcs_length(ref_words, hyp_words)
        precision = max(precision, lcs / len(hyp_words))
        recall = max(recall, lcs / len(ref_words))
    if precision == 0.0 or recall == 0.0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def rouge_l(references: References, hypotheses: Hypotheses) -> tuple[float, dict[str, float]]:
    """ROUGE-L (beta = 1.2): corpus score (mean over images) and per-image scores."""
    import numpy as np

    ids = check_ids(references, hypotheses)
    per_image = {i: rouge_l_sentence(references[i], hypotheses[i]) for i in ids}
    return float(np.mean(list(per_image.values()))), per_image


# Function words: a repeated word pair made only of these ("in a ... in a") is not counted.
FUNCTION_WORDS = frozenset(
    "a an the and or of in on at to into onto with by for from near next over under up down "
    "out off through while as is are was be being his her its their it he she they them one "
    "two three some another other each".split()
)


def repeats_content_pair(caption: str) -> bool:
    """True when a word pair holding a content word occurs twice in ``caption``
    (e.g. "a man in a red shirt ... in a red shirt": "red shirt")."""
    words = caption.split()
    pairs = Counter(zip(words, words[1:], strict=False))
    return any(n > 1 and not (a in FUNCTION_WORDS and b in FUNCTION_WORDS)
               for (a, b), n in pairs.items())


def diversity(hypotheses: Hypotheses, references: References) -> dict[str, float | int]:
    """How varied the generated captions are, next to the reference lengths.

    Keys: ``distinct_captions`` (count of different hypotheses), ``distinct_share`` (that count
    over the number of images), ``vocabulary`` (distinct words used by the hypotheses),
    ``mean_length`` (words per hypothesis), ``mean_reference_length`` (words per reference),
    ``repeated_pair_share`` / ``reference_repeated_pair_share`` (share of hypotheses /
    references repeating a word pair that holds a content word, see :func:`repeats_content_pair`).
    """
    import numpy as np

    ids = check_ids(references, hypotheses)
    hyp_words = [hypotheses[i].split() for i in ids]
    ref_lengths = [len(r.split()) for i in ids for r in references[i]]
    distinct = len({" ".join(words) for words in hyp_words})
    return {
        "distinct_captions": distinct,
        "distinct_share": distinct / len(ids),
        "vocabulary": len({w for words in hyp_words for w in words}),
        "mean_length": float(np.mean([len(words) for words in hyp_words])),
        "mean_reference_length": float(np.mean(ref_lengths)),
        "repeated_pair_share": float(np.mean([repeats_content_pair(hypotheses[i]) for i in ids])),
        "reference_repeated_pair_share": float(
            np.mean([repeats_content_pair(r) for i in ids for r in references[i]])
        ),
    }


def evaluate_all(references: References, hypotheses: Hypotheses) -> dict[str, Any]:
    """BLEU-1..4, CIDEr-D, ROUGE-L, ``per_image`` {id: {"BLEU-4", "CIDEr-D", "ROUGE-L"}} and
    ``diversity`` (METEOR 1.5 needs Java: ``captioner.evaluation.meteor``, added by the evaluation)."""
    ids = check_ids(references, hypotheses)
    result: dict[str, Any] = dict(corpus_bleu_scores(references, hypotheses))
    result["CIDEr-D"], cider_per_image = cider_d(references, hypotheses)
    result["ROUGE-L"], rouge_per_image = rouge_l(references, hypotheses)
    result["per_image"] = {
        i: {
            "BLEU-4": sentence_bleu4(references[i], hypotheses[i]),
            "CIDEr-D": cider_per_image[i],
            "ROUGE-L": rouge_per_image[i],
        }
        for i in ids
    }
    result["diversity"] = diversity(hypotheses, references)
    return result


# --------------------------------------------------------------------------- notes


BLEU_NOTE = (
    "BLEU-1..4 are nltk corpus_bleu scores with the standard cumulative uniform weights: BLEU-n "
    "is the geometric mean of the 1..n-gram precisions (weight 1/n each) times the brevity "
    "penalty, counted over the whole split against all references of each image, without "
    "smoothing. Some tutorials use non-standard weights, e.g. (0.3, 0.3, 0.3, 0) for BLEU-3, "
    "which gives numbers that cannot be compared with these."
)
SCALE_NOTE = (
    "Every score in the tables is x100 (BLEU-4 18.8 means 0.188), as in papers and the README; "
    "report.json keeps the fractions. BLEU-1..4, ROUGE-L (LCS F-measure, beta 1.2) and METEOR "
    "are fractions in [0, 1]. CIDEr-D is on the usual pycocoevalcap scale (0.442, shown as "
    "44.2; it can exceed 1), with document frequencies "
    "taken over the references of the evaluated images."
)
PER_IMAGE_NOTE = (
    "Per-image BLEU-4 is nltk sentence_bleu with smoothing method1 (for ranking examples); the "
    "corpus BLEU-4 above is not its mean."
)
PYCOCO_NOTE = (
    "pycocoevalcap's BLEU is shown as a cross-check. The two implementations differ slightly "
    "by design: pycocoevalcap picks the closest reference length differently and adds tiny "
    "epsilons to the n-gram precisions."
)


def notes(meteor_note: str, pycoco_available: bool) -> dict[str, str]:
    """The explanations every report carries, keyed by topic; ``meteor_note`` says which METEOR
    the report has, or why it has none."""
    out = {"bleu": BLEU_NOTE, "scale": SCALE_NOTE, "per_image": PER_IMAGE_NOTE}
    out["meteor"] = meteor_note
    if pycoco_available:
        out["pycocoevalcap"] = PYCOCO_NOTE
    return out
