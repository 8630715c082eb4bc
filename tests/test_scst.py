"""Self-critical training: sampling, the CIDEr-D reward, advantages, and a resumable run."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from helpers import toy_dataset

from captioner.errors import CaptionerError
from captioner.evaluation.metrics import cider_d
from captioner.inference.captioner import Captioner
from captioner.text.cider import CiderScorer
from captioner.text.tokenizer import END, START
from captioner.train.scst import ScstConfig, advantages, sample_search, sequences, train_scst
from captioner.train.training import TrainConfig, train


def fixed_step(probs: np.ndarray):
    """A step whose next-token distribution is always ``probs`` (V,)."""

    def step(tokens, state):
        return np.log(np.tile(probs, (len(tokens), 1))), state

    return step


def test_sampling_follows_the_model_distribution():
    probs = np.array([1e-9, 1e-9, 1e-9, 0.2, 0.5, 0.3])  # ids 0-2 special, 3 = end
    rng = np.random.default_rng(0)
    hyps = sample_search(fixed_step(probs), {}, 4000, START, END, 1, rng, banned_ids=(0, 1, 2))
    first = np.array([h.tokens[0] if h.tokens else END for h in hyps])
    freq = np.bincount(first, minlength=6)[3:] / len(first)
    np.testing.assert_allclose(freq, [0.2, 0.5, 0.3], atol=0.03)
    again = sample_search(fixed_step(probs), {}, 50, START, END, 5, np.random.default_rng(1))
    assert all(len(h.tokens) <= 4 if h.finished else len(h.tokens) == 5 for h in again)


def test_sampling_never_emits_banned_tokens_and_stops_at_the_end_token():
    probs = np.full(8, 1 / 8)
    hyps = sample_search(fixed_step(probs), {}, 200, START, END, 6, np.random.default_rng(2),
                         banned_ids=(0, 1, 2))
    assert all(t not in (0, 1, 2, END) for h in hyps for t in h.tokens)
    assert any(h.finished for h in hyps) and any(not h.finished for h in hyps)
    with pytest.raises(ValueError):
        sample_search(fixed_step(probs), {}, 2, START, END, 6, np.random.default_rng(), temperature=0)


def test_top_k_sampling_draws_only_from_the_k_most_likely_words():
    probs = np.array([1e-9, 1e-9, 1e-9, 0.05, 0.45, 0.3, 0.2])  # ids 0-2 special, 3 = end
    rng = np.random.default_rng(3)
    hyps = sample_search(fixed_step(probs), {}, 3000, START, END, 1, rng, banned_ids=(0, 1, 2),
                         top_k=2)
    first = np.array([h.tokens[0] for h in hyps])
    assert set(first) == {4, 5}
    np.testing.assert_allclose((first == 4).mean(), 0.45 / 0.75, atol=0.03)
    one = sample_search(fixed_step(probs), {}, 50, START, END, 3, rng, top_k=1)
    assert all(h.tokens == (4, 4, 4) for h in one)  # top-1 sampling is greedy search
    with pytest.raises(ValueError):
        sample_search(fixed_step(probs), {}, 2, START, END, 6, rng, top_k=-1)


def test_cider_scorer_matches_cider_d_when_the_references_are_the_same_images():
    refs = {"a": ["a dog runs on grass", "a brown dog runs"], "b": ["a man rides a bike", "a cyclist on a road"],
            "c": ["two kids play in the snow", "children in snow"]}
    hyps = {"a": "a dog runs", "b": "a man on a bike", "c": "kids play in snow"}
    _, per_image = cider_d(refs, hyps)
    scorer = CiderScorer(refs)
    for name, hyp in hyps.items():
        assert scorer.score(name, [hyp])[0] == pytest.approx(per_image[name], abs=1e-9)
    assert scorer.score("a", ["a dog runs on grass"])[0] > scorer.score("a", ["a man rides"])[0]


def test_advantages_use_the_mean_of_the_other_samples():
    rewards = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    adv = advantages(rewards)
    np.testing.assert_allclose(adv[0], [1 - 2.5, 2 - 2.0, 3 - 1.5])
    np.testing.assert_allclose(adv[1], 0.0)


def test_sequences_teacher_force_the_sampled_tokens():
    t_in, t_out, mask = sequences([(5, 6), (7,), (8, 9, 10)], [True, True, False], width=8)
    assert t_in.tolist() == [[START, 5, 6], [START, 7, END], [START, 8, 9]]
    assert t_out.tolist() == [[5, 6, END], [7, END, 0], [8, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1]]


@pytest.fixture()
def ce_run(tmp_path):
    caps, train_h5, val_h5, refs = toy_dataset(tmp_path, n_images=8, spatial=True)
    config = TrainConfig(captions=str(caps), train_features=str(train_h5), val_features=str(val_h5),
                         out=str(tmp_path / "ce"), decoder="attention", epochs=3, batch_size=8,
                         embed_dim=16, units=32, dropout=0.0, min_count=1, learning_rate=0.02,
                         val_bleu_images=4, patience=0)
    return train(config, verbose=0), tmp_path


def test_scst_run_raises_the_reward_checkpoints_and_resumes(ce_run):
    ce, tmp_path = ce_run
    config = ScstConfig(init=str(ce), out=str(tmp_path / "scst"), epochs=3, samples=4,
                        batch_images=4, learning_rate=5e-3, val_images=4, val_beam_size=2,
                        top_k=3, warmup_epochs=0.5, evals_per_epoch=2)
    run = train_scst(config, verbose=False)
    with open(run / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    rewards = [float(r["reward"]) for r in rows]
    assert rewards[-1] > rewards[0]
    assert all(r["val_bleu4"] and r["val_cider"] for r in rows)
    captioner = Captioner.from_run(run)
    assert captioner.config.training["scst"]["samples"] == 4
    # resuming a finished run with more epochs continues from epoch 3
    more = ScstConfig(init="", out=str(run), epochs=4)
    train_scst(more, resume=True, verbose=False)
    with open(run / "history.csv") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4]
    with open(run / "curve.csv") as fh:
        curve = list(csv.DictReader(fh))
    # the start (dev only: no reward yet), then dev scores twice per epoch, across the resume
    assert [float(r["epoch"]) for r in curve] == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4]
    assert curve[0]["reward"] == "" and curve[0]["val_bleu4"] and curve[0]["val_cider"]
    assert all(r["reward"] and r["val_bleu4"] and r["val_cider"] for r in curve[1:])


def test_scst_refuses_one_sample_and_an_existing_folder(ce_run):
    ce, tmp_path = ce_run
    with pytest.raises(CaptionerError, match="at least 2"):
        train_scst(ScstConfig(init=str(ce), out=str(tmp_path / "x"), samples=1), verbose=False)
    with pytest.raises(CaptionerError, match="already holds a run"):
        train_scst(ScstConfig(init=str(ce), out=str(ce)), verbose=False)


def test_scst_from_a_folder_with_a_file_manifest_and_not_from_an_ensemble(ce_run):
    """A bundled-style folder (``files`` manifest) is a valid --init: the fine-tune does not
    inherit the manifest (its weights differ); an ensemble folder is refused in one line."""
    import json
    import shutil

    from captioner.storage.files import sha256sum

    ce, tmp_path = ce_run
    bundle = tmp_path / "bundle"
    shutil.copytree(ce, bundle)
    config = json.loads((bundle / "config.json").read_text())
    config["files"] = {n: {"size": (bundle / n).stat().st_size, "sha256": sha256sum(bundle / n)}
                       for n in ("tokenizer.json", "best.weights.h5")}
    (bundle / "config.json").write_text(json.dumps(config))
    run = train_scst(ScstConfig(init=str(bundle), out=str(tmp_path / "from_bundle"), epochs=1,
                                samples=2, batch_images=4, val_images=2), verbose=False)
    assert Captioner.from_run(run).config.files == {}
    shutil.copyfile(bundle / "best.weights.h5", bundle / "member1.weights.h5")
    config["members"] = ["member1.weights.h5"]
    (bundle / "config.json").write_text(json.dumps(config))
    with pytest.raises(CaptionerError, match="ensemble of 2 decoders; --init takes one run"):
        train_scst(ScstConfig(init=str(bundle), out=str(tmp_path / "y")), verbose=False)


def _weights(path) -> list[np.ndarray]:
    import h5py

    arrays: list[np.ndarray] = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda _, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def test_scst_starts_from_the_chosen_epoch_checkpoint(ce_run):
    """--init-epoch N starts from checkpoints/epoch-NNN (not best.weights.h5); a learning rate
    of ~0 leaves those weights as they were, so the run's weights are that checkpoint's."""
    ce, tmp_path = ce_run
    best = _weights(ce / "best.weights.h5")
    other = [n for n in (2, 3) if not all(  # the kept epoch that is not the best one
        np.array_equal(a, b) for a, b in zip(_weights(ce / f"checkpoints/epoch-{n:03d}.weights.h5"), best, strict=True))]
    assert len(other) == 1
    start = ce / "checkpoints" / f"epoch-{other[0]:03d}.weights.h5"
    run = train_scst(ScstConfig(init=str(ce), out=str(tmp_path / "from2"), init_epoch=other[0], epochs=1,
                                samples=2, batch_images=4, val_images=2, learning_rate=1e-12),
                     verbose=False)
    assert Captioner.from_run(run).config.training["scst"]["init_epoch"] == other[0]
    for a, b in zip(_weights(start), _weights(run / "last.weights.h5"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_scst_names_the_kept_epochs_when_the_chosen_one_is_missing(ce_run):
    ce, tmp_path = ce_run
    with pytest.raises(CaptionerError, match=r"epoch-001.weights.h5 does not exist; .* keeps the "
                       r"epochs 2, 3 \(train with --keep-checkpoints N"):
        train_scst(ScstConfig(init=str(ce), out=str(tmp_path / "from1"), init_epoch=1), verbose=False)
    assert not (tmp_path / "from1").exists()
