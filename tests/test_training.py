"""Stage 4 training: overfitting, run folders, reload, resume (also after SIGKILL)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import FLICKR_IMAGES, FLICKR_TEXT, ROOT, needs_flickr, needs_mobilenet
from helpers import toy_dataset, write_cache

from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.features.cache import open_features
from captioner.formats.run_folder import RunConfig, read_history
from captioner.inference.captioner import Captioner
from captioner.train.training import TrainConfig, train

TINY = dict(batch_size=8, embed_dim=16, units=32, dropout=0.0, min_count=1, learning_rate=0.02,
            val_bleu_images=4, patience=0)


def _config(tmp_path, data, out="run", **kw):
    caps, train_h5, val_h5, _ = data
    return TrainConfig(captions=str(caps), train_features=str(train_h5), val_features=str(val_h5),
                       out=str(tmp_path / out), **{**TINY, **kw})


@pytest.fixture()
def data(tmp_path):
    return toy_dataset(tmp_path, n_images=8)


def _one_caption_per_image(tmp_path, spatial=False):
    caps, train_h5, val_h5, refs = toy_dataset(tmp_path, n_images=6, spatial=spatial)
    lines = [f"{n}#0\t{c[0]}" for n, c in refs.items()]
    caps.write_text("\n".join(lines) + "\n")
    return caps, train_h5, val_h5, {n: c[0] for n, c in refs.items()}


@pytest.mark.parametrize("kind", ["merge", "inject", "attention"])
def test_tiny_model_overfits_until_greedy_reproduces_captions(tmp_path, kind):
    data = _one_caption_per_image(tmp_path, spatial=kind == "attention")
    run = train(_config(tmp_path, data, decoder=kind, epochs=60, batch_size=6), verbose=0)
    captioner = Captioner.from_run(run, weights="last")
    reader = open_features(data[1])
    results = captioner.caption_features(reader.read(reader.names))
    assert [r[0].text for r in results] == [data[3][n] for n in reader.names]
    assert all(r[0].finished for r in results)


def test_run_folder_contents_and_config(tmp_path, data):
    run = train(_config(tmp_path, data, epochs=3, keep_checkpoints=2), verbose=0)
    files = {p.name for p in run.iterdir()}
    assert {"config.json", "tokenizer.json", "best.weights.h5", "last.weights.h5",
            "checkpoint.h5", "history.csv", "curves.png", "checkpoints"} <= files
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch-002.weights.h5", "epoch-003.weights.h5"]
    config = json.loads((run / "config.json").read_text())
    assert config["decoder"]["kind"] == "merge"
    assert config["decoder"]["config"]["vocab_size"] == 4 + 12  # reserved + toy words
    assert config["encoder"]["name"] == "tiny" and config["encoder"]["layer"] == "pool"
    assert config["training"]["epochs"] == 3 and config["seed"] == 0
    assert config["versions"]["keras"] and config["cleaning"]["lowercase"] is True
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert all(0.0 <= float(r["val_bleu4"]) <= 1.0 for r in rows)
    assert all(r["train_cider"] == "" for r in rows)  # not asked for


def test_training_images_are_scored_each_epoch_when_asked(tmp_path):
    data = _one_caption_per_image(tmp_path)
    run = train(_config(tmp_path, data, epochs=40, batch_size=6, train_score_images=4), verbose=0)
    rows = read_history(run / "history.csv")
    assert len(rows) == 40 and all(r["train_bleu4"] is not None for r in rows)
    # the tiny decoder learns its one caption per image by heart: training CIDEr-D climbs
    assert rows[-1]["train_cider"] > rows[0]["train_cider"] + 1.0
    assert RunConfig.load(run).training["train_score_images"] == 4


def test_reload_from_folder_gives_identical_predictions(tmp_path, data):
    from captioner.model.decoders import build_decoder  # noqa: F401  (registers classes)

    run = train(_config(tmp_path, data, epochs=2), verbose=0)
    a, b = Captioner.from_run(run, "last"), Captioner.from_run(run, "last")
    reader = open_features(data[1])
    feats = reader.read(reader.names)
    tokens = np.full((len(feats), 5), 2, "int32")
    np.testing.assert_array_equal(np.asarray(a.decoder((feats, tokens))),
                                  np.asarray(b.decoder((feats, tokens))))
    ca = a.caption_features(feats, beam_size=3, n_best=2)
    cb = b.caption_features(feats, beam_size=3, n_best=2)
    assert [[c.text for c in r] for r in ca] == [[c.text for c in r] for r in cb]
    assert [[c.score for c in r] for r in ca] == [[c.score for c in r] for r in cb]


def _last_weights(run):
    with h5py.File(run / "checkpoint.h5") as h5:
        return [h5["model"][k][()] for k in sorted(h5["model"])]


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, data):
    full = train(_config(tmp_path, data, out="full", epochs=4, dropout=0.3), verbose=0)
    part = train(_config(tmp_path, data, out="part", epochs=2, dropout=0.3), verbose=0)
    train(_config(tmp_path, data, out="part", epochs=4), resume=True, verbose=0)
    for a, b in zip(_last_weights(full), _last_weights(part), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    rows = list(csv.DictReader(open(part / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert RunConfig.load(part).training["epochs"] == 4  # the run records its new length


def _mirror_cache(path, train_h5, **kw):
    with open_features(train_h5) as reader:
        rows = reader.read(reader.names)
        return write_cache(path, {n: r[::-1] for n, r in zip(reader.names, rows, strict=True)},
                           **kw)


def test_mirrored_features_augment_training_and_are_recorded(tmp_path, data):
    mirror = _mirror_cache(tmp_path / "mirror.h5", data[1], mirrored=True)
    run = train(_config(tmp_path, data, out="m", epochs=2, mirrored_features=str(mirror)), verbose=0)
    plain = train(_config(tmp_path, data, out="p", epochs=2), verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(_last_weights(run), _last_weights(plain),
                                                         strict=True))
    saved = RunConfig.load(run)
    assert saved.sources["mirrored_features"].name == "mirror.h5"
    assert "mirrored_features" not in saved.training  # a file, not a setting
    assert saved.sources.get("mirrored_features") and not RunConfig.load(plain).sources.get(
        "mirrored_features")
    train(TrainConfig(captions="", train_features="", out=str(run), epochs=3), resume=True,
          verbose=0)  # finds the mirrored cache where the run recorded it
    assert [r["epoch"] for r in read_history(run / "history.csv")] == [1, 2, 3]


def test_mirrored_features_must_be_mirrored_and_of_the_same_encoder(tmp_path, data):
    unmarked = _mirror_cache(tmp_path / "unmarked.h5", data[1])
    with pytest.raises(CaptionerError, match="unmirrored photos; make the mirrored cache with "
                       "`captioner extract --mirror`"):
        train(_config(tmp_path, data, epochs=1, mirrored_features=str(unmarked)), verbose=0)
    other = _mirror_cache(tmp_path / "other.h5", data[1], mirrored=True, encoder="vgg16")
    with pytest.raises(CaptionerError, match=r"other.h5: not the training cache's encoder \(encoder: "
                       r"file has 'vgg16', expected 'tiny'\); extract the mirrored photos with it"):
        train(_config(tmp_path, data, epochs=1, mirrored_features=str(other)), verbose=0)
    partial = tmp_path / "partial.h5"
    with open_features(data[1]) as reader:
        write_cache(partial, {n: r for n, r in zip(reader.names[:3], reader.read(reader.names[:3]),
                                                   strict=True)}, mirrored=True)
    with pytest.raises(CaptionerError, match=r"no cached features for 5 of 8 image.*run `captioner "
                       r"extract --mirror` on the training photos into .*partial.h5"):
        train(_config(tmp_path, data, epochs=1, mirrored_features=str(partial)), verbose=0)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_existing_run_needs_resume(tmp_path, data):
    train(_config(tmp_path, data, epochs=1), verbose=0)
    with pytest.raises(CaptionerError, match="already holds a run; resume it to continue"):
        train(_config(tmp_path, data, epochs=1), verbose=0)


def _cli_args(data, out, epochs):
    caps, train_h5, val_h5, _ = data
    return ["train", "--preset", "classic", "--captions", str(caps), "--train-features", str(train_h5),
            "--val-features", str(val_h5), "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "4", "--embed-dim", "16", "--units", "32", "--min-count", "1",
            "--learning-rate", "0.01", "--val-bleu-images", "4", "--patience", "0",
            "--dropout", "0.2", "--quiet"]


def test_resume_without_epochs_finishes_the_runs_own_schedule(tmp_path, data, capsys):
    """A 3-epoch run stopped after epoch 1 resumes to 3 (not the preset's 20); resuming a
    finished run, or asking for fewer epochs than done, says so in one line."""
    out = tmp_path / "run"
    assert main(_cli_args(data, out, 1)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["decoding"] == {"beam_size": 1, "n_best": 1, "alpha": 0.0, "block_ngram": 0,
                                  "max_length": None, "grounding": 0.0, "grounding_boost": 0.0,
                                  "consensus": 0, "consensus_weight": 1.0}  # the classic preset's
    config["training"]["epochs"] = 3  # as if a 3-epoch run was killed after its first epoch
    (out / "config.json").write_text(json.dumps(config))
    resume = ["train", "--out", str(out), "--resume", "--quiet"]
    capsys.readouterr()
    assert main(resume) == 0
    assert [r["epoch"] for r in read_history(out / "history.csv")] == [1, 2, 3]
    assert RunConfig.load(out).training["epochs"] == 3
    capsys.readouterr()
    assert main(resume) == 0
    err = capsys.readouterr().err.strip()
    assert err == f"{out} has finished 3 of its 3 epochs; nothing to train (resuming with " \
                  "more epochs than 3 trains on)"
    assert main([*resume, "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--epochs 2 is below the 3 epochs" in err
    assert len(read_history(out / "history.csv")) == 3


def test_sigkill_loses_at_most_the_epoch_in_flight(tmp_path, data):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "cli.py", *_cli_args(data, out, 40)], cwd=ROOT,
                            env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "history.csv").exists() and len((out / "history.csv").read_text().splitlines()) > 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(csv.DictReader(open(out / "history.csv"))))
    assert done >= 3
    assert main(_cli_args(data, out, 6) + ["--resume"]) == 0
    assert main(_cli_args(data, tmp_path / "clean", 6)) == 0
    for a, b in zip(_last_weights(out), _last_weights(tmp_path / "clean"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.shared
@needs_flickr
@needs_mobilenet
def test_one_short_epoch_on_real_flickr8k_captions_lowers_the_loss(tmp_path):
    """~100 real photos (500 captions), genuine MobileNetV2 alpha=0.5 features, one epoch."""
    from captioner.features.extraction import extract_with_spec
    from captioner.model.decoders import MaskedSparseCrossEntropy
    from captioner.text.captions import load_captions, load_split
    from captioner.text.cleaning import clean_captions
    from captioner.text.tokenizer import Tokenizer
    from captioner.train.batches import CaptionDataset

    names = load_split(FLICKR_TEXT / "Flickr_8k.trainImages.txt")[:100]
    paths = [FLICKR_IMAGES / n for n in names]
    extract_with_spec(paths, tmp_path / "train.h5", encoder="mobilenet_v2_0.5", layer="pool",
                      batch_size=50, progress=False)
    run = train(TrainConfig(captions=str(FLICKR_TEXT / "Flickr8k.token.txt"),
                            train_features=str(tmp_path / "train.h5"), out=str(tmp_path / "run"),
                            epochs=1, batch_size=32, min_count=1, val_bleu_images=0),
                verbose=0)
    captioner = Captioner.from_run(run, "last")
    reader = open_features(tmp_path / "train.h5")
    captions = clean_captions(load_captions(FLICKR_TEXT / "Flickr8k.token.txt"))
    captions = {n: captions[n] for n in reader.names}
    tokenizer = Tokenizer.load(run / "tokenizer.json")
    data = CaptionDataset(reader, captions, tokenizer, batch_size=500, shuffle=False)
    (feats, tokens_in), tokens_out, weights = data[0]
    loss = MaskedSparseCrossEntropy()
    after = float(loss(tokens_out, captioner.decoder((feats, tokens_in)), sample_weight=weights))
    from captioner.model.decoders import build_decoder

    fresh = build_decoder("merge", **captioner.config.decoder.config)
    before = float(loss(tokens_out, fresh((feats, tokens_in)), sample_weight=weights))
    assert len(data.tokens) == 500
    assert before == pytest.approx(np.log(tokenizer.vocab_size), rel=0.05)  # uniform guess
    assert after < before - 1.0
    history = list(csv.DictReader(open(run / "history.csv")))
    assert len(history) == 1 and float(history[0]["loss"]) < before


def test_weight_files_hold_the_model_without_optimizer_slots(tmp_path, data):
    run = train(_config(tmp_path, data, epochs=1), verbose=0)
    with h5py.File(run / "last.weights.h5") as h5:
        assert "optimizer" not in h5 and len(h5) > 0
    with h5py.File(run / "checkpoint.h5") as h5:
        assert len(h5["optimizer"]) > 0  # resuming still has the optimizer state


def test_validation_loss_without_bleu_sample(tmp_path, data):
    run = train(_config(tmp_path, data, epochs=1, val_bleu_images=0), verbose=0)
    row = next(csv.DictReader(open(run / "history.csv")))
    assert float(row["val_loss"]) > 0 and row["val_bleu4"] == ""


def test_mixed_precision_is_scoped_to_the_training_call(tmp_path, data):
    import keras

    before = keras.config.dtype_policy().name
    train(_config(tmp_path, data, epochs=1, mixed_precision=True), verbose=0)
    assert keras.config.dtype_policy().name == before == "float32"


@pytest.mark.parametrize("kind", ["merge", "attention"])
def test_length_bucketed_training_runs_with_captions_of_many_lengths(tmp_path, kind):
    """Bucketed batches vary in length from batch to batch (TensorFlow then relaxes the trace
    to an unknown length); training and validation must still run and lower the loss."""
    caps, train_h5, val_h5, refs = toy_dataset(tmp_path, n_images=12, spatial=kind == "attention")
    words = "a dog runs on the green grass near the big old tree today".split()
    lines = [f"{n}#{k}\t{' '.join(words[: 2 + (i + k) % 11])}"
             for i, n in enumerate(refs) for k in range(3)]
    caps.write_text("\n".join(lines) + "\n")
    config = _config(tmp_path, (caps, train_h5, val_h5, refs), decoder=kind, epochs=3,
                     batch_size=4, bucket=True)
    run = train(config, verbose=0)
    with open(run / "history.csv") as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert len(losses) == 3 and losses[-1] < losses[0]
