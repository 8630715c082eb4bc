"""A damaged image, feature row or decoder output costs that image alone: caption, evaluate,
the JSON lines they print, and the image-reading corner cases."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from helpers import toy_dataset
from PIL import Image
from runfolder import make_run

from captioner.cli import main
from captioner.encoders.images import list_images, load_image
from captioner.errors import CaptionerError
from captioner.evaluation.evaluate import evaluate
from captioner.evaluation.report import build_payload
from captioner.formats import json_lines as records
from captioner.inference.captioner import NON_FINITE_FEATURES, NON_FINITE_STEP, Captioner
from captioner.inference.decoding import NonFiniteError


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    caps, train_h5, _, refs = toy_dataset(tmp, n_images=8)
    return tmp, make_run(tmp / "run"), caps, train_h5, list(refs)


def _texts(results):
    return [None if caps is None else caps[0].text for caps, _ in results]


def test_non_finite_features_fail_alone(toy):
    _, run, _, _, _ = toy
    cap = Captioner.from_run(run)
    feats = np.random.default_rng(1).normal(size=(5, 16)).astype("float32")
    clean = _texts(cap.caption_rows(feats, beam_size=2))
    feats[2, 3], feats[4, 0] = np.nan, np.inf
    results = cap.caption_rows(feats, beam_size=2)
    assert [e for _, e in results] == [None, None, NON_FINITE_FEATURES, None, NON_FINITE_FEATURES]
    assert _texts(results)[:2] + _texts(results)[3:4] == clean[:2] + clean[3:4]


def test_non_finite_decoder_output_fails_alone(toy, monkeypatch):
    _, run, _, _, _ = toy
    cap = Captioner.from_run(run)
    feats = np.random.default_rng(2).normal(size=(4, 16)).astype("float32")
    clean = _texts(cap.caption_rows(feats))
    search = Captioner.search

    def poisoned(self, features, **kw):  # the step of row 1 gives NaN whenever it is in a batch
        if np.any(features[:, 0] == feats[1, 0]):
            raise NonFiniteError("step returned NaN or +inf log-probs")
        return search(self, features, **kw)

    monkeypatch.setattr(Captioner, "search", poisoned)
    results = cap.caption_rows(feats)
    assert [e for _, e in results] == [None, NON_FINITE_STEP, None, None]
    assert [t for i, t in enumerate(_texts(results)) if i != 1] == clean[:1] + clean[2:]


def _damage(cache, row: int) -> None:
    with h5py.File(cache, "r+") as f:
        f["features"][row] = np.full(f["features"].shape[1:], 1e30, f["features"].dtype)


def test_evaluate_leaves_damaged_rows_out_and_lists_them(toy, tmp_path, capsys):
    _, run, caps, train_h5, names = toy
    cache = tmp_path / "bad.h5"
    cache.write_bytes(train_h5.read_bytes())
    _damage(cache, 3)
    result = evaluate(run, caps, features=cache, progress=False)
    assert set(result.failed) == {names[3]} and "checksum mismatch" in result.failed[names[3]]
    assert names[3] not in result.references and len(result.references) == 7
    assert build_payload(result)["failed"] == result.failed
    with pytest.raises(CaptionerError, match=r"strict stops here: 1 image\(s\).*img003"):
        evaluate(run, caps, features=cache, progress=False, strict=True)

    report = tmp_path / "report"
    argv = ["evaluate", "--model", str(run), "--captions", str(caps), "--features", str(cache),
            "--beam-size", "1", "--out", str(report)]  # fmt: skip
    assert main(argv + ["--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    errors = [r for r in lines if records.is_error(r)]
    assert [r["image"] for r in errors] == [names[3]]
    scored = [r for r in lines if "caption" in r]
    assert len(scored) == 7 and all(set(r) >= {"image", "caption", "metrics"} for r in scored)
    assert lines[-1]["summary"]["failed"] == 1 and lines[-1]["summary"]["images"] == 7
    assert "Failed images" in (report / "report.md").read_text()
    assert 'id="failed"' in (report / "report.html").read_text()
    assert main(argv + ["--strict"]) == 1  # STRICT_EXIT, as in every command
    assert "error: --strict stops here: 1 image(s)" in capsys.readouterr().err


def test_caption_features_with_a_damaged_row(toy, tmp_path, capsys):
    _, run, _, train_h5, names = toy
    cache = tmp_path / "bad.h5"
    cache.write_bytes(train_h5.read_bytes())
    _damage(cache, 1)
    argv = ["caption", *names[:3], "nope.jpg", "--features", str(cache), "--model", str(run)]
    assert main(argv + ["--json"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in lines] == [*names[:3], "nope.jpg"]
    assert [bool(r.get("error")) for r in lines] == [False, True, False, True]
    assert lines[1]["file"] == str(cache) and "checksum mismatch" in lines[1]["error"]
    assert all(isinstance(r["caption"], str) for r in lines if not r.get("error"))
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and len(err.splitlines()) == 2 and names[1] in err


def test_json_lines_share_their_keys(toy, tmp_path, capsys):
    """caption, extract and evaluate name the same things the same way."""
    _, run, caps, train_h5, names = toy
    assert main(["caption", names[0], "gone.jpg", "--features", str(train_h5), "--model",
                 str(run), "--json"]) == 1  # fmt: skip
    ok, bad = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert set(ok) == {records.IMAGE, records.CAPTION, records.SCORE, records.FINISHED,
                       records.CAPTIONS}  # fmt: skip
    assert {records.IMAGE, records.ERROR} <= set(bad) and bad[records.CAPTION] is None
    assert main(["extract", "--verify", str(train_h5), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary[records.SUMMARY]["command"] == "verify"


# --------------------------------------------------------------------------- images


def test_a_cut_jpeg_says_truncated(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 48), (1, 2, 3)).save(path, "JPEG")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CaptionerError, match=r"cut\.jpg: truncated image$"):
        load_image(path, (32, 32))
    (tmp_path / "text.jpg").write_text("hello, not a picture")
    with pytest.raises(CaptionerError, match="not an image"):
        load_image(tmp_path / "text.jpg")


def test_a_folder_named_like_an_image_is_listed_and_fails(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "x.jpg").mkdir()
    for source in (tmp_path, str(tmp_path / "*.*")):
        paths, names = list_images(source)
        assert names == ["a.png", "x.jpg"]
    with pytest.raises(CaptionerError, match=r"x\.jpg: not a regular file"):
        load_image(tmp_path / "x.jpg")
