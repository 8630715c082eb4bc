"""Run-folder files from elsewhere: numbers in them cannot make captioner allocate without
bound, and a weights file cannot make it read other files; each refusal is one line."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.inference.captioner import Captioner
from captioner.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def pristine(untrained_run):
    return untrained_run


@pytest.fixture
def run(pristine, tmp_path):
    run = shutil.copytree(pristine, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config.pop("files", None)  # edits below are what is tested, not the manifest
    (run / "config.json").write_text(json.dumps(config))
    return run


def _refused_in_one_line(run, capsys, pattern: str) -> None:
    with pytest.raises(CaptionerError, match=pattern):
        Captioner.from_run(run)
    assert main(["caption", "x.jpg", "--features", "none.h5", "--model", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(("field", "value"), [("vocab_size", 1 << 20), ("units", 1 << 20)])
def test_a_config_describing_a_huge_decoder_is_refused_before_building(run, capsys, field, value):
    config = json.loads((run / "config.json").read_text())
    config["decoder"]["config"].update({field: value, "embed_dim": 1 << 20})
    (run / "config.json").write_text(json.dumps(config))
    _refused_in_one_line(run, capsys, r"config\.json is not a valid run config: decoder\.config: "
                                      r"describes a decoder of about [\d,]+ parameters")


def _add_to_weights(run, add) -> None:
    with h5py.File(run / "best.weights.h5", "a") as f:
        add(f)


@pytest.mark.parametrize(("add", "says"), [
    (lambda f: f.__setitem__("stolen", h5py.ExternalLink("/etc/other.h5", "/data")),
     r"/stolen: is a ExternalLink"),
    (lambda f: f.__setitem__("alias", h5py.SoftLink("/nowhere")), r"/alias: is a SoftLink"),
    (lambda f: f.create_dataset("ids", data=np.arange(3)), r"/ids: holds int64 values"),
    (lambda f: f.create_dataset("outside", shape=(4,), dtype="f4",
                                external=[("/etc/hostname", 0, 16)]),
     r"/outside: reads its values from other files"),
])
def test_weights_files_hold_only_their_own_real_numbers(run, capsys, add, says):
    _add_to_weights(run, add)
    _refused_in_one_line(run, capsys, r"best\.weights\.h5: " + says)


def test_the_untouched_run_still_loads(run):
    assert Captioner.from_run(run).tokenizer.vocab_size == 16


@pytest.mark.parametrize(("edit", "says"), [
    (lambda t: t.update(max_length=10**12), "max_length must be between 2"),
    (lambda t: t["words"].append(["not", "a", "word"]), "every word must be a non-empty string"),
    (lambda t: t["words"].append("two words"), "every word must be a non-empty string"),
])
def test_a_tokenizer_file_cannot_ask_for_unbounded_arrays(tmp_path, edit, says):
    tok = Tokenizer.build(["a dog runs", "a cat sits"]).to_json()
    edit(tok)
    tok["counts"] = tok["counts"] + [1] * (len(tok["words"]) - len(tok["counts"]))
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CaptionerError, match=f"tokenizer.json: invalid tokenizer.*{says}"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_a_feature_cache_cannot_read_other_files(tmp_path):
    from helpers import write_cache

    from captioner.features.cache import FeatureReader

    path = write_cache(tmp_path / "feats.h5", {"a.jpg": np.ones(4, np.float32)})
    FeatureReader(path).close()  # the cache as written loads
    with h5py.File(path, "a") as f:
        f["extra"] = h5py.ExternalLink(str(tmp_path / "secret.h5"), "/data")
    with pytest.raises(CaptionerError, match=r"feats\.h5: /extra: is a ExternalLink"):
        FeatureReader(path)
