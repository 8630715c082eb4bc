"""Ensembles: several run folders decoded as one model inside the same beam search."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import train_toy

from captioner.errors import CaptionerError
from captioner.features.cache import open_features
from captioner.formats.run_folder import RunConfig
from captioner.inference.captioner import Captioner, EnsembleCaptioner
from captioner.inference.loader import load_captioner


@pytest.fixture(scope="module")
def runs(merge_toy, tmp_path_factory):
    """The session's toy merge run (seed 0) and one trained alike with seed 1."""
    dataset = (merge_toy.caps, merge_toy.features, merge_toy.val, merge_toy.refs)
    other = train_toy(tmp_path_factory.mktemp("ens"), seed=1, dataset=dataset)
    return [merge_toy.run, other.run], merge_toy.features


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


def _make_bundle():
    """scripts/make_bundle.py as a module."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("make_bundle", ROOT / "scripts" / "make_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundled(runs, tmp_path_factory):
    """A folder bundling run a with run b as a member (float32, then float16)."""
    (a, b), _ = runs
    tmp = tmp_path_factory.mktemp("bundle")
    _make_bundle().main([str(a), str(b), "--out", str(tmp / "f32")])
    _make_bundle().main([str(a), str(b), "--out", str(tmp / "f16"), "--float16"])
    return tmp / "f32", tmp / "f16"


def test_a_folder_listing_members_loads_as_their_ensemble(runs, bundled):
    (a, b), cache = runs
    reader = open_features(cache)
    feats = reader.read(reader.names)
    folder = Captioner.from_run(bundled[0])
    assert isinstance(folder, EnsembleCaptioner) and len(folder.members) == 2
    assert RunConfig.load(bundled[0]).members == ["member1.weights.h5"]
    pair = load_captioner([a, b]).caption_features(feats, beam_size=3)
    got = folder.caption_features(feats, beam_size=3)
    assert [c[0].text for c in got] == [c[0].text for c in pair]
    np.testing.assert_allclose([c[0].score for c in got], [c[0].score for c in pair], atol=1e-5)


def test_float16_bundle_halves_the_weights_and_keeps_the_log_probs(runs, bundled):
    _, cache = runs
    f32, f16 = bundled
    for name in ("best.weights.h5", "member1.weights.h5"):
        ratio = _stored_bytes(f16 / name) / _stored_bytes(f32 / name)
        assert ratio == 0.5, f"{name}: float16 variables take {ratio:.2f} of the float32 ones"
    reader = open_features(cache)
    feats = reader.read(reader.names[:4])
    tokens = np.full(4, 2)
    out = []
    for folder in (f32, f16):
        ens = Captioner.from_run(folder)
        out.append(ens.step_function()(tokens, ens.initial_state(feats))[0])
    assert np.abs(out[0] - out[1]).max() < 0.02
    assert not np.array_equal(out[0], out[1])  # really stored at lower precision


def _stored_bytes(path) -> int:
    import h5py

    sizes = []
    with h5py.File(path) as h5:
        h5.visititems(lambda _, obj: sizes.append(obj.nbytes) if isinstance(obj, h5py.Dataset) else None)
    return sum(sizes)


def test_a_missing_or_altered_member_is_named(bundled, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(bundled[0], folder)
    member = folder / "member1.weights.h5"
    data = bytearray(member.read_bytes())
    data[len(data) // 2] ^= 0xFF
    member.write_bytes(bytes(data))
    with pytest.raises(CaptionerError, match=r"member1\.weights\.h5.*sha256"):
        Captioner.from_run(folder)
    member.unlink()
    with pytest.raises(CaptionerError, match=r"member1\.weights\.h5 is missing.*members"):
        Captioner.from_run(folder)


@pytest.mark.parametrize("members, message", [
    ("member1.weights.h5", "must be a list"),
    (["../other/best.weights.h5"], r"members\[0\]"),
    (["best.weights.h5"], r"members\[0\]"),
    (["m.h5"], r"members\[0\]"),
    (["a.weights.h5", "a.weights.h5"], "twice"),
])
def test_bad_members_entries_are_refused(bundled, tmp_path, members, message):
    folder = tmp_path / "b"
    shutil.copytree(bundled[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["members"] = members
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CaptionerError, match=message):
        Captioner.from_run(folder)


def test_bundling_refuses_a_member_with_another_vocabulary(runs, tmp_path):
    (a, b), _ = runs
    other = tmp_path / "other"
    shutil.copytree(b, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["words"] = [*tok["words"][:-1], "zzz"]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CaptionerError, match="tokenizer.json differs"):
        _make_bundle().main([str(a), str(other), "--out", str(tmp_path / "out")])


def test_one_loader_and_one_caption_call(runs, tmp_path):
    """Several folders load through load_captioner with the first's stored decoding; caption()
    takes features and single-field overrides and returns ImageCaptions."""
    from captioner.formats.decoding_config import DecodingConfig

    (a, b), cache = runs
    stored = tmp_path / "a"
    shutil.copytree(a, stored)
    config = json.loads((stored / "config.json").read_text())
    (stored / "config.json").write_text(json.dumps(config | {"decoding": {"beam_size": 2}}))
    model = load_captioner([stored, b])
    assert isinstance(model, EnsembleCaptioner) and len(model.members) == 2
    assert model.decoding == DecodingConfig(beam_size=2)
    reader = open_features(cache)
    feats = reader.read(reader.names)
    found = model.caption(feats)
    assert [r.image for r in found] == list(range(len(feats))) and not any(r.error for r in found)
    assert [r.captions for r in found] == model.caption_features(feats, beam_size=2)
    assert model.caption(feats, beam_size=1) == model.caption(feats, DecodingConfig(1))
    assert model.caption(feats, n_best=2)[0].captions[1].score <= found[0].score


def test_make_bundle_stores_the_decoding_chosen_on_dev(runs, tmp_path):
    """--decoding FIELD=VALUE sets the bundle's stored decoding; a bad pair is one line."""
    from captioner.errors import CaptionerError
    from captioner.formats.run_folder import RunConfig

    (a, b), _ = runs
    _make_bundle().main([str(a), str(b), "--out", str(tmp_path / "tuned"),
                         "--decoding", "alpha=1.2", "beam_size=4"])
    decoding = RunConfig.load(tmp_path / "tuned").decoding
    assert (decoding.alpha, decoding.beam_size) == (1.2, 4)
    assert decoding.block_ngram == RunConfig.load(a).decoding.block_ngram  # the rest: the run's
    for bad, says in ((["alpha"], "expected FIELD=VALUE"), (["beam=3"], "FIELD one of beam_size"),
                      (["alpha=x"], "'x' is not a number"), (["alpha=-1"], "from 0 to 10")):
        with pytest.raises(CaptionerError, match=says):
            _make_bundle().main([str(a), "--out", str(tmp_path / "bad"), "--decoding", *bad])
