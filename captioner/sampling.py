"""Sampling captions from a decoder's distribution (the exploration of self-critical training).

Same step protocol as :mod:`captioner.decoding`: ``step(tokens, state) -> (log_probs, state)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from captioner.decoding import (
    Hypothesis,
    State,
    StepFn,
    _check_args,
    _greedy_hypothesis,
    _log_probs,
)


def sample_search(
    step: StepFn,
    state: State,
    batch_size: int,
    start_id: int,
    end_id: int,
    max_length: int,
    rng: np.random.Generator,
    banned_ids: Sequence[int] = (),
    temperature: float = 1.0,
) -> list[Hypothesis]:
    """One caption per row drawn from the model's distribution (for self-critical training).

    Each step samples the next token from ``softmax(log_probs / temperature)`` with banned ids
    removed; rows stop at the end token or after ``max_length`` tokens, like greedy search.
    """
    banned = tuple(int(i) for i in banned_ids)
    _check_args(batch_size, end_id, max_length, 0, banned)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = np.arange(batch_size)
    tokens = np.full(batch_size, start_id, dtype=np.int64)
    history = np.zeros((batch_size, max_length), dtype=np.int64)
    lengths = np.zeros(batch_size, dtype=np.int64)
    total = np.zeros(batch_size)
    done = np.zeros(batch_size, dtype=bool)
    for t in range(max_length):
        raw, state = step(tokens, state)
        log_probs = _log_probs(raw, batch_size, end_id, banned)
        if banned:
            log_probs[:, list(banned)] = -np.inf
        scaled = log_probs / temperature
        probs = np.exp(scaled - scaled.max(axis=1, keepdims=True))  # (R, V)
        cumulative = np.cumsum(probs, axis=1)
        draws = rng.random(batch_size) * cumulative[:, -1]
        choice = np.minimum((cumulative < draws[:, None]).sum(axis=1), log_probs.shape[1] - 1)
        live = ~done
        total[live] += log_probs[rows, choice][live]
        history[live, t] = choice[live]
        lengths[live] += 1
        done |= choice == end_id
        tokens = np.where(done, end_id, choice)
        if done.all():
            break
    return [_greedy_hypothesis(history[r], lengths[r], total[r], end_id) for r in rows]
