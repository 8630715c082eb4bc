"""``captioner caption``: single image, folder, bad image among good ones, --json, n-best."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import needs_flickr, needs_mobilenet
from helpers import toy_dataset
from PIL import Image

from captioner.cli import main
from captioner.evaluation import figures
from captioner.features.cache import open_features
from captioner.inference.captioner import Captioner
from captioner.train.training import TrainConfig, train


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tiny run trained on one caption per toy image, and the toy feature table."""
    tmp = tmp_path_factory.mktemp("caption_cli")
    caps, train_h5, val_h5, refs = toy_dataset(tmp, n_images=6)
    caps.write_text("".join(f"{n}#0\t{c[0]}\n" for n, c in refs.items()))
    run = train(TrainConfig(captions=str(caps), train_features=str(train_h5), out=str(tmp / "run"),
                            val_features=str(val_h5), epochs=60, batch_size=6, embed_dim=16,
                            units=32, dropout=0.0, min_count=1, learning_rate=0.02,
                            val_bleu_images=2, patience=0), verbose=0)
    reader = open_features(train_h5)
    table = reader.read(reader.names)
    expected = {n: refs[n][0] for n in reader.names}
    return tmp, run, train_h5, table, expected


@pytest.fixture()
def fake_encoder(monkeypatch, toy_run):
    """Image k (red level 40*k) encodes to toy feature row k: no CNN needed."""
    table = toy_run[3]
    monkeypatch.setattr(Captioner, "encoder_spec", SimpleNamespace(input_size=(8, 8)))

    def encode(self, images):
        rows = np.rint(images[:, 0, 0, 0] / 40.0).astype(int)
        return table[rows]

    monkeypatch.setattr(Captioner, "encode_images", encode)


def _photo(path, k):
    Image.new("RGB", (12, 10), (40 * k, 7, 7)).save(path)
    return path


def test_single_image(toy_run, fake_encoder, tmp_path, capsys):
    _, run, _, _, expected = toy_run
    img = _photo(tmp_path / "img002.png", 2)
    assert main(["caption", str(img), "--model", str(run), "--beam-size", "1"]) == 0
    assert capsys.readouterr().out.strip() == f"{img}: {expected['img002.jpg']}"


def test_folder_and_bad_image_among_good_ones(toy_run, fake_encoder, tmp_path, capsys):
    _, run, _, _, expected = toy_run
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in (0, 3, 5):
        _photo(folder / f"p{k}.jpg", k)
    (folder / "p4.jpg").write_bytes(b"")  # zero-byte image in the middle
    status = main(["caption", str(folder), str(tmp_path / "missing.jpg"), "--model", str(run),
                   "--json"])
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert status == 1
    assert [r["image"].rsplit("/", 1)[-1] for r in records] == [
        "p0.jpg", "p3.jpg", "p4.jpg", "p5.jpg", "missing.jpg"]
    good = {r["image"].rsplit("/", 1)[-1]: r["caption"] for r in records if not r.get("error")}
    assert good == {"p0.jpg": expected["img000.jpg"], "p3.jpg": expected["img003.jpg"],
                    "p5.jpg": expected["img005.jpg"]}
    bad = {r["image"].rsplit("/", 1)[-1]: r["error"] for r in records if r.get("error")}
    assert "empty file" in bad["p4.jpg"] and "missing file" in bad["missing.jpg"]
    assert all(r["score"] is None for r in records if r.get("error"))
    assert all(r["score"] <= 0 for r in records if not r.get("error"))


