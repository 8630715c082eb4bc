"""Greedy and beam search against hand-written next-token probability tables."""

from __future__ import annotations

import itertools
import math
from collections import namedtuple
from collections.abc import Callable

import numpy as np
import pytest

from captioner.inference.decoding import (
    Hypothesis,
    beam_search,
    gather_state,
    greedy_search,
    length_penalty,
    repeat_state,
)

PAD, UNK, START, END, A, B, C = range(7)
VOCAB = 7
L = math.log
Table = Callable[[tuple[int, ...]], dict[int, float]]


def from_dict(table: dict[tuple[int, ...], dict[int, float]]) -> Table:
    """A table for the listed prefixes; any other prefix gets an even end-or-c split."""
    return lambda prefix: table.get(prefix, {END: 0.5, C: 0.5})


# Greedy takes a (.4) then ends (.16); beam 2 finds [b] (.21); beam 3 finds [c] (.25).
T_WIDTH = from_dict(
    {
        (): {A: 0.4, B: 0.35, C: 0.25},
        (A,): {END: 0.4, B: 0.3, C: 0.3},
        (B,): {END: 0.6, A: 0.4},
        (C,): {END: 1.0},
    }
)
# [a] has the best raw log-prob (.275, 2 tokens), [b c] the best per token (.243, 3 tokens).
T_LENGTH = from_dict(
    {
        (): {A: 0.55, B: 0.45},
        (A,): {END: 0.5, A: 0.25, B: 0.25},
        (B,): {C: 0.9, END: 0.1},
        (A, A): {END: 1.0},
        (B, C): {END: 0.6, C: 0.4},
    }
)
# Never emits the end token.
T_NO_END = from_dict(
    {
        (): {A: 0.6, B: 0.4},
        (A,): {A: 0.2, B: 0.8},
        (B,): {A: 0.9, B: 0.1},
        (A, B): {A: 0.5, B: 0.5},
        (B, A): {A: 0.7, B: 0.3},
    }
)


def t_loop(prefix: tuple[int, ...]) -> dict[int, float]:
    """a b a b ... with a small chance to stop."""
    if not prefix:
        return {A: 0.9, END: 0.1}
    return {B: 0.9, END: 0.1} if prefix[-1] == A else {A: 0.8, END: 0.2}


def t_three_c(prefix: tuple[int, ...]) -> dict[int, float]:
    """Exactly c c c <end>."""
    return {C: 1.0} if len(prefix) < 3 else {END: 1.0}


