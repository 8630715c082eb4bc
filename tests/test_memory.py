"""Search state kept once per image (:mod:`captioner.inference.per_image`) and the memory budget
(:mod:`captioner.inference.memory`): the same captions for every batch size and budget, and what
``--max-memory`` accepts."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FLICKR, ROOT, needs_flickr
from runfolder import make_run

from captioner.cli import main
from captioner.inference.captioner import Captioner
from captioner.inference.decoding import beam_search, greedy_search
from captioner.inference.loader import load_captioner
from captioner.inference.memory import (
    DEFAULT_LIMIT,
    MemoryBudget,
    encoder_bytes,
    parse_size,
    pieces,
    search_bytes,
)
from captioner.inference.per_image import (
    BEAMS,
    IMAGE_INDEX,
    block_size,
    indexed_state,
    indexed_step,
    numpy_take,
)

FEATURES = (2, 2, 8)
V = 7


# ---------------------------------------------------------------- image index, pure numpy


def test_block_size_finds_image_major_blocks_only():
    assert block_size(np.array([0, 0, 0, 1, 1, 1]), 2) == 3
    assert block_size(np.arange(4), 4) == 1
    assert block_size(np.array([0, 1, 0, 1]), 2) is None  # interleaved
    assert block_size(np.array([0, 0, 1]), 2) is None  # uneven
    assert block_size(np.array([1, 1, 0, 0]), 2) is None  # reordered


def _toy(table: np.ndarray):
    """The same toy model twice: per-image logits ``table`` (G, V) kept once per image
    (grouped), or carried in every row of the state (today's repeated state)."""

    def advance(logits, h, tokens):
        log_probs = logits + h
        log_probs = log_probs - np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
        return log_probs, 0.5 * h + np.eye(V)[tokens]

    def grouped(tokens, beams, rows):
        k = len(tokens) // len(rows["table"])
        log_probs, h = advance(np.repeat(rows["table"], k, axis=0), beams["h"], tokens)
        return log_probs, {"h": h}

    def repeated(tokens, state):
        log_probs, h = advance(state["table"], state["h"], tokens)
        return log_probs, {"table": state["table"], "h": h}

    zeros = np.zeros((len(table), V))
    return grouped, repeated, zeros


def _with_bias(step, bias):
    """A wrapper carrying its own per-row leaf (rows, V) inside the state, as a decode-time
    vocabulary bias would: the search gathers and repeats it like every other leaf."""

    def wrapped(tokens, state):
        log_probs, inner = step(tokens, state["inner"])
        return log_probs + state["bias"], {"inner": inner, "bias": state["bias"]}

    return wrapped, lambda inner: {"inner": inner, "bias": bias}


@pytest.mark.parametrize("blocks", [True, False])
def test_indexed_state_searches_exactly_like_the_repeated_state(blocks):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(4, V)) * 3
    grouped, repeated, zeros = _toy(table)
    common = dict(start_id=2, end_id=3, max_length=6, beam_size=3, n_best=2, alpha=0.7)
    step = indexed_step(grouped, {"table": table}, 4, numpy_take, blocks=blocks)
    new = beam_search(step, indexed_state({"h": zeros}, 4), 4, **common)
    old = beam_search(repeated, {"table": table, "h": zeros}, 4, **common)
    assert new == old  # tokens, log-probs and scores, exactly
    assert [len(h) for h in new] == [2, 2, 2, 2]
    bias = np.zeros((4, V))
    bias[:, 5] = -50.0  # never word 5
    wrapped, wrap = _with_bias(step, bias)
    biased = beam_search(wrapped, wrap(indexed_state({"h": zeros}, 4)), 4, **common)
    wrapped_old, wrap_old = _with_bias(repeated, bias)
    assert biased == beam_search(wrapped_old, wrap_old({"table": table, "h": zeros}), 4, **common)
    assert all(5 not in h.tokens for hyps in biased for h in hyps)
    greedy = greedy_search(step, indexed_state({"h": zeros}, 4), 4, 2, 3, 6)
    assert greedy == greedy_search(repeated, {"table": table, "h": zeros}, 4, 2, 3, 6)


def test_rows_out_of_image_order_read_their_own_image():
    table = np.arange(3 * V, dtype=float).reshape(3, V)
    seen = []

    def grouped(tokens, beams, rows):
        seen.append(rows["table"][:, 0].tolist())
        return np.zeros((len(tokens), V)), beams

    step = indexed_step(grouped, {"table": table}, 3, numpy_take)
    state = {IMAGE_INDEX: np.array([2, 0, 2, 1]), BEAMS: {"h": np.zeros((4, 1))}}
    _, new = step(np.zeros(4, int), state)
    step(np.zeros(6, int), {IMAGE_INDEX: np.repeat(np.arange(3), 2), BEAMS: {}})
    assert seen == [[2 * V, 0, 2 * V, V], [0, V, 2 * V]]  # gathered per row, then once per image
    assert new[IMAGE_INDEX].tolist() == [2, 0, 2, 1]


# ---------------------------------------------------------------- the Keras toy ensemble


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mem")
    a = make_run(tmp / "a", "attention", FEATURES, seed=3)
    b = make_run(tmp / "b", "attention", FEATURES, seed=7)
    feats = np.random.default_rng(1).normal(size=(5, *FEATURES)).astype("float32")
    return load_captioner([a, b], runtime="keras"), feats


