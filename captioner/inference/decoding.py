"""Greedy and beam search over a per-token step function (pure numpy, no Keras).

A step function advances every row of a batch by one token::

    log_probs, state = step(tokens, state)

``tokens`` is an int array ``(R,)`` holding the last token of each row (the start token at the
first call); ``log_probs`` is a float array ``(R, V)`` of natural-log next-token probabilities
(all <= 0); ``state`` is a pytree: ``None``, an array whose axis 0 is the row axis, or a
tuple / list / dict (nested freely) of those. The search reorders and expands rows with
:func:`gather_state` and :func:`repeat_state`; the step function never sees beams.

Masking: ids in ``banned_ids`` and tokens that would repeat an n-gram (``block_ngram``) get
log-prob ``-inf``; the end token can never be banned. A hypothesis left with no allowed token
(every log-prob ``-inf``, which only happens when the model itself gives the end token
probability 0) is closed with the end token at log-prob ``-inf``. Exact ties go to the lower
token id (in beam search, to the better-ranked beam first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from captioner.formats.decoding_config import DEFAULT_BEAM_SIZE, DecodingConfig

__all__ = ["Caption", "DecodingConfig", "beam_search", "greedy_search"]  # the config's owner:
# captioner.formats.decoding_config (standard library only, so the CLI and run folders read it cheaply)

State = Any
StepFn = Callable[[np.ndarray, State], tuple[np.ndarray, State]]

NEG_INF = -np.inf


class NonFiniteError(ValueError):
    """A step returned NaN or +inf log-probabilities (damaged features or weights)."""
# Sort key of a forced end token: below every finite score, above the -inf of invalid moves.
_FORCED = float(np.finfo(np.float64).min)


@dataclass(frozen=True)
class Caption:
    """One decoded caption: the one result type from search to report.

    ``tokens`` excludes the start and end tokens; ``log_prob`` sums the log-probs of every
    generated token, the end token's included when ``finished``; ``score`` is
    ``log_prob / length_penalty(length, alpha)`` (``log_prob`` itself for greedy search).
    ``text`` is empty out of the search, which knows token ids only;
    :class:`captioner.inference.captioner.Captioner` fills it in with the tokenizer.
    """

    tokens: tuple[int, ...]
    log_prob: float
    score: float
    finished: bool
    text: str = ""


Hypothesis = Caption  # the search's name for a caption whose text is not filled in yet


# ---------------------------------------------------------------- state pytrees


def _tree_map(fn: Callable[[np.ndarray], np.ndarray], state: State) -> State:
    """Apply ``fn`` to every array leaf of ``state``, keeping the container structure."""
    if state is None:
        return None
    if isinstance(state, dict):
        return {key: _tree_map(fn, value) for key, value in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # namedtuple
        return type(state)(*(_tree_map(fn, value) for value in state))
    if isinstance(state, (tuple, list)):
        return type(state)(_tree_map(fn, value) for value in state)
    if not (isinstance(state, np.ndarray) or hasattr(state, "__array__")):
        raise ValueError(f"state leaves must be arrays, got {type(state).__name__}")
    array = np.asarray(state)
    if array.ndim == 0:
        raise ValueError("state arrays need a leading row axis, got a 0-d array")
    return fn(array)


def gather_state(state: State, index: np.ndarray) -> State:
    """Rows ``index`` (along axis 0) of every array in ``state``."""
    index = np.asarray(index)
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"index must be a 1-D integer array, got {index.dtype} {index.shape}")

    def take(array: np.ndarray) -> np.ndarray:
        if index.size and (index.min() < 0 or index.max() >= array.shape[0]):
            raise ValueError(f"index out of range for a state with {array.shape[0]} rows")
        return array[index]

    return _tree_map(take, state)


def repeat_state(state: State, k: int) -> State:
    """Repeat each row ``k`` times consecutively: row i becomes rows ``i*k .. i*k+k-1``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _tree_map(lambda array: np.repeat(array, k, axis=0), state)


