"""Stage 5 evaluation: captioning a split, scoring it, the `captioner evaluate` command."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import HAVE_PYCOCO, needs_mobilenet
from helpers import TINY_TRAINING, WORDS, train_toy, write_cache
from PIL import Image

from captioner.cli import main
from captioner.errors import CaptionerError
from captioner.evaluation import meteor
from captioner.evaluation.evaluate import Decoding, evaluate
from captioner.evaluation.report import build_payload, write_report
from captioner.features.cache import open_features
from captioner.inference.captioner import Captioner
from captioner.train.training import TrainConfig, train


def _write_images(folder: Path, names, broken=()) -> Path:
    """Solid-colour JPEGs whose red value is 10 * index (read back by the fake encoder)."""
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        if name in broken:
            (folder / name).write_bytes(b"\xff\xd8 not really a jpeg")
        else:
            Image.new("RGB", (40, 30), (10 * i, 90, 160)).save(folder / name, "JPEG", quality=95)
    return folder


def _with_images(toy, folder: Path):
    """``toy`` (helpers.train_toy's namespace) with JPEGs of its images in ``folder``."""
    return SimpleNamespace(**vars(toy), images=_write_images(folder, toy.names))


@pytest.fixture(scope="module")
def toy(merge_toy, tmp_path_factory):
    return _with_images(merge_toy, tmp_path_factory.mktemp("merge") / "images")


@pytest.fixture(scope="module")
def attention_toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attention")
    return _with_images(train_toy(tmp, spatial=True, epochs=12), tmp / "images")


def _captions(toy, beam_size: int = 1) -> dict[str, str]:
    """What the run itself generates for every toy image."""
    reader = open_features(toy.features)
    results = Captioner.from_run(toy.run).caption_features(
        reader.read(toy.names), beam_size=beam_size
    )
    reader.close()
    return {n: r[0].text for n, r in zip(toy.names, results, strict=True)}


def _caption_file(path: Path, captions: dict[str, list[str]]) -> Path:
    path.write_text(
        "".join(f"{n}#{k}\t{c}\n" for n, caps in captions.items() for k, c in enumerate(caps))
    )
    return path


# --------------------------------------------------------------------------- scores


def test_references_equal_to_the_captions_score_one(toy, tmp_path):
    generated = _captions(toy)
    assert all(generated.values()) and any(len(t.split()) >= 4 for t in generated.values())
    # raw references need the run's cleaning: upper case, punctuation and numbers go away
    raw = {n: [" 2 ".join(t.split()).upper() + "!"] for n, t in generated.items()}
    result = evaluate(
        toy.run,
        _caption_file(tmp_path / "refs.txt", raw),
        features=toy.features,
        decodings=[Decoding(1)],
    )
    section = result.sections[0]
    assert {n: c.text for n, c in section.captions.items()} == generated
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"):
        assert section.scores[key] == 1.0
    assert section.scores["ROUGE-L"] == pytest.approx(1.0, abs=1e-12)
    assert result.references == {n: [t] for n, t in generated.items()}
    data = build_payload(result)
    assert data["images"][0] == {
        "image": toy.names[0],
        "caption": generated[toy.names[0]],
        "references": [generated[toy.names[0]]],
        "finished": True,
        **section.scores["per_image"][toy.names[0]],
    }
    assert data["metrics"]["METEOR"] is None
    assert data["notes"]["meteor"] == (meteor.NO_JAVA if HAVE_PYCOCO else meteor.NO_PYCOCO)


def test_one_extra_reference_word_gives_the_hand_computed_brevity_penalty(toy, tmp_path):
    generated = _captions(toy)
    refs = {n: [t + " zebra"] for n, t in generated.items()}
    result = evaluate(
        toy.run,
        _caption_file(tmp_path / "refs.txt", refs),
        features=toy.features,
        decodings=[Decoding(1)],
    )
    c = sum(len(t.split()) for t in generated.values())
    r = c + len(generated)
    expected = math.exp(1 - r / c)  # every n-gram precision is 1: BLEU-n is the penalty alone
    section = result.sections[0]
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"):
        assert section.scores[key] == pytest.approx(expected, rel=1e-12)
        if HAVE_PYCOCO:
            assert section.pycoco_bleu[key] == pytest.approx(expected, rel=1e-6)
    assert (section.pycoco_bleu is None) == (not HAVE_PYCOCO)


def _independent_scores(refs: dict[str, list[str]], hyps: dict[str, str]) -> dict[str, float]:
    """BLEU-4 straight from nltk (closest reference length, no smoothing), CIDEr-D and ROUGE-L
    from coco-caption's own code (pycocoevalcap, the dev extra) when it is installed."""
    from nltk.translate.bleu_score import corpus_bleu

    names = list(hyps)
    scores = {"BLEU-4": corpus_bleu([[r.split() for r in refs[n]] for n in names],
                                    [hyps[n].split() for n in names])}  # fmt: skip
    if HAVE_PYCOCO:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        gts, res = {n: refs[n] for n in names}, {n: [hyps[n]] for n in names}
        scores["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    return scores


def test_every_beam_size_gives_its_own_section(toy):
    result = evaluate(
        toy.run, toy.caps, features=toy.features, decodings=[Decoding(1), Decoding(3)]
    )
    assert [s.decoding.label for s in result.sections] == ["greedy", "beam 3"]
    for section, beam in zip(result.sections, (1, 3), strict=True):
        hyps = {n: c.text for n, c in section.captions.items()}
        assert hyps == _captions(toy, beam)
        expected = _independent_scores(toy.refs, hyps)
        assert 0 < expected["BLEU-4"] < 1 and expected["CIDEr-D"] > 0.5
        for key, value in expected.items():
            assert section.scores[key] == pytest.approx(value, abs=1e-6), key
        assert section.caption_seconds > 0 and section.score_seconds > 0
    assert result.references[toy.names[0]] == toy.refs[toy.names[0]]  # already clean
    assert not result.attention  # a merge run has no attention


# --------------------------------------------------------------------------- which images


@pytest.mark.parametrize("encoder, layer", [("vgg16", "pool"), ("tiny", "conv")])
def test_cache_from_another_encoder_is_refused(toy, tmp_path, encoder, layer):
    other = write_cache(
        tmp_path / "other.h5",
        {n: np.zeros(16, "float32") for n in toy.names},
        encoder=encoder,
        layer=layer,
    )
    with pytest.raises(CaptionerError) as info:
        evaluate(toy.run, toy.caps, features=other)
    message = str(info.value)
    assert str(other) in message and "encoder 'tiny', layer 'pool'" in message
    assert "captioner extract --encoder tiny --layer pool" in message


def test_split_order_limit_and_skipped_images(toy, tmp_path):
    caps = _caption_file(tmp_path / "caps.txt", {**toy.refs, "extra.jpg": ["a dog"]})
    split = tmp_path / "split.txt"
    split.write_text("img001.jpg\nnocap.jpg\nextra.jpg\nimg000.jpg\nimg003.jpg\n")
    result = evaluate(
        toy.run, caps, features=toy.features, split=split, limit=2, decodings=[Decoding(1)]
    )
    assert list(result.references) == ["img001.jpg", "img000.jpg"]
    assert result.skipped == {
        "nocap.jpg": "no reference captions",
        "extra.jpg": f"features absent in {toy.features}",
    }
    split.write_text("nocap.jpg\n")
    with pytest.raises(CaptionerError, match="no image of the split can be evaluated"):
        evaluate(toy.run, caps, features=toy.features, split=split)


def test_images_mode_runs_the_encoder_and_skips_unreadable_images(toy, tmp_path, monkeypatch):
    reader = open_features(toy.features)
    table = reader.read(toy.names)
    reader.close()

    def fake_encoder(self, images):  # red value 10 * i -> the cached features of image i
        assert images.shape[1:] == (32, 32, 3)  # the run's input size, from its config
        return table[np.round(images[:, 0, 0, 0] / 10).astype(int)]

    monkeypatch.setattr(Captioner, "encode_images", fake_encoder)
    images = _write_images(tmp_path / "images", toy.names, broken={"img005.jpg"})
    split = tmp_path / "split.txt"
    split.write_text("\n".join(toy.names + ["img404.jpg"]))
    caps = _caption_file(tmp_path / "caps.txt", {**toy.refs, "img404.jpg": ["a cat"]})
    result = evaluate(
        toy.run, caps, images_dir=images, split=split, decodings=[Decoding(1)], batch_size=3
    )
    assert set(result.skipped) == {"img005.jpg", "img404.jpg"}
    assert result.skipped["img005.jpg"].startswith("unreadable image (")
    assert result.skipped["img404.jpg"] == f"image file missing in {images}"
    expected = {n: t for n, t in _captions(toy).items() if n != "img005.jpg"}
    assert {n: c.text for n, c in result.sections[0].captions.items()} == expected
    assert list(result.references) == list(expected)
    assert result.image_paths == {n: images / n for n in expected}
    with pytest.raises(CaptionerError, match="together with a split file"):
        evaluate(toy.run, caps, images_dir=images)


@pytest.mark.training
@needs_mobilenet
def test_images_mode_with_the_real_encoder_matches_its_feature_cache(tmp_path):
    from captioner.features.extraction import extract_with_spec

    names = [f"img{i:03d}.jpg" for i in range(6)]
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    refs = {}
    for i, name in enumerate(names):
        pixels = np.full((120, 160, 3), (40 * i, 200 - 30 * i, 90), np.uint8)
        pixels[20 * i : 20 * i + 40, 30:90] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(folder / name, quality=95)
        refs[name] = [f"a {WORDS[i % 4]} {WORDS[2 + i % 3]} on the {WORDS[5 + i]}"]
    caps = _caption_file(tmp_path / "caps.txt", refs)
    cache = tmp_path / "feats.h5"
    extract_with_spec(
        [folder / n for n in names], cache, "mobilenet_v2_0.5", "pool", progress=False, workers=0
    )
    run = train(
        TrainConfig(
            captions=str(caps),
            train_features=str(cache),
            out=str(tmp_path / "run"),
            epochs=8,
            **{**TINY_TRAINING, "val_bleu_images": 0},
        ),
        verbose=0,
    )
    split = tmp_path / "split.txt"
    split.write_text("\n".join(names))
    from_cache = evaluate(run, caps, features=cache, decodings=[Decoding(1)])
    from_images = evaluate(run, caps, images_dir=folder, split=split, decodings=[Decoding(1)])
    assert from_images.skipped == {}
    a, b = from_cache.sections[0].captions, from_images.sections[0].captions
    assert [a[n].text for n in names] == [b[n].text for n in names]
    np.testing.assert_allclose(
        [a[n].log_prob for n in names], [b[n].log_prob for n in names], rtol=1e-3
    )


# --------------------------------------------------------------------------- attention


def test_attention_run_report_has_heatmaps(attention_toy, tmp_path):
    t = attention_toy
    result = evaluate(
        t.run,
        t.caps,
        features=t.features,
        images_dir=t.images,
        attention_images=3,
        decodings=[Decoding(3)],
    )
    assert list(result.attention) == t.names[:3]
    for name, amap in result.attention.items():
        assert amap.words == result.sections[0].captions[name].text.split()
        assert amap.weights.shape == (len(amap.words), 2, 2)
        np.testing.assert_allclose(amap.weights.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    page = write_report(tmp_path / "report", result)["html"].read_text()
    assert 'id="attention"' in page
    assert page.count('alt="attention of img00') == sum(
        bool(m.words) for m in result.attention.values()
    )
    assert page.count('alt="attention of img00') >= 1
    none = evaluate(t.run, t.caps, features=t.features, attention_images=0, limit=2)
    assert none.attention == {}


# --------------------------------------------------------------------------- command line


def test_cli_end_to_end_two_sections_and_thumbnails(toy, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(
        [
            "evaluate",
            "--model",
            str(toy.run),
            "--captions",
            str(toy.caps),
            "--features",
            str(toy.features),
            "--images-dir",
            str(toy.images),
            "--beam-size",
            "1",
            "3",
            "--alpha",
            "0",
            "--block-ngram",
            "0",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.html'}"
    data = json.loads((out / "report.json").read_text())
    assert [s["settings"]["label"] for s in data["sections"]] == ["greedy", "beam 3"]
    assert data["n_images"] == 8 and len(data["sections"][1]["images"]) == 8
    assert all(
        0 <= data["metrics"][k] <= 1 for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L")
    )
    assert data["metrics"]["CIDEr-D"] >= 0
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/jpeg;base64,') == 8
    assert "http" not in page.replace("http-equiv", "")
    # the scores table, and the pycocoevalcap cross-check when it is installed
    assert (out / "report.md").read_text().count("| beam 3 |") == (2 if HAVE_PYCOCO else 1)


def test_cli_prints_the_summary_table(toy, tmp_path, capsys):
    code = main(
        [
            "evaluate",
            "--model",
            str(toy.run),
            "--captions",
            str(toy.caps),
            "--features",
            str(toy.features),
            "--beam-size",
            "1",
            "--alpha",
            "0",
            "--block-ngram",
            "0",
            "--limit",
            "3",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["decoding", "BLEU-1", "BLEU-2"]
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert lines[2].split()[:2] == ["greedy", f"{100 * data['metrics']['BLEU-1']:.1f}"]  # x100
    assert data["n_images"] == 3
    # no Java (the fixture): the table says n/a, then one line says why and what adds it
    assert lines[2].split()[7] == "n/a" and lines[3] == data["notes"]["meteor"]
    assert lines[3].startswith("METEOR n/a: ") and lines[4].startswith("report: ")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--images-dir", "."], "--split FILE"),
        (["--features", "F", "--beam-size", "0"], "--beam-size must be from 1 to"),
        (["--features", "F", "--alpha", "-1"], "--alpha must be from 0 to"),
        (["--features", "F", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--features", "missing.h5"], "missing.h5 does not exist"),
    ],
)
def test_cli_usage_errors(toy, tmp_path, capsys, extra, message):
    extra = [str(toy.features) if a == "F" else a for a in extra]
    args = [
        "evaluate",
        "--model",
        str(toy.run),
        "--captions",
        str(toy.caps),
        "--out",
        str(tmp_path / "r"),
        *extra,
    ]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_cli_without_a_bundled_model(toy, tmp_path, capsys, monkeypatch):
    import captioner.formats.run_folder

    monkeypatch.setattr(captioner.formats.run_folder, "DEFAULT_RUN", tmp_path / "nothing")
    assert (
        main(
            [
                "evaluate",
                "--captions",
                str(toy.caps),
                "--features",
                str(toy.features),
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert f"no bundled model in {tmp_path / 'nothing'}; pass --model" in capsys.readouterr().err
