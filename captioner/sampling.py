"""Sampling captions from a decoder's distribution (the exploration of self-critical training).

Same step protocol as :mod:`captioner.decoding`: ``step(tokens, state) -> (log_probs, state)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from captioner.decoding import Hypothesis, State, StepFn, greedy_search


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
    top_k: int = 0,
) -> list[Hypothesis]:
    """One caption per row drawn from the model's distribution (for self-critical training).

    Each step samples the next token from ``softmax(log_probs / temperature)`` with banned ids
    removed, restricted to each row's ``top_k`` most likely tokens when ``top_k`` > 0; rows stop
    at the end token or after ``max_length`` tokens, like greedy search.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")

    def draw(log_probs: np.ndarray) -> np.ndarray:
        scaled = log_probs / temperature
        if 0 < top_k < scaled.shape[1]:
            kth = -np.partition(-scaled, top_k - 1, axis=1)[:, top_k - 1 : top_k]  # (R, 1)
            scaled = np.where(scaled >= kth, scaled, -np.inf)
        probs = np.exp(scaled - scaled.max(axis=1, keepdims=True))  # (R, V), banned ids 0
        cumulative = np.cumsum(probs, axis=1)
        draws = rng.random(len(log_probs)) * cumulative[:, -1]
        return np.minimum((cumulative < draws[:, None]).sum(axis=1), log_probs.shape[1] - 1)

    return greedy_search(step, state, batch_size, start_id, end_id, max_length,
                         banned_ids=banned_ids, choose=draw)