class FakeModel:
    """Step function over per-image tables; the state keeps the image id and the prefix."""

    def __init__(self, *tables: Table) -> None:
        self.tables = tables
        self.batch_sizes: list[int] = []

    @property
    def calls(self) -> int:
        return len(self.batch_sizes)

    def state(self, *images: int) -> dict[str, np.ndarray]:
        ids = np.array(images, dtype=np.int64)
        return {"image": ids, "tokens": np.zeros((len(ids), 0), dtype=np.int64)}

    def step(self, tokens: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        self.batch_sizes.append(len(tokens))
        seen = np.concatenate([state["tokens"], tokens[:, None]], axis=1)
        assert (seen[:, 0] == START).all()
        out = np.full((len(tokens), VOCAB), -np.inf)
        for row, (image, prefix) in enumerate(zip(state["image"], seen, strict=True)):
            for token, p in self.tables[image](tuple(int(i) for i in prefix[1:])).items():
                out[row, token] = L(p)
        return out, {"image": state["image"], "tokens": seen}


def greedy(model: FakeModel, *images: int, max_length: int = 10, **kw) -> list[Hypothesis]:
    return greedy_search(
        model.step, model.state(*images), len(images), START, END, max_length, **kw
    )


def beam(model: FakeModel, *images: int, max_length: int = 10, **kw) -> list[list[Hypothesis]]:
    return beam_search(model.step, model.state(*images), len(images), START, END, max_length, **kw)


def check(hyp: Hypothesis, tokens: tuple[int, ...], log_prob: float, finished: bool, score=None):
    assert hyp.tokens == tokens
    assert hyp.finished is finished
    assert hyp.log_prob == pytest.approx(log_prob, abs=1e-12)
    assert hyp.score == pytest.approx(log_prob if score is None else score, abs=1e-12)


# ---------------------------------------------------------------- state pytrees


def test_gather_state_reorders_every_leaf_of_a_nested_pytree():
    state = {"h": np.arange(6).reshape(3, 2), "rest": (np.array([10, 11, 12]), [None])}
    out = gather_state(state, np.array([2, 0, 0, 1]))
    assert out["h"].tolist() == [[4, 5], [0, 1], [0, 1], [2, 3]]
    assert out["rest"][0].tolist() == [12, 10, 10, 11]
    assert out["rest"][1] == [None]
    assert gather_state(None, np.array([0])) is None


def test_repeat_state_repeats_rows_consecutively_and_keeps_namedtuples():
    Pair = namedtuple("Pair", "h c")
    out = repeat_state(Pair(np.array([[1], [2]]), np.array([7, 8])), 3)
    assert isinstance(out, Pair)
    assert out.h.ravel().tolist() == [1, 1, 1, 2, 2, 2]
    assert out.c.tolist() == [7, 7, 7, 8, 8, 8]


@pytest.mark.parametrize(
    "state, index",
    [
        (np.zeros((2, 3)), np.array([0.0])),  # float index
        (np.zeros((2, 3)), np.array([[0]])),  # 2-D index
        (np.zeros((2, 3)), np.array([2])),  # out of range
        ((np.zeros(2), 5), np.array([0])),  # non-array leaf
        (np.float64(1.0), np.array([0])),  # 0-d leaf
    ],
)
def test_gather_state_rejects_bad_input(state, index):
    with pytest.raises(ValueError):
        gather_state(state, index)


def test_repeat_state_rejects_k_below_one():
    with pytest.raises(ValueError, match="k must be"):
        repeat_state(np.zeros(2), 0)


# ---------------------------------------------------------------- length penalty


def test_length_penalty_values_and_errors():
    assert length_penalty(4, 0.5) == 2.0
    assert length_penalty(3, 0.0) == 1.0
    assert length_penalty(5, 1.0) == 5.0
    for length, alpha in [(0, 0.0), (2, -0.1), (2, math.inf), (2, math.nan)]:
        with pytest.raises(ValueError):
            length_penalty(length, alpha)


# ---------------------------------------------------------------- greedy vs beam widths


def test_greedy_takes_the_locally_best_path():
    (hyp,) = greedy(FakeModel(T_WIDTH), 0)
    check(hyp, (A,), L(0.4) + L(0.4), True)


@pytest.mark.parametrize(
    "k, tokens, log_prob",
    [(1, (A,), L(0.4) + L(0.4)), (2, (B,), L(0.35) + L(0.6)), (3, (C,), L(0.25) + L(1.0))],
)
def test_each_beam_width_finds_its_hand_computed_winner(k, tokens, log_prob):
    model = FakeModel(T_WIDTH)
    ((hyp,),) = beam(model, 0, beam_size=k)
    check(hyp, tokens, log_prob, True)
    assert model.batch_sizes == [k, k]  # stops after position 2: nothing live can win


@pytest.mark.parametrize("table", [T_WIDTH, T_LENGTH, T_NO_END, t_loop, t_three_c])
def test_beam_of_one_is_exactly_greedy(table):
    for max_length in (1, 2, 3, 10):
        (g,) = greedy(FakeModel(table), 0, max_length=max_length)
        ((b,),) = beam(FakeModel(table), 0, beam_size=1, max_length=max_length)
        assert b == g


def test_n_best_returns_the_requested_count_in_score_order():
    model = FakeModel(T_WIDTH)
    (hyps,) = beam(model, 0, beam_size=3, n_best=3)
    expected = [((C,), L(0.25) + L(1.0)), ((B,), L(0.35) + L(0.6)), ((A,), L(0.4) + L(0.4))]
    for hyp, (tokens, lp) in zip(hyps, expected, strict=True):
        check(hyp, tokens, lp, True)
    (two,) = beam(FakeModel(T_WIDTH), 0, beam_size=3, n_best=2)
    assert two == hyps[:2]
    assert model.calls == 2


def test_n_best_above_beam_size_is_an_error():
    with pytest.raises(ValueError, match="n_best"):
        beam(FakeModel(T_WIDTH), 0, beam_size=3, n_best=4)


# ---------------------------------------------------------------- length normalisation


def test_length_normalisation_prefers_the_longer_caption():
    short, long = L(0.55) + L(0.5), L(0.45) + L(0.9) + L(0.6)
    ((raw,),) = beam(FakeModel(T_LENGTH), 0, beam_size=2, max_length=5, alpha=0.0)
    check(raw, (A,), short, True)
    (norm,) = beam(FakeModel(T_LENGTH), 0, beam_size=2, max_length=5, alpha=1.0, n_best=2)
    check(norm[0], (B, C), long, True, score=long / 3)
    check(norm[1], (A,), short, True, score=short / 2)
    # After position 2 only [a] has finished; b c (raw -0.90) may still reach -0.90 / 5 > [a]'s
    # -0.65 at max_length=5, so the search goes on and finds [b c].
    ((best,),) = beam(FakeModel(T_LENGTH), 0, beam_size=2, max_length=5, alpha=1.0)
    assert best == norm[0]


def t_random(prefix: tuple[int, ...]) -> dict[int, float]:
    """A fixed pseudo-random distribution over pad, a, b, c and end for each prefix."""
    p = np.random.default_rng([7, *prefix]).dirichlet(np.ones(5))
    return dict(zip((PAD, A, B, C, END), p.tolist(), strict=True))


def exhaustive(max_length: int, alpha: float, n_best: int) -> list[tuple[tuple[int, ...], float]]:
    """Every finished caption over a, b, c (pad banned), best ``n_best`` by score."""
    found = []
    for length in range(max_length):
        for tokens in itertools.product((A, B, C), repeat=length):
            log_prob = 0.0
            for t, token in enumerate((*tokens, END)):
                log_prob += L(t_random(tokens[:t])[token])
            found.append((tokens, log_prob / (length + 1) ** alpha))
    return sorted(found, key=lambda item: -item[1])[:n_best]


@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_a_beam_wide_enough_to_keep_everything_is_exact(alpha):
    # 27 live beams x 4 tokens = 108 moves at the last position: a beam of 108 ranks every end.
    model = FakeModel(t_random)
    (hyps,) = beam(model, 0, beam_size=108, n_best=6, max_length=4, alpha=alpha, banned_ids=(PAD,))
    expected = exhaustive(4, alpha, 6)
    assert [h.tokens for h in hyps] == [tokens for tokens, _ in expected]
    assert [h.score for h in hyps] == pytest.approx([score for _, score in expected], abs=1e-12)
    assert all(h.finished for h in hyps)


# ---------------------------------------------------------------- truncation and fallback


def test_no_end_token_falls_back_to_the_best_unfinished_beams():
    model = FakeModel(T_NO_END)
    (hyps,) = beam(model, 0, beam_size=2, n_best=2, max_length=3, alpha=1.0)
    baa, aba = L(0.4) + L(0.9) + L(0.7), L(0.6) + L(0.8) + L(0.5)
    check(hyps[0], (B, A, A), baa, False, score=baa / 3)
    check(hyps[1], (A, B, A), aba, False, score=aba / 3)  # ties with a b b: lower id wins
    assert model.calls == 3
    (g,) = greedy(FakeModel(T_NO_END), 0, max_length=3)
    check(g, (A, B, A), aba, False)


def test_max_length_truncates_greedy_and_beam():
    model = FakeModel(t_three_c)
    (g,) = greedy(model, 0, max_length=2)
    check(g, (C, C), 0.0, False)
    assert model.calls == 2
    (hyps,) = beam(FakeModel(T_WIDTH), 0, beam_size=3, n_best=3, max_length=1)
    assert [(h.tokens, h.finished) for h in hyps] == [((A,), False), ((B,), False), ((C,), False)]
    assert [h.log_prob for h in hyps] == pytest.approx([L(0.4), L(0.35), L(0.25)], abs=1e-12)


def test_finished_hypotheses_come_first_then_unfinished_fill_n_best():
    (hyps,) = beam(FakeModel(T_LENGTH), 0, beam_size=2, n_best=2, max_length=2)
    check(hyps[0], (A,), L(0.55) + L(0.5), True)
    check(hyps[1], (B, C), L(0.45) + L(0.9), False)  # better raw score, but unfinished


# ---------------------------------------------------------------- batches


def test_a_batch_of_images_matches_each_image_alone():
    tables = (T_WIDTH, T_LENGTH, T_NO_END, t_loop, t_three_c)
    images = (4, 0, 2, 1, 3, 0)
    for kw in ({"beam_size": 2, "n_best": 2}, {"beam_size": 3, "alpha": 0.7, "block_ngram": 2}):
        batched = FakeModel(*tables)
        together = beam(batched, *images, max_length=4, **kw)
        alone = [beam(FakeModel(*tables), i, max_length=4, **kw)[0] for i in images]
        assert together == alone
        assert set(batched.batch_sizes) == {len(images) * kw["beam_size"]}
    together = greedy(FakeModel(*tables), *images, max_length=4)
    assert together == [greedy(FakeModel(*tables), i, max_length=4)[0] for i in images]
    check(together[0], (C, C, C), 0.0, True)
    check(together[1], (A,), L(0.4) + L(0.4), True)


def test_greedy_makes_one_step_call_per_position_for_the_whole_batch():
    model = FakeModel(from_dict({(): {END: 1.0}}), T_WIDTH, t_three_c)
    hyps = greedy(model, 0, 1, 2, max_length=10)
    check(hyps[0], (), 0.0, True)  # finished rows are stepped on but never change
    check(hyps[1], (A,), L(0.4) + L(0.4), True)
    check(hyps[2], (C, C, C), 0.0, True)
    assert model.batch_sizes == [3, 3, 3, 3]


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize(
    "n, tokens, log_prob",
    [
        (0, (A, B, A, B, A, B), L(0.9) + L(0.9) + L(0.8) + L(0.9) + L(0.8) + L(0.9)),
        (1, (A, B), L(0.9) + L(0.9) + L(0.2)),
        (2, (A, B, A), L(0.9) + L(0.9) + L(0.8) + L(0.1)),
        (3, (A, B, A, B), L(0.9) + L(0.9) + L(0.8) + L(0.9) + L(0.2)),
    ],
)
def test_block_ngram_in_greedy(n, tokens, log_prob):
    (hyp,) = greedy(FakeModel(t_loop), 0, max_length=6, block_ngram=n)
    check(hyp, tokens, log_prob, n > 0)


def test_block_ngram_in_beam_never_repeats_a_bigram():
    (hyps,) = beam(FakeModel(t_loop), 0, beam_size=2, n_best=2, max_length=8, block_ngram=2)
    check(hyps[0], (A, B), L(0.9) + L(0.9) + L(0.2), True)
    check(hyps[1], (), L(0.1), True)


def test_everything_blocked_closes_the_hypothesis_with_end():
    table = from_dict({(): {A: 1.0}, (A,): {A: 1.0}})
    (g,) = greedy(FakeModel(table), 0, block_ngram=1)
    check(g, (A,), -math.inf, True)
    for k in (1, 2):
        ((b,),) = beam(FakeModel(table), 0, beam_size=k, block_ngram=1)
        assert b == g


def test_beam_returns_fewer_than_n_best_when_nothing_else_is_possible():
    table = {(): {A: 1.0}, (A,): {A: 1.0}}  # any other prefix: probability 0 everywhere
    model = FakeModel(lambda prefix: table.get(prefix, {}))
    (hyps,) = beam(model, 0, beam_size=2, n_best=2, block_ngram=1)
    assert len(hyps) == 1
    check(hyps[0], (A,), -math.inf, True)


def test_banned_ids_never_appear():
    table = from_dict({(): {UNK: 0.5, A: 0.3, END: 0.2}, (A,): {PAD: 0.6, START: 0.3, END: 0.1}})
    banned = (PAD, UNK, START)
    (g,) = greedy(FakeModel(table), 0, banned_ids=banned)
    check(g, (A,), L(0.3) + L(0.1), True)
    (hyps,) = beam(FakeModel(table), 0, beam_size=2, n_best=2, banned_ids=banned)
    check(hyps[0], (), L(0.2), True)
    check(hyps[1], (A,), L(0.3) + L(0.1), True)
    (unbanned,) = greedy(FakeModel(table), 0)
    assert unbanned.tokens[0] == UNK


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"beam_size": 0}, "beam_size"),
        ({"n_best": 0}, "n_best"),
        ({"alpha": -1.0}, "alpha"),
        ({"block_ngram": -1}, "block_ngram"),
        ({"banned_ids": (END,)}, "cannot be banned"),
        ({"max_length": 0}, "max_length"),
    ],
)
def test_beam_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        beam(FakeModel(T_WIDTH), 0, **kw)


