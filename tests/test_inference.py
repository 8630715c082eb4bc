"""Captioner: the compiled step agrees with the model, reserved ids never come out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from captioner.errors import CaptionerError
from captioner.formats.run_folder import RunConfig
from captioner.inference.captioner import Captioner
from captioner.model.decoders import build_decoder
from captioner.text.tokenizer import END, PAD, START, UNK, Tokenizer


def _captioner(kind="merge", shape=(6,)):
    tok = Tokenizer.build(["a dog runs", "a cat sits on grass"], min_count=1, max_length=8)
    model = build_decoder(kind, vocab_size=tok.vocab_size, max_length=tok.max_length,
                          feature_shape=shape, embed_dim=8, units=8)
    return Captioner(model, tok)


def test_step_function_matches_teacher_forced_log_probs():
    cap = _captioner()
    feats = np.random.default_rng(0).normal(size=(2, 6)).astype("float32")
    tokens = np.array([[START, 5, 6], [START, 7, 4]], "int32")
    logits = np.asarray(cap.decoder((feats, tokens)))
    expected = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    step, state = cap.step_function(), cap.initial_state(feats)
    for t in range(3):
        log_probs, state = step(tokens[:, t], state)
        assert isinstance(log_probs, np.ndarray) and isinstance(state["h"], np.ndarray)
        np.testing.assert_allclose(log_probs, expected[:, t], atol=1e-5)


def test_reserved_ids_are_never_generated():
    cap = _captioner()
    bias = cap.decoder.logits.bias
    boosted = np.zeros(bias.shape, "float32")
    boosted[[PAD, UNK, START]] = 50.0  # the model now "prefers" the reserved tokens
    boosted[END] = 10.0
    bias.assign(boosted)
    feats = np.zeros((3, 6), "float32")
    for search in ({"beam_size": 1}, {"beam_size": 3, "n_best": 2}):
        for hyps in cap.search(feats, **search):
            for h in hyps:
                assert not {PAD, UNK, START} & set(h.tokens) and h.finished
            assert hyps[0].tokens == ()  # <end> is the best allowed token


def test_run_config_errors(tmp_path):
    with pytest.raises(CaptionerError, match="not a captioner run folder"):
        RunConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CaptionerError, match="not valid JSON"):
        RunConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CaptionerError, match="not a captioner run config"):
        RunConfig.load(tmp_path)
