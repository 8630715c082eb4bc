"""Tests of captioner.evaluation.metrics: hand-worked BLEU/CIDEr-D/ROUGE-L cases, pycocoevalcap cross-checks
(METEOR 1.5: tests/test_meteor.py)."""

from __future__ import annotations

import math
import random
import warnings

import pytest

from captioner.evaluation import metrics
from captioner.evaluation.metrics import (
    BLEU_KEYS,
    cider_d,
    corpus_bleu_scores,
    diversity,
    evaluate_all,
    pycocoevalcap_bleu,
    rouge_l,
    sentence_bleu4,
)

VOCAB = "a dog man runs on the grass red ball in water two black jumps".split()


def random_corpus(seed: int, images: int = 50, refs: int = 5) -> tuple[dict, dict]:
    """Small random captions over VOCAB; some hypotheses copy a reference, some are one word."""
    rng = random.Random(seed)

    def caption(low: int = 2) -> str:
        return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(low, 12)))

    references = {f"img{i:03d}": [caption() for _ in range(refs)] for i in range(images)}
    hypotheses = {}
    for image_id, captions in references.items():
        roll = rng.random()
        hypotheses[image_id] = rng.choice(captions) if roll < 0.2 else caption(low=1)
    return references, hypotheses


def coco_format(references: dict, hypotheses: dict) -> tuple[dict, dict]:
    return dict(references), {i: [h] for i, h in hypotheses.items()}


# ----------------------------------------------------------------------------------------- BLEU


def test_bleu_identical_is_one() -> None:
    refs = {"1": ["a dog runs on the grass"], "2": ["two men in red"]}
    assert corpus_bleu_scores(refs, {"1": "a dog runs on the grass", "2": "two men in red"}) == {
        "BLEU-1": 1.0,
        "BLEU-2": 1.0,
        "BLEU-3": 1.0,
        "BLEU-4": 1.0,
    }


def test_bleu_single_sentence_by_hand() -> None:
    # hyp "the cat on the mat" (c=5), ref "the cat is on the mat" (r=6)
    # p1: the x2, cat, on, mat all in ref (the x2 there too)      -> 5/5 = 1
    # p2: the cat / cat on / on the / the mat; "cat on" missing    -> 3/4
    # p3: the cat on / cat on the / on the mat; only "on the mat"  -> 1/3
    # p4: the cat on the / cat on the mat; none                    -> 0/2
    # BP = exp(1 - r/c) = exp(1 - 6/5) = exp(-0.2) = 0.818730...
    # cumulative: BLEU-2 = BP * (p1 p2)^(1/2), BLEU-3 = BP * (p1 p2 p3)^(1/3), BLEU-4 = 0
    bp = math.exp(-0.2)
    scores = corpus_bleu_scores({"1": ["the cat is on the mat"]}, {"1": "the cat on the mat"})
    assert scores["BLEU-1"] == pytest.approx(bp)
    assert scores["BLEU-2"] == pytest.approx(bp * math.sqrt(0.75))
    assert scores["BLEU-2"] == pytest.approx(0.7090416310)
    assert scores["BLEU-3"] == pytest.approx(bp * (0.75 / 3) ** (1 / 3))
    assert scores["BLEU-3"] == pytest.approx(0.5157680550)
    assert scores["BLEU-4"] == 0.0  # exactly 0, not nltk's ~1e-78


def test_bleu_corpus_sums_counts_by_hand() -> None:
    # image 1 as above: matches/totals p1 5/5, p2 3/4, p3 1/3, p4 0/2, c=5, r=6
    # image 2 identical, 6 words:       p1 6/6, p2 5/5, p3 4/4, p4 3/3, c=6, r=6
    # corpus: p1 = 11/11, p2 = 8/9, p3 = 5/7, p4 = 3/5, c = 11, r = 12
    # BP = exp(1 - 12/11) = exp(-1/11)
    refs = {"1": ["the cat is on the mat"], "2": ["a dog runs on the grass"]}
    hyps = {"1": "the cat on the mat", "2": "a dog runs on the grass"}
    bp = math.exp(-1 / 11)
    p = [1.0, 8 / 9, 5 / 7, 3 / 5]
    scores = corpus_bleu_scores(refs, hyps)
    for n, key in enumerate(BLEU_KEYS, start=1):
        assert scores[key] == pytest.approx(bp * math.prod(p[:n]) ** (1 / n))
    assert scores["BLEU-4"] == pytest.approx(bp * (8 / 21) ** 0.25)
    # = 0.913101 * 0.785630; a mean of sentence scores would give (0 + 1) / 2 instead
    assert scores["BLEU-4"] == pytest.approx(0.71736, abs=1e-5)


def test_bleu_brevity_penalty_uses_closest_reference() -> None:
    # hyp "a dog runs" (c=3); refs of 3 and 8 words: closest r=3 so BP=1, p1=p2=p3=1, p4 0/0 -> 0
    scores = corpus_bleu_scores(
        {"1": ["a dog runs", "a black dog runs on the red grass"]}, {"1": "a dog runs"}
    )
    assert [scores[k] for k in BLEU_KEYS] == [1.0, 1.0, 1.0, 0.0]


