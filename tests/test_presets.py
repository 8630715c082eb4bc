"""Presets: one table of defaults that extract, train and evaluate share."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import ROOT

from captioner.cli import build_parser, main
from captioner.commands.train import config_from_args
from captioner.formats import presets
from captioner.formats.run_folder import RunConfig
from captioner.train.training import MEASURE_ONLY, TrainConfig


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_every_preset_names_real_parts(name):
    from captioner.encoders.specs import get_spec
    from captioner.model.decoders import DECODERS

    preset = presets.PRESETS[name]
    assert preset.layer in get_spec(preset.encoder).layers
    assert preset.decoder in DECODERS
    assert set(preset.training) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_bundled_model_was_trained_with_the_default_preset():
    config = RunConfig.load(ROOT / "weights" / "default")
    preset = presets.get_preset(config.preset)
    assert config.preset == presets.DEFAULT_PRESET
    assert (config.encoder.name, config.encoder.layer) == (preset.encoder, preset.layer)
    assert config.decoder.kind == preset.decoder
    trained = {k: v for k, v in preset.training.items() if k not in MEASURE_ONLY}
    assert trained and {k: config.training[k] for k in trained} == trained


def _train_args(*extra):
    return build_parser().parse_args(
        ["train", "--out", "r", "--captions", "c", "--train-features", "t", *extra]
    )


def test_train_takes_unset_options_from_the_preset():
    default = config_from_args(_train_args())
    assert (default.decoder, default.epochs, default.schedule) == ("attention", 8, "cosine")
    assert (default.label_smoothing, default.val_beam_size, default.select_on) == (
        0.1, 3, "bleu4+cider")
    assert default.preset == "default" and default.max_length == 22
    classic = config_from_args(_train_args("--preset", "classic", "--epochs", "3"))
    assert (classic.decoder, classic.epochs, classic.schedule) == ("merge", 3, "constant")
    assert classic.max_length is None and classic.preset == "classic"
    given = config_from_args(_train_args("--decoder", "inject", "--patience", "0"))
    assert (given.decoder, given.patience) == ("inject", 0)


def test_extract_and_evaluate_take_the_preset(monkeypatch, tmp_path):
    seen = {}

    def fake_extract(paths, out, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr("captioner.features.extraction.extract_with_spec", fake_extract)
    (tmp_path / "a.jpg").write_bytes(b"")
    for argv, expected in (
        (["--preset", "classic"], ("vgg16", "fc2")),
        ([], ("efficientnet_lite2", "conv")),
        (["--encoder", "resnet50"], ("resnet50", None)),
    ):
        with pytest.raises(SystemExit):
            main(["extract", str(tmp_path / "a.jpg"), "--out", str(tmp_path / "f.h5"), *argv])
        assert (seen["encoder"], seen["layer"]) == expected
    args = build_parser().parse_args(
        ["evaluate", "--captions", "c", "--out", "r", "--preset", "classic"]
    )
    assert args.beam_size is None and presets.get_preset(args.preset).decoding.beam_size == 1


def test_help_says_where_defaults_come_from(capsys):
    for command in ("extract", "train"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "--preset" in out and "Options left unset take their values from --preset" in out
    for command in ("caption", "evaluate", "serve"):  # decoding: the model's own
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "decoding (default: the model's own, stored in its config.json)" in out
