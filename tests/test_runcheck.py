"""One validating loader for run folders: config.json schema, tokenizer vs config, weights vs
model; every problem one line naming the file and the field, exit status 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from runfolder import make_run

from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.inference.captioner import DEFAULT_RUN, Captioner
from captioner.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def pristine(untrained_run):
    return untrained_run


@pytest.fixture
def run(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "run")


def _edit(run, change) -> None:
    path = run / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _set(*keys, value=None, delete=False):
    def change(config):
        node = config
        for key in keys[:-1]:
            node = node[key]
        if delete:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return change


@pytest.mark.parametrize(
    "change, where",
    [
        (
            _set("format", value="other"),
            r"config\.json is not a captioner run config: format: 'other'",
        ),
        (
            _set("version", value=99),
            r"config\.json is not a valid run config: version: .* 99.*upgrade",
        ),
        (
            _set("decoder", "kind", value="lstm"),
            r"config\.json is not a valid run config: decoder\.kind: must be one of",
        ),
        (
            _set("decoder", "config", "units", value="many"),
            r"decoder\.config\.units: must be an integer",
        ),
        (
            _set("decoder", "config", "dropout", value=1.5),
            r"decoder\.config\.dropout: must be between",
        ),
        (
            _set("decoder", "config", "vocab_size", delete=True),
            r"decoder\.config\.vocab_size: missing",
        ),
        (_set("decoder", "config", "heads", value=4), r"decoder\.config\.heads: unknown key"),
        (
            _set("decoder", "config", "feature_shape", value=[0]),
            r"decoder\.config\.feature_shape: must be",
        ),
        (
            _set("decoder", "kind", value="attention"),
            r"feature_shape: an attention decoder needs spatial",
        ),
        (_set("encoder", "feature_shape", value=[32]), r"encoder\.feature_shape: \[32\] differs"),
        (_set("encoder", "name", value=None), r"encoder\.name: must be a non-empty string"),
        (
            _set("decoder", "config", "vocab_size", value=999),
            r"tokenizer\.json: words: 16 entries.*vocab_size is 999",
        ),
        (
            _set("decoder", "config", "max_length", value=30),
            r"config\.json: decoder\.config\.max_length: 30 differs",
        ),
        (
            _set("decoder", "config", "units", value=16),
            r"best\.weights\.h5: layer '\w+': the file holds shapes",
        ),
        (
            _set("decoder", "config", "embed_dim", value=4),
            r"best\.weights\.h5: layer 'embedding'.*\(16, 8\).*\(16, 4\)",
        ),
    ],
)
def test_each_config_problem_is_one_line_naming_file_and_field(run, capsys, change, where):
    _edit(run, change)
    with pytest.raises(CaptionerError, match=where):
        Captioner.from_run(run)
    assert main(["caption", "x.jpg", "--features", "none.h5", "--model", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_tokenizer_of_another_size_is_refused(run):
    Tokenizer.build(["a dog", "a cat on grass"], max_length=8).save(run / "tokenizer.json")
    with pytest.raises(CaptionerError, match=r"tokenizer\.json: \(file\): \d+ bytes, but config"):
        Captioner.from_run(run)
    _edit(run, _set("files", delete=True))  # a run folder without the manifest: the sizes
    with pytest.raises(CaptionerError, match=r"tokenizer\.json: words: \d+ entries, but config"):
        Captioner.from_run(run)


def test_an_altered_word_is_caught_by_the_manifest(run):
    text = (run / "tokenizer.json").read_text()
    (run / "tokenizer.json").write_text(text.replace('"dog"', '"dof"'))
    with pytest.raises(CaptionerError, match=r"tokenizer\.json: \(file\): sha256 differs"):
        Captioner.from_run(run)


def test_weights_of_another_run_name_the_layer_and_both_shapes(run, tmp_path):
    other = make_run(tmp_path / "other", feature_shape=(6,))
    shutil.copy(other / "best.weights.h5", run / "best.weights.h5")
    _edit(run, _set("files", delete=True))
    with pytest.raises(CaptionerError, match=r"layer '\w+': the file holds shapes \[\(6, "):
        Captioner.from_run(run)


def test_an_edited_max_length_is_honoured_when_both_files_agree(run):
    feats = np.random.default_rng(0).normal(size=(3, 16)).astype("float32")
    tok = json.loads((run / "tokenizer.json").read_text())
    tok["max_length"] = 3
    (run / "tokenizer.json").write_text(json.dumps(tok))
    _edit(run, _set("decoder", "config", "max_length", value=3))
    _edit(run, _set("files", delete=True))
    captions = Captioner.from_run(run).caption_features(feats)
    assert all(len(c[0].tokens) <= 2 for c in captions)


def test_run_folders_of_the_first_release_and_the_bundled_one_load(pristine):
    assert Captioner.from_run(pristine).tokenizer.vocab_size == 16
    assert Captioner.from_run(DEFAULT_RUN).decoder.kind == "attention"


def test_broken_json_is_one_line(run, capsys):
    (run / "config.json").write_text('{"format": "captioner.run", ')
    assert main(["caption", "x.jpg", "--features", "none.h5", "--model", str(run)]) == 2
    assert "config.json:1: not valid JSON" in capsys.readouterr().err