def test_bleu_wrong_hypothesis_is_zero_without_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = corpus_bleu_scores({"1": ["a dog runs"]}, {"1": "two red balls"})
    assert scores == dict.fromkeys(BLEU_KEYS, 0.0)
    assert caught == []


def test_sentence_bleu4_method1_by_hand() -> None:
    # same pair as above; method1 replaces the 0 four-gram matches by epsilon 0.1: p4 = 0.1/2
    # BLEU-4 = exp(-0.2) * (1 * 3/4 * 1/3 * 0.05)^(1/4) = 0.818731 * 0.0125^0.25 = 0.273759
    value = sentence_bleu4(["the cat is on the mat"], "the cat on the mat")
    assert value == pytest.approx(math.exp(-0.2) * 0.0125**0.25)
    assert value == pytest.approx(0.2737591268)
    # a 2-word copy has no 3-/4-grams: p3 = p4 = 0.1/1 -> (1 * 1 * 0.1 * 0.1)^(1/4) = sqrt(0.1)
    assert sentence_bleu4(["a dog"], "a dog") == pytest.approx(math.sqrt(0.1))
    assert sentence_bleu4(["a dog runs fast"], "a dog runs fast") == pytest.approx(1.0)
    assert sentence_bleu4(["a dog runs"], "two red balls") == 0.0


def test_pycocoevalcap_bleu_close_but_not_equal() -> None:
    pytest.importorskip("pycocoevalcap")
    references, hypotheses = random_corpus(seed=1)
    ours = corpus_bleu_scores(references, hypotheses)
    theirs = pycocoevalcap_bleu(references, hypotheses)
    assert theirs is not None and set(theirs) == set(BLEU_KEYS)
    for key in BLEU_KEYS:
        assert 0.0 < ours[key] < 1.0
        assert abs(ours[key] - theirs[key]) < 0.02
    assert any(abs(ours[k] - theirs[k]) > 1e-6 for k in BLEU_KEYS)


def test_pycocoevalcap_bleu_none_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)  # import raises ImportError
    assert pycocoevalcap_bleu({"1": ["a dog"]}, {"1": "a dog"}) is None


# -------------------------------------------------------------------------------------- CIDEr-D


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cider_d_matches_pycocoevalcap(seed: int) -> None:
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    references, hypotheses = random_corpus(seed)
    score, per_image = cider_d(references, hypotheses)
    gts, res = coco_format(references, hypotheses)
    their_score, their_scores = cider.Cider().compute_score(gts, res)
    assert score == pytest.approx(float(their_score), abs=1e-6)
    assert list(per_image) == list(gts)
    for image_id, theirs in zip(gts, their_scores, strict=True):
        assert per_image[image_id] == pytest.approx(float(theirs), abs=1e-6)
    assert score > 0.1  # the corpus has real overlaps, so the check is not 0 == 0


def test_cider_d_by_hand() -> None:
    # 2 images, refs {"a": "x y", "b": "z w"}: every ref n-gram has df 1 -> idf L = log 2 - log 1.
    # "b": hyp = ref -> cosine 1 for n=1,2; no 3-/4-grams -> 0; (1+1+0+0)/4 * 10 = 5.
    # "a": hyp "x x y": unigram tf-idf (2L, L) vs ref (L, L); clipped min (L, L) . (L, L) = 2L^2,
    #      norms sqrt(5)L * sqrt(2)L -> 2/sqrt(10); bigrams (xx: L, xy: L) vs (xy: L): L^2 /
    #      (sqrt(2)L * L) = 1/sqrt(2); no trigram in ref -> 0; length penalty exp(-(3-2)^2/72).
    score, per_image = cider_d({"a": ["x y"], "b": ["z w"]}, {"a": "x x y", "b": "z w"})
    expected_a = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4
    assert per_image["b"] == pytest.approx(5.0)
    assert per_image["a"] == pytest.approx(expected_a)
    assert per_image["a"] == pytest.approx(3.3027, abs=1e-4)
    assert score == pytest.approx((expected_a + 5.0) / 2)


def test_cider_d_idf_uses_references_only_and_empty_hypothesis() -> None:
    # "x y" is in the references of both images: idf 0, so even a perfect copy scores 0.
    score, per_image = cider_d({"a": ["x y"], "b": ["x y"]}, {"a": "x y", "b": ""})
    assert per_image == {"a": 0.0, "b": 0.0}
    assert score == 0.0


# -------------------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_by_hand_max_precision_and_recall_separately() -> None:
    # hyp "a man rides a horse" (5 words)
    # ref1 "a man rides" (3): LCS 3 -> P = 3/5, R = 3/3
    # ref2 "a man is riding a big brown horse" (8): LCS "a man a horse" = 4 -> P = 4/5, R = 4/8
    # P = max P = 0.8 (ref2), R = max R = 1.0 (ref1), beta^2 = 1.44
    # F = (1 + 1.44) * 0.8 * 1.0 / (1.0 + 1.44 * 0.8) = 1.952 / 2.152 = 0.907063
    # (best per-reference F would be ref1's 1.464 / 1.864 = 0.785408 instead)
    refs = {"1": ["a man rides", "a man is riding a big brown horse"]}
    score, per_image = rouge_l(refs, {"1": "a man rides a horse"})
    assert per_image["1"] == pytest.approx(1.952 / 2.152)
    assert score == pytest.approx(0.9070632, abs=1e-7)