DECODINGS = [
    {"beam_size": 1, "n_best": 1},
    {"beam_size": 3, "n_best": 2, "alpha": 0.7, "block_ngram": 2},
]


def _texts(found):
    return [[c.tokens for c in r.captions] for r in found]


def _scores(found):
    return np.array([[c.score for c in r.captions] for r in found])


@pytest.mark.parametrize("decoding", DECODINGS)
def test_every_batch_size_and_budget_gives_the_same_captions(ensemble, decoding):
    captioner, feats = ensemble
    ref = captioner.caption(feats, batch_size=5, **decoding)
    for batch in (1, 2, 5):
        found = captioner.caption(feats, batch_size=batch, **decoding)
        assert _texts(found) == _texts(ref)
        np.testing.assert_allclose(_scores(found), _scores(ref), rtol=0, atol=1e-5)
    captioner.max_memory = 1  # one image per search
    try:
        found = captioner.caption(feats, batch_size=5, **decoding)
    finally:
        captioner.max_memory = None
    assert _texts(found) == _texts(ref)
    np.testing.assert_allclose(_scores(found), _scores(ref), rtol=0, atol=1e-5)


def test_the_search_matches_todays_per_row_state(ensemble):
    """The full per-row state (every row its own features and keys, as before) decodes the
    same hypotheses as the per-image state."""
    captioner, feats = ensemble
    common = dict(start_id=2, end_id=3, max_length=7, beam_size=3, n_best=3, alpha=0.7)
    old = beam_search(
        captioner.step_function(eager=True),
        captioner.initial_state(feats, eager=True),
        len(feats),
        **common,
    )
    state, step = captioner.prepare(feats, eager=True)
    assert set(state) == {IMAGE_INDEX, BEAMS} and len(state[BEAMS]) == 2  # one per member
    assert all("features" not in m and "keys" not in m for m in state[BEAMS])
    new = beam_search(step, state, len(feats), **common)
    assert [[h.tokens for h in x] for x in new] == [[h.tokens for h in x] for x in old]
    np.testing.assert_allclose(
        [[h.score for h in x] for x in new], [[h.score for h in x] for x in old], rtol=0, atol=1e-5
    )


def test_encoder_calls_are_split_to_the_budget(ensemble, monkeypatch):
    captioner, _ = ensemble
    calls = []

    def fake(self, images):
        calls.append(len(images))
        return images.mean(axis=(1, 2, 3)).reshape(-1, 1)

    monkeypatch.setattr(Captioner, "_encode_batch", fake)
    monkeypatch.setattr(type(captioner), "input_size", property(lambda self: (10, 10)))
    images = np.arange(7, dtype="float32")[:, None, None, None] * np.ones((1, 10, 10, 3), "float32")
    captioner.max_memory = 3 * encoder_bytes((10, 10))
    try:
        out = captioner.encode_images(images)
    finally:
        captioner.max_memory = None
    assert calls == [3, 3, 1]
    np.testing.assert_array_equal(out[:, 0], np.arange(7))


# ---------------------------------------------------------------- the budget itself


def test_sizes_parse_in_binary_units():
    assert parse_size("1.5G") == int(1.5 * 2**30)
    assert parse_size("800M") == 800 * 2**20
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("2gb") == 2 * 2**30
    assert parse_size("1000") == 1000
    for bad in ("", "G", "-1G", "0", "1.5X", "1 G B"):
        with pytest.raises(ValueError, match="not a memory size"):
            parse_size(bad)


def test_budget_counts_images():
    budget = MemoryBudget(1000)
    assert budget.images(100, 64) == 10
    assert budget.images(100, 4) == 4
    assert budget.images(5000, 64) == 1  # one image is never split
    assert 0 < MemoryBudget.default().limit <= DEFAULT_LIMIT
    assert [(p.start, p.stop) for p in pieces(7, 3)] == [(0, 3), (3, 6), (6, 7)]
    # the bundled model: 9x9x1280 features, 4 members, 256 attention units, beam 3, 2533 words
    assert search_bytes((9, 9, 1280), 4, 3, 2533, 256) == (
        4 * (81 * 1280 + 4 * 81 * 256) + 3 * (4 * 2 * 81 * 256 + 8 * 8 * 2533)
    )


def test_max_memory_option_refuses_a_bad_size_and_help_says_what_batch_size_trades(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["caption", "x.jpg", "--max-memory", "12X"])
    assert exc.value.code == 2
    assert "'12X' is not a memory size" in capsys.readouterr().err
    for command in ("caption", "evaluate", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--max-memory SIZE" in text
        if command != "serve":
            assert "take more memory" in text


# ---------------------------------------------------------------- the bundled model


@pytest.mark.shared
@needs_flickr
@pytest.mark.parametrize("runtime", ["onnx", "keras"])
def test_bundled_model_gives_the_same_captions_for_every_batch_size(runtime):
    names = (FLICKR / "Flickr8k_text" / "Flickr_8k.testImages.txt").read_text().split()[:6]
    photos = [FLICKR / "Flicker8k_Dataset" / n for n in names]
    captioner = load_captioner(ROOT / "weights" / "default", runtime=runtime)
    ref = captioner.caption(photos, batch_size=6)
    for batch in (1, 4):
        found = captioner.caption(photos, batch_size=batch)
        assert [r.text for r in found] == [r.text for r in ref]
        np.testing.assert_allclose(_scores(found), _scores(ref), rtol=0, atol=1e-5)
    assert all(r.text for r in ref)