def test_bad_batch_size_state_rows_and_step_output_are_errors():
    model = FakeModel(T_WIDTH)
    with pytest.raises(ValueError, match="batch_size"):
        greedy_search(model.step, model.state(0), 0, START, END, 5)
    with pytest.raises(ValueError, match="rows"):
        greedy_search(model.step, model.state(0, 0), 3, START, END, 5)
    with pytest.raises(ValueError, match="shape"):
        greedy_search(lambda t, s: (np.zeros(VOCAB), s), None, 1, START, END, 5)
    with pytest.raises(ValueError, match="too small"):
        beam_search(lambda t, s: (np.zeros((len(t), 3)), s), None, 1, START, END, 5)
    with pytest.raises(ValueError, match="NaN"):
        greedy_search(lambda t, s: (np.full((1, VOCAB), np.nan), s), None, 1, START, END, 5)


# ---------------------------------------------------------------- the decoding config


def test_decoding_config_checks_each_field_and_replaces_single_ones():
    from captioner.formats.decoding_config import (
        DEFAULT_BEAM_SIZE,
        MAX_BEAM_SIZE,
        DecodingConfig,
        DecodingError,
        check_overrides,
    )

    base = DecodingConfig(alpha=0.7, block_ngram=2)
    assert base.beam_size == DEFAULT_BEAM_SIZE and base.n_best == 1 and base.max_length is None
    assert base.replace(beam_size=None, alpha=None) is base  # None keeps a field
    assert base.replace(beam_size=1) == DecodingConfig(1, 1, 0.7, 2)
    assert DecodingConfig.from_dict(base.to_dict()) == base
    assert DecodingConfig.from_dict({}) == DecodingConfig()
    for bad, field in (({"beam_size": 0}, "beam_size"), ({"beam_size": MAX_BEAM_SIZE + 1}, "beam_size"),
                       ({"beam_size": 2.0}, "beam_size"), ({"beam_size": True}, "beam_size"),
                       ({"n_best": 4}, "n_best"), ({"alpha": -0.1}, "alpha"),
                       ({"alpha": math.inf}, "alpha"), ({"alpha": math.nan}, "alpha"),
                       ({"block_ngram": -1}, "block_ngram"), ({"max_length": 0}, "max_length"),
                       ({"nbest": 2}, "nbest")):
        with pytest.raises(DecodingError) as err:
            base.replace(**bad)
        assert err.value.field == field and "\n" not in str(err.value)
    with pytest.raises(Exception, match=r"cfg\.json: decoding\.alpha: must be a number"):
        DecodingConfig.from_dict({"alpha": "0.7"}, "cfg.json")
    with pytest.raises(Exception, match=r"cfg\.json: decoding\.beam_size: must be given"):
        DecodingConfig.from_dict({"beam_size": None}, "cfg.json")
    check_overrides(n_best=5)  # checked against the stored beam size later
    with pytest.raises(DecodingError):
        check_overrides(n_best=5, beam_size=4)
    assert base.label == "beam 3, alpha 0.7, no repeated 2-grams"
    assert DecodingConfig(1).label == "greedy"
