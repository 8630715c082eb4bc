"""Object grounding: the family map, the ImageNet head's word bonus, and captions that name an
object only when the head supports it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from captioner.errors import CaptionerError
from captioner.formats.decoding_config import DecodingConfig
from captioner.formats.run_folder import DEFAULT_RUN
from captioner.inference.decoding import beam_search, greedy_search
from captioner.inference.grounding import (
    BUNDLED_FAMILIES,
    FLOOR,
    Grounding,
    GroundingError,
    ObjectFamilies,
    grounded,
    read_head,
    write_head,
)
from captioner.text.tokenizer import Tokenizer

VOCAB = ["<pad>", "<unk>", "<start>", "<end>", "a", "dog", "cat", "runs", "grass"]
DOG_CLASS, CAT_CLASS, OTHER_CLASS = 200, 281, 900


def _families(tmp_path, families=None):
    path = tmp_path / "families.json"
    payload = {"format": "captioner.object_families", "version": 1, "families": families or {
        "dog": {"words": ["dog", "dogs"], "classes": {str(DOG_CLASS): "n0 beagle"}},
        "cat": {"words": ["cat"], "classes": {str(CAT_CLASS): "n1 tabby"}}}}
    path.write_text(json.dumps(payload))
    return path


def _head(channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A head whose channel 0 says dog, 1 says cat, 2 says something else (logit 20 each)."""
    kernel = np.zeros((channels, 1000), np.float32)
    kernel[0, DOG_CLASS] = kernel[1, CAT_CLASS] = kernel[2, OTHER_CLASS] = 20.0
    return kernel, np.zeros(1000, np.float32)


def _grounding(tmp_path) -> Grounding:
    return Grounding(*_head(), ObjectFamilies.load(_families(tmp_path)), VOCAB)


# ---------------------------------------------------------------- the bundled family map


def test_bundled_map_ties_dogs_to_the_118_breeds_and_every_family_to_the_vocabulary():
    families = ObjectFamilies.load(BUNDLED_FAMILIES)
    named = dict(zip(families.names, families.classes, strict=True))
    breeds = set(range(151, 269))
    assert breeds <= set(named["dog"]) and len(set(named["dog"]) - breeds) <= 2
    assert set(named["cat"]) == {281, 282, 283, 284, 285}  # tabby .. Egyptian cat
    assert not set(named["cat"]) & set(named["dog"])
    words = Tokenizer.load(DEFAULT_RUN / "tokenizer.json").words
    matrix = families.word_matrix(words)
    assert (matrix.sum(axis=1) >= 1).all(), "a family without a single vocabulary word"
    data = json.loads(BUNDLED_FAMILIES.read_text())
    assert data["families"]["dog"]["classes"]["207"].endswith("golden retriever")
    assert data["families"]["cat"]["classes"]["281"].endswith("tabby")


