"""Every bad argument or input is refused before any work starts: one line, exit status 2, and
no run folder or output left behind."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from helpers import toy_dataset, write_cache

import captioner.commands.extract as extract_cmd
import captioner.commands.train as train_cmd
from captioner.cli import main
from captioner.encoders.images import pixels_of
from captioner.formats.decoding_config import MAX_BEAM_SIZE
from captioner.inference.captioner import CONFIG_FILE
from captioner.text.captions import load_captions


def _fails(capsys, argv, *needles) -> str:
    """Run the CLI: exit 2 and exactly one stderr line that holds every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture()
def data(tmp_path):
    return toy_dataset(tmp_path, n_images=6)


def _train(data, out, *extra):
    caps, train_h5, val_h5, _ = data
    return [
        "train",
        "--captions",
        str(caps),
        "--train-features",
        str(train_h5),
        "--val-features",
        str(val_h5),
        "--out",
        str(out),
        "--decoder",
        "merge",
        "--batch-size",
        "4",
        "--embed-dim",
        "8",
        "--units",
        "8",
        "--min-count",
        "1",
        "--val-bleu-images",
        "2",
        "--quiet",
        *extra,
    ]


# --------------------------------------------------------------------------- train


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--epochs", "0", "--epochs must be at least 1, not 0"),
        ("--epochs", "-3", "--epochs must be at least 1, not -3"),
        ("--batch-size", "0", "--batch-size must be at least 1"),
        ("--max-length", "2", "--max-length must be at least 3"),
        ("--dropout", "1.0", "--dropout must be at least 0.0 and below 1.0"),
        ("--learning-rate", "0", "--learning-rate must be above 0"),
        ("--train-score-images", "-1", "--train-score-images must be at least 0, not -1"),
    ],
)
def test_train_numbers_out_of_range(tmp_path, data, capsys, option, value, needle):
    out = tmp_path / "run"
    _fails(capsys, _train(data, out, option, value), needle)
    assert not out.exists()


def test_attention_decoder_with_pooled_features(tmp_path, data, capsys):
    out = tmp_path / "run"
    _fails(
        capsys,
        _train(data, out) + ["--decoder", "attention"],
        "needs spatial features",
        "extract the conv layer",
    )
    assert not out.exists()


def test_conv_train_with_pooled_val_features(tmp_path, capsys):
    caps, train_h5, _, refs = toy_dataset(tmp_path, n_images=6, spatial=True)
    pooled = tmp_path / "val_pool.h5"
    write_cache(pooled, {n: np.ones(16, "float32") for n in list(refs)[:2]}, layer="pool")
    out = tmp_path / "run"
    argv = [
        "train",
        "--captions",
        str(caps),
        "--train-features",
        str(train_h5),
        "--val-features",
        str(pooled),
        "--decoder",
        "attention",
        "--out",
        str(out),
    ]
    _fails(capsys, argv, "--val-features", "layer", "feature_shape", "same encoder, layer")
    assert not out.exists()


def test_split_file_given_as_captions(tmp_path, data, capsys):
    split = tmp_path / "Flickr_8k.trainImages.txt"
    split.write_text("img000.jpg\nimg001.jpg\n")
    caps, train_h5, val_h5, _ = data
    out = tmp_path / "run"
    err = _fails(
        capsys,
        ["train", "--captions", str(split), "--train-features", str(train_h5), "--out", str(out)],
        "split file",
        "Flickr8k token file",
    )
    assert "pass it explicitly" not in err and "--format" not in err
    assert not out.exists()


def test_out_is_a_file(tmp_path, data, capsys):
    out = tmp_path / "run.txt"
    out.write_text("x")
    _fails(capsys, _train(data, out, "--epochs", "1"), "is a file")


@pytest.mark.training
def test_a_run_that_never_finished_an_epoch_does_not_block_a_retry(tmp_path, data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / CONFIG_FILE).write_text(json.dumps({"format": "captioner.run"}))  # crashed attempt
    assert main(_train(data, out, "--epochs", "1")) == 0
    assert "holds no finished epoch; starting it again" in capsys.readouterr().err
    assert (out / "checkpoint.h5").is_file()
    _fails(capsys, _train(data, out, "--epochs", "1"), "already holds a run", "--resume")