def test_rouge_l_identical_and_disjoint() -> None:
    score, per_image = rouge_l(
        {"1": ["a dog runs"], "2": ["a dog"], "3": ["x"]}, {"1": "a dog runs", "2": "red", "3": ""}
    )
    assert per_image == {"1": pytest.approx(1.0), "2": 0.0, "3": 0.0}
    assert score == pytest.approx(1 / 3)


def test_lcs_length() -> None:
    assert metrics._lcs_length("a b c b d a b".split(), "b d c a b a".split()) == 4
    assert metrics._lcs_length([], ["a"]) == 0


@pytest.mark.parametrize("seed", [0, 3])
def test_rouge_l_matches_pycocoevalcap(seed: int) -> None:
    rouge = pytest.importorskip("pycocoevalcap.rouge.rouge")
    references, hypotheses = random_corpus(seed)
    score, per_image = rouge_l(references, hypotheses)
    gts, res = coco_format(references, hypotheses)
    their_score, their_scores = rouge.Rouge().compute_score(gts, res)
    assert score == pytest.approx(float(their_score), abs=1e-6)
    for image_id, theirs in zip(gts, their_scores, strict=True):
        assert per_image[image_id] == pytest.approx(float(theirs), abs=1e-6)
    assert 0.1 < score < 1.0


# ------------------------------------------------------------------------ diversity, ids, overall


def test_diversity_by_hand() -> None:
    hypotheses = {"1": "a dog runs", "2": "a dog runs", "3": "a cat sits on a mat"}
    references = {"1": ["a dog", "a dog runs fast"], "2": ["dog"], "3": ["cat on mat"]}
    assert diversity(hypotheses, references) == {
        "distinct_captions": 2,
        "distinct_share": pytest.approx(2 / 3),
        "vocabulary": 7,  # a dog runs cat sits on mat
        "mean_length": pytest.approx(4.0),  # (3 + 3 + 6) / 3
        "mean_reference_length": pytest.approx(2.5),  # (2 + 4 + 1 + 3) / 4
        "repeated_pair_share": 0.0,
        "reference_repeated_pair_share": 0.0,
    }


ALL_FUNCTIONS = [
    corpus_bleu_scores,
    cider_d,
    rouge_l,
    evaluate_all,
    lambda refs, hyps: diversity(hyps, refs),
]


@pytest.mark.parametrize("function", ALL_FUNCTIONS)
def test_mismatched_ids_raise_naming_the_id(function) -> None:
    refs = {"1": ["a dog"], "2": ["a cat"], "3": ["a man"]}
    with pytest.raises(ValueError, match="no hypothesis for image id '2'"):
        function(refs, {"1": "a dog", "3": "a man"})
    with pytest.raises(ValueError, match="no references for image id '9'"):
        function(refs, {"1": "a dog", "2": "a cat", "3": "a man", "9": "x"})
    with pytest.raises(ValueError, match="no reference captions for image id '1'"):
        function({"1": []}, {"1": "a dog"})
    with pytest.raises(ValueError, match="no images"):
        function({}, {})


def test_evaluate_all_layout() -> None:
    references, hypotheses = random_corpus(seed=5, images=200, refs=5)
    result = evaluate_all(references, hypotheses)
    assert set(result) == {*BLEU_KEYS, "CIDEr-D", "ROUGE-L", "per_image", "diversity"}
    assert {k: result[k] for k in BLEU_KEYS} == corpus_bleu_scores(references, hypotheses)
    cider_score, cider_per_image = cider_d(references, hypotheses)
    assert result["CIDEr-D"] == cider_score
    assert result["ROUGE-L"] == rouge_l(references, hypotheses)[0]
    assert result["diversity"] == diversity(hypotheses, references)
    assert list(result["per_image"]) == list(references)
    first = next(iter(references))
    assert result["per_image"][first] == {
        "BLEU-4": sentence_bleu4(references[first], hypotheses[first]),
        "CIDEr-D": cider_per_image[first],
        "ROUGE-L": rouge_l({first: references[first]}, {first: hypotheses[first]})[0],
    }


def test_repeated_content_pairs_are_flagged_and_function_word_pairs_are_not():
    from captioner.evaluation.metrics import repeats_content_pair

    assert repeats_content_pair("a football player wearing a red helmet is wearing a red helmet")
    assert repeats_content_pair("a man in a black shirt and a black jacket")  # "a black"
    assert not repeats_content_pair("a dog in a field jumps in a lake")  # only "in a" repeats
    assert not repeats_content_pair("a dog runs")
    assert not repeats_content_pair("")
    refs = {"x": ["a dog runs", "a dog runs on a dog"]}
    d = diversity({"x": "a red car and a red car"}, refs)
    assert d["repeated_pair_share"] == 1.0 and d["reference_repeated_pair_share"] == 0.5