def _check_rows(state: State, rows: int) -> None:
    """Raise ValueError unless every array in ``state`` has ``rows`` rows."""

    def check(array: np.ndarray) -> np.ndarray:
        if array.shape[0] != rows:
            raise ValueError(f"state has {array.shape[0]} rows, expected batch_size={rows}")
        return array

    _tree_map(check, state)


# ---------------------------------------------------------------- scoring and masking


def length_penalty(length: int, alpha: float) -> float:
    """The divisor ``length ** alpha`` of ``score = log_prob / length ** alpha``.

    ``length`` counts the generated tokens, the end token included when finished; ``alpha=0``
    ranks by the raw log-prob sum, larger ``alpha`` favours longer sequences.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if not 0 <= alpha < np.inf:
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    return float(length) ** alpha


def _check_args(
    batch_size: int, end_id: int, max_length: int, block_ngram: int, banned: tuple[int, ...]
) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if block_ngram < 0:
        raise ValueError(f"block_ngram must be >= 0 (0 disables), got {block_ngram}")
    if end_id < 0 or any(i < 0 for i in banned):
        raise ValueError("token ids must be >= 0")
    if end_id in banned:
        raise ValueError(f"the end id {end_id} cannot be banned")


def _log_probs(raw: np.ndarray, rows: int, end_id: int, banned: Sequence[int]) -> np.ndarray:
    """Validate a step output and return it as float64 ``(rows, V)``."""
    log_probs = np.array(raw, dtype=np.float64)
    if log_probs.ndim != 2 or log_probs.shape[0] != rows:
        raise ValueError(f"step must return log_probs of shape ({rows}, V), got {log_probs.shape}")
    if log_probs.shape[1] <= max([end_id, *banned]):
        raise ValueError(f"vocabulary size {log_probs.shape[1]} is too small for the token ids")
    if np.isnan(log_probs).any() or np.isposinf(log_probs).any():
        bad = np.flatnonzero(np.isnan(log_probs).any(axis=1) | np.isposinf(log_probs).any(axis=1))
        raise NonFiniteError(f"step returned NaN or +inf log-probs (rows {bad.tolist()[:8]})")
    return log_probs


def _mask(log_probs: np.ndarray, banned: Sequence[int], history: np.ndarray, n: int) -> None:
    """In place: ``-inf`` for banned ids and for tokens completing an n-gram seen in ``history``."""
    if banned:
        log_probs[:, list(banned)] = NEG_INF
    steps = history.shape[1]
    if n == 0 or steps < n:
        return
    windows = np.lib.stride_tricks.sliding_window_view(history, n, axis=1)  # (R, W, n)
    suffix = history[:, steps - n + 1 :]  # the last n-1 tokens, (R, n-1)
    match = (windows[:, :, :-1] == suffix[:, None, :]).all(axis=2)
    rows, starts = np.nonzero(match)
    log_probs[rows, windows[rows, starts, -1]] = NEG_INF


# ---------------------------------------------------------------- greedy


def greedy_search(
    step: StepFn,
    state: State,
    batch_size: int,
    start_id: int,
    end_id: int,
    max_length: int,
    block_ngram: int = 0,
    banned_ids: Sequence[int] = (),
    choose: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[Hypothesis]:
    """Most likely next token at each position, for ``batch_size`` rows at once.

    One step call per position for the whole batch; finished rows are fed the end token and
    ignored. Stops when every row has finished or after ``max_length`` generated tokens (end
    token included); rows without an end token by then come back with ``finished=False``.
    ``choose`` replaces the argmax: masked log-probs (R, V) in, one token id per row out.
    """
    banned = tuple(int(i) for i in banned_ids)
    _check_args(batch_size, end_id, max_length, block_ngram, banned)
    _check_rows(state, batch_size)
    rows = np.arange(batch_size)
    tokens = np.full(batch_size, start_id, dtype=np.int64)
    history = np.zeros((batch_size, max_length), dtype=np.int64)
    lengths = np.zeros(batch_size, dtype=np.int64)
    total = np.zeros(batch_size)
    done = np.zeros(batch_size, dtype=bool)
    for t in range(max_length):
        raw, state = step(tokens, state)
        log_probs = _log_probs(raw, batch_size, end_id, banned)
        _mask(log_probs, banned, history[:, :t], block_ngram)
        choice = np.argmax(log_probs, axis=1) if choose is None else choose(log_probs)
        choice[log_probs[rows, choice] == NEG_INF] = end_id  # nothing allowed: close the row
        live = ~done
        total[live] += log_probs[rows, choice][live]
        history[live, t] = choice[live]
        lengths[live] += 1
        done |= choice == end_id
        tokens = np.where(done, end_id, choice)
        if done.all():
            break
    return [_greedy_hypothesis(history[r], lengths[r], total[r], end_id) for r in rows]


def _greedy_hypothesis(history: np.ndarray, length: int, total: float, end_id: int) -> Hypothesis:
    finished = bool(history[length - 1] == end_id)
    tokens = tuple(int(i) for i in history[: length - 1 if finished else length])
    return Hypothesis(tokens, float(total), float(total), finished)


# ---------------------------------------------------------------- beam


def beam_search(
    step: StepFn,
    state: State,
    batch_size: int,
    start_id: int,
    end_id: int,
    max_length: int,
    beam_size: int = DEFAULT_BEAM_SIZE,
    alpha: float = 0.0,
    n_best: int = 1,
    block_ngram: int = 0,
    banned_ids: Sequence[int] = (),
) -> list[list[Hypothesis]]:
    """Beam search for ``batch_size`` images at once; ``n_best`` hypotheses per image.

    The state is expanded to ``batch_size * beam_size`` rows (one step call per position).
    Each position ranks every extension of an image's live beams by log-prob (all have the same
    length, so this is also the score order). An end token ranked within the top ``beam_size``
    moves that hypothesis to the finished set; the best ``beam_size`` non-end extensions stay
    live. An image stops when its live beams are gone, when it has ``n_best`` finished
    hypotheses and the ``n_best``-th score is >= the best score any live beam could still reach
    (``best_live_log_prob / max_length ** alpha``, exact as log-probs only decrease), when
    ``alpha > 0`` and ``beam_size`` hypotheses have finished (heuristic), or at ``max_length``.

    Returns finished hypotheses by score (descending); when fewer than ``n_best`` finished,
    the best live beams follow with ``finished=False`` (so an image that never produced the end
    token still gets its best truncated beams). Fewer than ``n_best`` come back only when masking
    leaves fewer possible hypotheses. Finished images stay in the batch (fixed step shapes).
    """
    banned = tuple(int(i) for i in banned_ids)
    _check_args(batch_size, end_id, max_length, block_ngram, banned)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be between 1 and beam_size={beam_size}, got {n_best}")
    length_penalty(1, alpha)  # validates alpha
    _check_rows(state, batch_size)
    k, rows = beam_size, batch_size * beam_size
    state = repeat_state(state, k)
    tokens = np.full(rows, start_id, dtype=np.int64)
    history = np.zeros((rows, max_length), dtype=np.int64)
    beam_lp = np.full((batch_size, k), NEG_INF)
    beam_lp[:, 0] = 0.0  # the k copies are identical: expand only the first
    finished: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
    active = np.ones(batch_size, dtype=bool)
    steps = 0
    for t in range(max_length):
        raw, state = step(tokens, state)
        steps = t + 1
        log_probs = _log_probs(raw, rows, end_id, banned)
        _mask(log_probs, banned, history[:, :t], block_ngram)
        total = beam_lp.reshape(rows, 1) + log_probs
        key, stuck = total, (beam_lp.reshape(rows) > NEG_INF) & (log_probs.max(axis=1) == NEG_INF)
        if stuck.any():  # no allowed token: the end token becomes the only (worst) move
            key = total.copy()
            key[stuck, end_id] = _FORCED
        parent = np.zeros((batch_size, k), dtype=np.int64)
        chosen = np.full((batch_size, k), end_id, dtype=np.int64)
        new_lp = np.full((batch_size, k), NEG_INF)
        for b, order in _ranked_moves(key.reshape(batch_size, k, -1), active):
            block = slice(b * k, (b + 1) * k)
            ends = _select(order, total[block], end_id, parent[b], chosen[b], new_lp[b])
            for beam, lp in ends:
                hyp_tokens = tuple(int(i) for i in history[b * k + beam, :t])
                score = lp / length_penalty(t + 1, alpha)
                finished[b].append(Hypothesis(hyp_tokens, lp, score, True))
            active[b] = not _image_done(finished[b], new_lp[b], n_best, k, alpha, max_length)
        rows_from = (np.arange(batch_size)[:, None] * k + parent).reshape(rows)
        history = history[rows_from]
        history[:, t] = chosen.reshape(rows)
        state = gather_state(state, rows_from)
        tokens, beam_lp = chosen.reshape(rows), new_lp
        if not active.any():
            break
    return [
        _ranked(finished[b], history[b * k : (b + 1) * k], beam_lp[b], steps, n_best, alpha)
        for b in range(batch_size)
    ]


def _select(
    order: np.ndarray,
    total: np.ndarray,
    end_id: int,
    parent: np.ndarray,
    chosen: np.ndarray,
    new_lp: np.ndarray,
) -> list[tuple[int, float]]:
    """One image's step from its ranked flat (beam, token) ``order``: fill the live beams'
    ``parent``/``chosen``/``new_lp`` in place and return ``(beam, log_prob)`` of the end tokens
    ranked within the top ``k``."""
    k, vocab = total.shape
    ends, live = [], 0
    for rank, index in enumerate(order):
        beam, token = divmod(int(index), vocab)
        lp = float(total[beam, token])
        if token == end_id:
            if rank < k:
                ends.append((beam, lp))
        elif live < k:
            parent[live], chosen[live], new_lp[live] = beam, token, lp
            live += 1
    return ends


def _ranked_moves(key: np.ndarray, active: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Per active image of ``key`` ``(B, k, V)``: its best ``2k`` flat (beam, token) indices with
    a key above ``-inf``, best first, lower index on ties.

    Only keys >= the ``2k``-th largest of beam 0 (the best live beam) can make the cut, so one
    partition over ``(B, V)`` prunes the sort.
    """
    batch, k, vocab = key.shape
    m = 2 * k
    floor = np.full(batch, NEG_INF)
    if m <= vocab:
        floor = np.partition(key[:, 0], vocab - m, axis=1)[:, vocab - m]
    flat = key.reshape(batch, k * vocab)
    candidates = (flat >= floor[:, None]) & (flat > NEG_INF)
    for b in np.flatnonzero(active):
        index = np.flatnonzero(candidates[b])
        yield int(b), index[np.lexsort((index, -flat[b, index]))][:m]