def test_ctrl_c_says_how_to_resume(monkeypatch, tmp_path, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd, "run_train", interrupted)
    monkeypatch.setattr(extract_cmd, "run_extract", interrupted)
    assert main(["train", "--out", "runs/x", "--resume", "--epochs", "9"]) == 130
    assert "`captioner train --out runs/x --resume --epochs 9` continues" in capsys.readouterr().err
    assert main(["extract", "photos/", "--out", "f.h5"]) == 130
    assert "saved in f.h5: run the same command again to resume" in capsys.readouterr().err


# --------------------------------------------------------------------------- caption


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--batch-size", "0"], ["--batch-size must be at least 1, not 0"]),
        (["--beam-size", "0"], ["--beam-size must be from 1 to", "(1 = greedy), not 0"]),
        (["--beam-size", "1000"], [f"--beam-size must be from 1 to {MAX_BEAM_SIZE}", "not 1000"]),
        (["--beam-size", "2", "--n-best", "3"], ["--n-best must be from 1 to 2 (at most the beam"]),
        (["--n-best", "0"], ["--n-best must be from 1 to"]),
        (["--max-length", "0"], ["--max-length must be from 1 to"]),
        (["--alpha", "-1"], ["--alpha must be from 0 to"]),
        (["--alpha", "nan"], ["--alpha must be from 0 to", "not nan"]),
        (["--block-ngram", "-1"], ["--block-ngram must be from 0 to", "(0 = off), not -1"]),
    ],
)
def test_caption_options_are_checked_before_the_model_loads(tmp_path, capsys, argv, needles):
    # --model points nowhere: the check must fire before the model is even looked for
    err = _fails(
        capsys, ["caption", "x.jpg", "--model", str(tmp_path / "nowhere"), *argv], *needles
    )
    if "0" in argv[1:2] and argv[0] == "--beam-size":
        assert "--n-best" not in err


def test_attention_map_naming_a_folder(tmp_path, capsys):
    _fails(
        capsys,
        ["caption", "x.jpg", "--attention-map", str(tmp_path)],
        "is a folder",
        "attention.png",
    )


def test_tiny_images_warn():
    pixels, warning, error = pixels_of(np.zeros((1, 1, 3)), (224, 224))
    assert pixels.shape == (224, 224, 3) and error is None
    assert "only 1x1 pixels" in warning and "guess" in warning
    assert pixels_of(np.zeros((64, 48, 3)), (224, 224))[1] is None
    _, _, error = pixels_of(np.zeros((5, 5, 7)), (8, 8))
    assert "not an image" in error


# --------------------------------------------------------------------------- extract / evaluate


def test_extract_out_naming_a_folder(tmp_path, capsys):
    _fails(
        capsys,
        ["extract", str(tmp_path), "--out", str(tmp_path)],
        "--out",
        "is a folder",
        "features.h5",
    )


def test_extract_unquoted_glob(tmp_path, capsys):
    _fails(
        capsys,
        ["extract", "a.jpg", "b.jpg", "c.jpg", "--out", str(tmp_path / "f.h5")],
        "got 3 sources",
        "quote it",
    )
    assert not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("beam", ["0", "1000"])
def test_evaluate_beam_size(tmp_path, capsys, beam):
    _fails(
        capsys,
        [
            "evaluate",
            "--captions",
            "c.txt",
            "--features",
            "f.h5",
            "--beam-size",
            "1",
            beam,
            "--out",
            str(tmp_path / "r"),
        ],
        f"--beam-size must be from 1 to {MAX_BEAM_SIZE} (1 = greedy), not {beam}",
    )
    assert not (tmp_path / "r").exists()


def test_caption_file_notice_is_printed_once(tmp_path, caplog):
    path = tmp_path / "caps.txt"
    path.write_text("a.jpg#0\ta dog runs\nbroken line without a tab\nb.jpg#0\ta cat\n")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert set(load_captions(path)) == {"a.jpg", "b.jpg"}
    assert len([r for r in caplog.records if "problem" in r.getMessage()]) == 1