@pytest.mark.parametrize(("families", "says"), [
    ({"dog": {"words": [], "classes": {"200": "x"}}}, "'words' must be a non-empty list"),
    ({"dog": {"words": ["Dog"], "classes": {"200": "x"}}}, "lowercase words"),
    ({"dog": {"words": ["dog"], "classes": {"1000": "x"}}}, "class indices must be in 0..999"),
    ({"dog": {"words": ["dog"], "classes": {"two": "x"}}}, "class keys must be integers"),
    ({"dog": ["dog"]}, "must be an object"),
])
def test_a_bad_family_map_is_one_line_naming_the_file_and_family(tmp_path, families, says):
    path = _families(tmp_path, families)
    with pytest.raises(GroundingError, match=says) as err:
        ObjectFamilies.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_family_map_that_is_not_json_or_not_ours_is_refused(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("{not json")
    with pytest.raises(GroundingError, match="cannot read"):
        ObjectFamilies.load(path)
    path.write_text(json.dumps({"format": "other", "families": {}}))
    with pytest.raises(GroundingError, match="not a captioner.object_families file"):
        ObjectFamilies.load(path)


# ---------------------------------------------------------------- the head and the bonus


def test_class_probs_pool_the_feature_map_and_apply_the_head(tmp_path):
    g = _grounding(tmp_path)
    maps = np.zeros((2, 2, 2, 3), np.float32)
    maps[0, ..., 0] = 1.0  # image 0: dog channel
    maps[1, 0, 0, 1] = 4.0  # image 1: cat channel in one region only (mean 1.0)
    probs = g.class_probs(maps)
    assert probs.shape == (2, 1000)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert probs[0].argmax() == DOG_CLASS and probs[1].argmax() == CAT_CLASS
    expected = np.exp(20) / (np.exp(20) + 999)
    np.testing.assert_allclose(probs[0, DOG_CLASS], expected, rtol=1e-5)
    np.testing.assert_allclose(g.class_probs(maps.mean(axis=(1, 2))), probs, rtol=1e-6)


def test_word_bonus_is_strength_times_log_family_mass_for_family_words_only(tmp_path):
    g = _grounding(tmp_path)
    feats = np.array([[1.0, 0, 0], [0, 0, 1.0]], np.float32)  # a dog; something else
    bonus = g.word_bonus(feats, strength=2.0)
    probs = g.class_probs(feats)
    dog, cat = VOCAB.index("dog"), VOCAB.index("cat")
    np.testing.assert_allclose(bonus[0, dog], 2.0 * np.log(probs[0, DOG_CLASS]), rtol=1e-5)
    np.testing.assert_allclose(bonus[1, dog], 2.0 * np.log(FLOOR), rtol=1e-5)  # mass < floor
    np.testing.assert_allclose(bonus[0, cat], 2.0 * np.log(max(probs[0, CAT_CLASS], FLOOR)))
    others = [i for i, w in enumerate(VOCAB) if w not in ("dog", "cat")]
    assert (bonus[:, others] == 0).all()
    assert list(g.gated_words) == [dog, cat]
    assert (g.word_bonus(feats, 0.0) == 0).all()


def test_boost_adds_only_where_the_head_is_sure(tmp_path):
    g = _grounding(tmp_path)
    feats = np.array([[1.0, 0, 0], [0.1, 0, 0]], np.float32)  # sure of a dog; unsure
    mass = g.class_probs(feats)[:, DOG_CLASS]
    assert mass[0] > 0.99 and mass[1] < 0.5
    extra = g.word_bonus(feats, 1.0, boost=3.0) - g.word_bonus(feats, 1.0)
    dog = VOCAB.index("dog")
    np.testing.assert_allclose(extra[0, dog], 3.0 * (2 * mass[0] - 1), rtol=1e-5)
    assert extra[1, dog] == 0 and (extra[:, VOCAB.index("runs")] == 0).all()


def test_features_of_another_width_are_refused(tmp_path):
    with pytest.raises(GroundingError, match="takes 3 channels, the features have 5"):
        _grounding(tmp_path).class_probs(np.zeros((1, 5)))


def test_head_files_round_trip_and_bad_ones_are_refused(tmp_path):
    kernel, bias = _head()
    write_head(tmp_path / "h.npz", kernel, bias)
    k, b = read_head(tmp_path / "h.npz")
    np.testing.assert_array_equal(k, kernel) and np.testing.assert_array_equal(b, bias)
    np.savez(tmp_path / "nan.npz", kernel=np.full((3, 1000), np.nan), bias=bias)
    np.savez(tmp_path / "shape.npz", kernel=np.zeros((3, 10)), bias=bias)
    np.savez(tmp_path / "objects.npz", kernel=np.array([{"x": 1}], dtype=object), bias=bias)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name, says in [("nan.npz", "finite float"), ("shape.npz", "finite float"),
                       ("objects.npz", "cannot read"), ("junk.npz", "cannot read"),
                       ("missing.npz", "cannot read")]:
        with pytest.raises(GroundingError, match=says) as err:
            read_head(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- in the search (a fake model)


def _fake_step(tokens, state):
    """A decoder that always prefers "dog", then "cat", then the end token after 2 words."""
    rows = len(tokens)
    logits = np.full((rows, len(VOCAB)), -10.0)
    logits[:, VOCAB.index("dog")], logits[:, VOCAB.index("cat")] = -0.5, -1.5
    logits[:, 3] = np.where(state[:, 0] >= 2, 0.0, -20.0)  # <end> once 2 words are out
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return logp, state + 1


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_a_dog_the_head_does_not_see_becomes_the_cat_it_sees(tmp_path, search):
    g = _grounding(tmp_path)
    feats = np.array([[1.0, 0, 0], [0, 1.0, 0]], np.float32)  # a dog, a cat
    state = np.zeros((2, 1))

    def run(strength):
        s, step = grounded(state, _fake_step, g.word_bonus(feats, strength))
        if search == "greedy":
            return [h.tokens for h in greedy_search(step, s, 2, 2, 3, 5)]
        return [h[0].tokens for h in beam_search(step, s, 2, 2, 3, 5, beam_size=3)]

    dog, cat = VOCAB.index("dog"), VOCAB.index("cat")
    assert run(0.0) == [(dog, dog), (dog, dog)]
    assert run(1.0) == [(dog, dog), (cat, cat)]


# ---------------------------------------------------------------- in a run folder


def _grounded_run(untrained_run, tmp_path):
    """A copy of the untrained run carrying a head over its 16 features and a family map that
    gates the first word of its own ungrounded caption."""
    from captioner.inference.captioner import Captioner
    from captioner.storage.files import sha256sum

    run = tmp_path / "run"
    shutil.copytree(untrained_run, run)
    feats = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    first = Captioner.from_run(run).caption(feats, decoding=DecodingConfig(beam_size=1))
    word = first[0].captions[0].text.split()[0]
    kernel = np.zeros((16, 1000), np.float32)  # every image: class 999 (not in a family)
    bias = np.zeros(1000, np.float32)
    bias[999] = 30.0
    write_head(run / "imagenet_head.npz", kernel, bias)
    _families(tmp_path)  # the file layout; the word is the caption's own
    families = {"thing": {"words": [word], "classes": {"5": "n5 thing"}}}
    (run / "object_families.json").write_text(json.dumps(
        {"format": "captioner.object_families", "version": 1, "families": families}))
    config = json.loads((run / "config.json").read_text())
    config["grounding"] = {"head": "imagenet_head.npz", "families": "object_families.json"}
    for name in ("imagenet_head.npz", "object_families.json"):
        config["files"][name] = {"size": (run / name).stat().st_size,
                                 "sha256": sha256sum(run / name)}
    (run / "config.json").write_text(json.dumps(config))
    return run, feats, word


def test_a_run_folder_with_a_head_drops_the_word_its_head_does_not_support(untrained_run, tmp_path):
    from captioner.inference.loader import load_captioner

    run, feats, word = _grounded_run(untrained_run, tmp_path)
    cap = load_captioner(run, runtime="keras")
    assert cap.grounding is not None
    plain = cap.caption(feats, decoding=DecodingConfig(beam_size=1))
    assert word in plain[0].captions[0].text.split()
    for beam in (1, 3):
        found = cap.caption(feats, decoding=DecodingConfig(beam_size=beam, grounding=5.0))
        assert all(word not in r.captions[0].text.split() for r in found)


def test_an_ensemble_grounds_with_any_members_head(untrained_run, tmp_path):
    """A member from before the head (no imagenet_head.npz) listed first does not switch
    grounding off for the ensemble: the members share one encoder, so one head serves all."""
    from captioner.inference.loader import load_captioner

    run, feats, word = _grounded_run(untrained_run, tmp_path)
    both = load_captioner([untrained_run, run], runtime="keras")
    assert both.grounding is not None
    plain = both.caption(feats, decoding=DecodingConfig(beam_size=1))
    assert word in plain[0].captions[0].text.split()
    found = both.caption(feats, decoding=DecodingConfig(beam_size=1, grounding=5.0))
    assert all(word not in r.captions[0].text.split() for r in found)


def test_a_damaged_head_in_a_run_folder_is_one_line(untrained_run, tmp_path):
    from captioner.inference.loader import load_captioner

    run, _, _ = _grounded_run(untrained_run, tmp_path)
    with open(run / "imagenet_head.npz", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(CaptionerError, match="imagenet_head.npz") as err:
        load_captioner(run, runtime="keras")
    assert "\n" not in str(err.value)


def test_config_grounding_must_name_plain_files(untrained_run, tmp_path):
    from captioner.formats.run_folder import RunConfig

    run, _, _ = _grounded_run(untrained_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["grounding"]["head"] = "../elsewhere.npz"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CaptionerError, match="grounding.head"):
        RunConfig.load(run)


def test_grounding_is_a_checked_decoding_setting():
    assert DecodingConfig().grounding == 0.0
    assert DecodingConfig(grounding=2).grounding == 2.0
    with pytest.raises(CaptionerError, match="grounding"):
        DecodingConfig(grounding=-1.0)
    with pytest.raises(CaptionerError, match="grounding"):
        DecodingConfig(grounding=float("nan"))
    with pytest.raises(CaptionerError, match="grounding_boost"):
        DecodingConfig(grounding_boost=11)
    assert DecodingConfig(alpha=0.7, grounding=2, grounding_boost=3).label == (
        "beam 3, alpha 0.7, grounding 2 (boost 3)")
    assert "grounding" not in DecodingConfig().label


def test_the_exported_model_grounds_its_captions_as_keras_does(tmp_path):
    """An attention run with a head exported to ONNX: both runtimes give the same grounded
    captions, and the export carries (and checks) the head and the family map."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    from runfolder import make_run
    from test_export import FEATURES, _tiny_encoder

    from captioner.cli import main
    from captioner.inference.captioner import Captioner
    from captioner.inference.loader import load_captioner
    from captioner.storage.files import sha256sum

    run = make_run(tmp_path / "run", "attention", FEATURES, seed=3)
    feats = np.random.default_rng(1).normal(size=(4, *FEATURES)).astype(np.float32)
    plain = Captioner.from_run(run).caption(feats, decoding=DecodingConfig(beam_size=1))
    word = plain[0].captions[0].text.split()[0]
    write_head(run / "imagenet_head.npz", np.zeros((FEATURES[-1], 1000)), np.eye(1000)[999] * 30)
    (run / "object_families.json").write_text(json.dumps({
        "format": "captioner.object_families", "version": 1,
        "families": {"thing": {"words": [word], "classes": {"5": "n5 thing"}}}}))
    config = json.loads((run / "config.json").read_text())
    config["grounding"] = {"head": "imagenet_head.npz", "families": "object_families.json"}
    for name in config["grounding"].values():
        config["files"][name] = {"size": (run / name).stat().st_size,
                                 "sha256": sha256sum(run / name)}
    (run / "config.json").write_text(json.dumps(config))
    encoder = _tiny_encoder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Captioner, "encoder", lambda self: encoder)
        assert main(["export", str(run)]) == 0
        keras_cap = load_captioner(run, runtime="keras")
    onnx_cap = load_captioner(run, runtime="onnx")
    assert onnx_cap.grounding is not None
    for beam in (1, 3):
        d = DecodingConfig(beam_size=beam, grounding=5.0)
        k = [r.captions[0].text for r in keras_cap.caption(feats, decoding=d)]
        o = [r.captions[0].text for r in onnx_cap.caption(feats, decoding=d)]
        assert k == o and all(word not in t.split() for t in k)
    with open(run / "onnx" / "imagenet_head.npz", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(CaptionerError, match="imagenet_head.npz"):
        load_captioner(run, runtime="onnx")


def test_attach_gives_a_lite_run_its_encoders_head_and_skips_other_encoders(untrained_run, tmp_path):
    from captioner.encoders.efficientnet import imagenet_head
    from captioner.formats.run_folder import RunConfig
    from captioner.inference.grounding import FAMILIES_FILE, HEAD_FILE, attach

    other = tmp_path / "other"
    shutil.copytree(untrained_run, other)
    assert attach(other) is False and not (other / HEAD_FILE).exists()
    lite = tmp_path / "lite"
    shutil.copytree(untrained_run, lite)
    config = json.loads((lite / "config.json").read_text())
    config["encoder"] |= {"name": "efficientnet_lite0", "layer": "pool", "weights": "imagenet"}
    (lite / "config.json").write_text(json.dumps(config))
    assert attach(lite) is True
    saved = RunConfig.load(lite)
    assert saved.grounding == {"head": HEAD_FILE, "families": FAMILIES_FILE}
    assert set(saved.files) >= {HEAD_FILE, FAMILIES_FILE}
    kernel, bias = read_head(lite / HEAD_FILE)
    want_kernel, want_bias = imagenet_head("efficientnet_lite0")
    assert kernel.shape == (1280, 1000)
    np.testing.assert_allclose(kernel, want_kernel, atol=1e-3)  # stored as float16
    np.testing.assert_array_equal(bias, want_bias)


def test_cli_grounding_options_are_checked_before_the_model_loads(capsys):
    from conftest import ROOT

    from captioner.cli import main

    assert main(["caption", str(ROOT / "data" / "example.jpg"), "--grounding", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--grounding must be from 0 to 10" in err and "\n" not in err
    assert main(["caption", str(ROOT / "data" / "example.jpg"), "--grounding-boost", "nan"]) == 2
    assert "--grounding-boost" in capsys.readouterr().err