def _image_done(
    finished: list[Hypothesis],
    live_lp: np.ndarray,
    n_best: int,
    k: int,
    alpha: float,
    max_length: int,
) -> bool:
    """Whether no live beam can still enter an image's top ``n_best`` (see :func:`beam_search`)."""
    best_live = float(live_lp.max())
    if best_live == NEG_INF or (alpha > 0 and len(finished) >= k):
        return True
    if len(finished) < n_best:
        return False
    nth = sorted((h.score for h in finished), reverse=True)[n_best - 1]
    return nth >= max(best_live, best_live / length_penalty(max_length, alpha))


def _ranked(
    finished: list[Hypothesis],
    history: np.ndarray,
    live_lp: np.ndarray,
    steps: int,
    n_best: int,
    alpha: float,
) -> list[Hypothesis]:
    """Best finished hypotheses, topped up with live (unfinished) beams to ``n_best``."""
    ranked = sorted(finished, key=lambda h: -h.score)[:n_best]
    for beam in np.flatnonzero(live_lp > NEG_INF)[: n_best - len(ranked)]:
        lp = float(live_lp[beam])
        tokens = tuple(int(i) for i in history[beam, :steps])
        ranked.append(Hypothesis(tokens, lp, lp / length_penalty(steps, alpha), False))
    return ranked

