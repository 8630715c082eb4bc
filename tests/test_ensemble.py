"""Ensembles: several run folders decoded as one model inside the same beam search."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import toy_dataset

from captioner.cache import open_features
from captioner.ensemble import EnsembleCaptioner, load_captioner
from captioner.errors import CaptionerError
from captioner.inference import Captioner
from captioner.training import TrainConfig, train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ens")
    caps, train_h5, val_h5, _ = toy_dataset(tmp, n_images=8)
    out = []
    for seed in (0, 1):
        config = TrainConfig(captions=str(caps), train_features=str(train_h5), out=str(tmp / f"r{seed}"),
                             val_features=str(val_h5), epochs=4, batch_size=8, embed_dim=16, units=32,
                             dropout=0.0, min_count=1, learning_rate=0.02, val_bleu_images=4,
                             patience=0, seed=seed)
        out.append(train(config, verbose=0))
    return out, train_h5


def test_ensemble_of_a_model_with_itself_decodes_like_the_model(runs):
    (run, _), cache = runs
    reader = open_features(cache)
    feats = reader.read(reader.names)
    single = Captioner.from_run(run).caption_features(feats, beam_size=3)
    double = load_captioner([run, run]).caption_features(feats, beam_size=3)
    assert [c[0].text for c in double] == [c[0].text for c in single]
    np.testing.assert_allclose([c[0].score for c in double], [c[0].score for c in single], atol=1e-5)


def test_ensemble_step_averages_the_members_log_probs(runs):
    (a, b), cache = runs
    reader = open_features(cache)
    feats = reader.read(reader.names[:3])
    ens = load_captioner([a, b])
    assert isinstance(ens, EnsembleCaptioner)
    tokens = np.full(3, 2)
    log_probs, _ = ens.step_function()(tokens, ens.initial_state(feats))
    parts = [m.step_function()(tokens, m.initial_state(feats))[0] for m in ens.members]
    np.testing.assert_allclose(log_probs, (parts[0] + parts[1]) / 2, atol=1e-6)


def test_ensemble_refuses_members_with_other_features(runs):
    (a, b), _ = runs
    other = Captioner.from_run(b)
    other.config.encoder.layer = "another_layer"
    with pytest.raises(CaptionerError, match="same image features"):
        EnsembleCaptioner([Captioner.from_run(a), other])
    other.tokenizer.words = [*other.tokenizer.words, "extra"]
    with pytest.raises(CaptionerError, match="another vocabulary"):
        EnsembleCaptioner([Captioner.from_run(a), other])