def test_n_best_is_ordered_by_score(toy_run, fake_encoder, tmp_path, capsys):
    _, run, _, _, _ = toy_run
    img = _photo(tmp_path / "x.png", 1)
    assert main(["caption", str(img), "--model", str(run), "--beam-size", "4", "--n-best", "3",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    scores = [c["score"] for c in record["captions"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert record["caption"] == record["captions"][0]["caption"]
    assert len({c["caption"] for c in record["captions"]}) == 3


def test_features_cache_input(toy_run, capsys):
    _, run, train_h5, _, expected = toy_run
    assert main(["caption", "img001.jpg", "nope.jpg", "--features", str(train_h5), "--model",
                 str(run), "--beam-size", "2"]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == f"img001.jpg: {expected['img001.jpg']}"
    assert "nope.jpg: error: not in the feature cache" in err


def test_usage_errors(toy_run, tmp_path, capsys):
    _, run, _, _, _ = toy_run
    assert main(["caption", "a.jpg", "--model", str(run), "--n-best", "3", "--beam-size", "2"]) == 2
    assert main(["caption", "a.jpg", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--n-best must be from 1 to 2 (at most the beam size), not 3" in err
    assert "not a captioner run folder" in err


def test_attention_map_needs_attention_model(toy_run, fake_encoder, tmp_path, capsys):
    _, run, _, _, _ = toy_run
    img = _photo(tmp_path / "a.png", 1)
    assert main(["caption", str(img), "--model", str(run), "--attention-map",
                 str(tmp_path / "att.png")]) == 2
    assert "needs an attention model" in capsys.readouterr().err


@pytest.mark.training
def test_attention_map_is_written_for_attention_models(tmp_path, monkeypatch, capsys):
    caps, train_h5, val_h5, refs = toy_dataset(tmp_path, n_images=4, spatial=True)
    run = train(TrainConfig(captions=str(caps), train_features=str(train_h5), out=str(tmp_path / "r"),
                            decoder="attention", epochs=2, batch_size=8, embed_dim=8, units=16,
                            attention_units=8, min_count=1, val_bleu_images=0), verbose=0)
    reader = open_features(train_h5)
    table = reader.read(reader.names)
    monkeypatch.setattr(Captioner, "encoder_spec", SimpleNamespace(input_size=(8, 8)))
    monkeypatch.setattr(Captioner, "encode_images", lambda self, images: table[: len(images)])
    img = _photo(tmp_path / "one.png", 0)
    out = tmp_path / "att.png"
    assert main(["caption", str(img), "--model", str(run), "--attention-map", str(out),
                 "--beam-size", "1", "--json"]) == 0
    words = json.loads(capsys.readouterr().out)["caption"].split()
    sheet = Image.open(out)
    panels = 1 + len(words) + 1  # the photo, each word, <end>
    columns = min(panels, figures.COLUMNS)
    rows = -(-panels // columns)
    aspect = 10 / 12  # the photo is 12 x 10 pixels
    panels_height = rows * (figures.PANEL_INCHES * aspect + figures.LABEL_INCHES) * figures.DPI
    assert sheet.format == "PNG" and sheet.size[0] == round(columns * figures.PANEL_INCHES
                                                            * figures.DPI)
    assert 0.3 * figures.DPI < sheet.size[1] - panels_height < figures.DPI  # + the legend
    pixels = np.asarray(sheet.convert("RGB"), dtype=float)
    assert pixels.std() > 20  # drawn, not blank


@pytest.mark.shared
@needs_mobilenet
def test_bundled_default_model_captions_the_example_photo(capsys):
    """The README's first command: the bundled model on data/example.jpg."""
    from conftest import ROOT

    assert main(["caption", str(ROOT / "data" / "example.jpg"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    words = record["caption"].split()
    assert 3 <= len(words) <= 24 and record["finished"]
    assert {"man", "woman", "person", "boy", "girl"} & set(words)  # a portrait of a person


@pytest.mark.shared
@needs_mobilenet
@needs_flickr
def test_default_model_captions_are_specific_to_each_photo(capsys):
    from conftest import FLICKR_IMAGES, FLICKR_TEXT

    from captioner.text.captions import load_split

    names = load_split(FLICKR_TEXT / "Flickr_8k.testImages.txt")[:12]
    assert main(["caption", *[str(FLICKR_IMAGES / n) for n in names], "--beam-size", "1"]) == 0
    captions = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert len(captions) == 12 and len(set(captions)) >= 9  # not one generic caption


def test_features_cache_of_another_encoder_is_refused(toy_run, tmp_path, capsys):
    from helpers import write_cache

    _, run, _, table, _ = toy_run
    other = write_cache(tmp_path / "other.h5", {"img001.jpg": table[1]}, encoder="vgg16")
    assert main(["caption", "img001.jpg", "--features", str(other), "--model", str(run)]) == 2
    err = capsys.readouterr().err
    assert "encoder 'vgg16'" in err and "captioner extract --encoder tiny" in err


def _stored(run, folder, decoding):
    """A copy of ``run`` whose config.json stores ``decoding``."""
    import shutil

    copy = folder / "stored"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"decoding": decoding}))
    return copy


def _json_lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_stored_decoding_is_every_entry_points_default(toy_run, fake_encoder, tmp_path, capsys):
    """Editing "decoding" in a copy of a run changes what caption (images, --features),
    evaluate and the Python API decode by default: here greedy without repeated words, as
    --beam-size 1 --block-ngram 1 give."""
    tmp, run, train_h5, table, _ = toy_run
    greedy = _stored(run, tmp_path, {"beam_size": 1, "block_ngram": 1})
    imgs = [str(_photo(tmp_path / f"p{k}.png", k)) for k in range(6)]
    flags = ["--beam-size", "1", "--block-ngram", "1"]
    assert main(["caption", *imgs, "--model", str(run), *flags, "--json"]) == 0
    want = _json_lines(capsys)
    assert main(["caption", *imgs, "--model", str(run), "--beam-size", "1", "--json"]) == 0
    assert _json_lines(capsys) != want  # blocking changes captions: the default is no accident
    assert main(["caption", *imgs, "--model", str(greedy), "--json"]) == 0
    assert _json_lines(capsys) == want
    api = Captioner.from_run(greedy).caption(imgs)
    assert [(r.text, round(r.score, 6)) for r in api] == [(w["caption"], w["score"]) for w in want]
    names = [f"img{k:03d}.jpg" for k in range(6)]
    for model, extra in ((run, flags), (greedy, [])):
        assert main(["caption", *names, "--features", str(train_h5), "--model", str(model),
                     "--json", *extra]) == 0
        assert [r["caption"] for r in _json_lines(capsys)] == [w["caption"] for w in want]
    reports = []
    for model, extra in ((run, flags), (greedy, [])):
        assert main(["evaluate", "--model", str(model), "--captions", str(tmp / "captions.txt"),
                     "--features", str(train_h5), "--out", str(tmp_path / model.name),
                     "--json", *extra]) == 0
        reports.append([(r.get("decoding"), r.get("caption")) for r in _json_lines(capsys)][:-1])
    assert reports[0] == reports[1] and reports[0][0][0] == "greedy, no repeated 1-grams"


@pytest.mark.parametrize(("decoding", "needle"), [
    ({"beam_size": 0}, "decoding.beam_size: must be from 1 to"),
    ({"alpha": "high"}, "decoding.alpha: must be a number, not 'high'"),
    ({"n_best": 5}, "decoding.n_best: must be from 1 to 3"),
    ({"beam": 2}, "decoding.beam: is not a decoding setting"),
    ([3], "decoding: must be an object"),
])
def test_bad_stored_decoding_is_one_line_naming_the_file(toy_run, tmp_path, capsys, decoding,
                                                         needle):
    _, run, _, _, _ = toy_run
    bad = _stored(run, tmp_path, decoding)
    assert main(["caption", "x.jpg", "--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad / "config.json") in err and needle in err, err


def test_out_file_records_its_model_and_decoding(toy_run, fake_encoder, tmp_path, capsys):
    """A rerun with another --model or decoding refuses the file in one line (exit 2) instead
    of skipping the images the other model captioned."""
    _, run, _, _, _ = toy_run
    img, out = str(_photo(tmp_path / "p1.png", 1)), tmp_path / "caps.jsonl"
    assert main(["caption", img, "--model", str(run), "--out", str(out)]) == 0
    assert main(["caption", img, "--model", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("captioned 0, skipped 1")
    other = _stored(run, tmp_path, {"beam_size": 3})
    for argv in (["--model", str(run), "--beam-size", "1"], ["--model", str(other)],
                 ["--model", str(run), str(run)]):
        assert main(["caption", img, "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"{out} holds captions made with model" in err, err
        assert "write another file" in err
    assert len(out.read_text().splitlines()) == 2  # the made_with line and one caption
