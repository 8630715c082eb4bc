"""METEOR 1.5 (coco-caption's meteor-1.5.jar through pycocoevalcap and Java): the same numbers
as the jar run directly, one java process per evaluation that is always stopped, and one line
saying why and how to add it when Java or pycocoevalcap is missing."""

from __future__ import annotations

import gc
import json
import shutil
import sys

import pytest
from conftest import FLICKR_IMAGES, FLICKR_TEXT, needs_flickr

from captioner.cli import main
from captioner.evaluation import meteor as meteor_module
from captioner.evaluation.meteor import NO_JAVA, NO_PYCOCO, MeteorJar, jar_text, meteor

pytestmark = pytest.mark.meteor  # the jar may start here (conftest hides Java elsewhere)

needs_jar = pytest.mark.skipif(
    shutil.which("java") is None or meteor_module.missing_reason() is not None,
    reason="METEOR 1.5 needs Java and pycocoevalcap",
)

REFS = {
    "a.jpg": ["a dog runs on the grass", "a brown dog is running through a field"],
    "b.jpg": ["two men in red shirts play football", "men playing soccer on a pitch"],
    "c.jpg": ["a girl in a pink dress jumps", "a little girl is jumping"],
    "d.jpg": ["a man rides a bike", "a cyclist on a road"],
}
HYPS = {
    "a.jpg": "a dog is running on grass",
    "b.jpg": "a man in a red shirt  plays soccer",  # two spaces: the same tokens
    "c.jpg": "",
    "d.jpg": "a man is riding a bicycle",  # a paraphrase: only METEOR's table matches it
}


def _java_children() -> list:
    psutil = pytest.importorskip("psutil")
    return [p for p in psutil.Process().children(recursive=True) if "java" in p.name()]


def _their_meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
    """pycocoevalcap's Meteor as coco-caption uses it, its java process stopped afterwards."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        return scorer.compute_score(gts, res)
    finally:
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()


@pytest.fixture(scope="module")
def ours():
    return meteor(REFS, HYPS)


@needs_jar
def test_meteor_equals_the_jar_on_hand_written_captions(ours):
    gts = dict(REFS)
    res = {n: [" ".join(h.split())] for n, h in HYPS.items()}
    total, per_image = _their_meteor(gts, res)
    assert ours.score == pytest.approx(total, abs=1e-12)
    assert ours.per_image == pytest.approx(dict(zip(REFS, per_image, strict=True)), abs=1e-12)
    assert ours.note == meteor_module.METEOR_NOTE
    assert ours.per_image["c.jpg"] == 0.0  # an empty caption
    assert 0.2 < ours.score < 0.6
    # the jar's aggregate over the split is not the mean of the per-image scores
    assert ours.score != pytest.approx(sum(per_image) / len(per_image), abs=1e-3)
    assert not _java_children()


@needs_jar
def test_one_jar_scores_every_section_and_is_stopped(ours):
    greedy = {n: "a dog" for n in REFS}
    with MeteorJar() as jar:
        first = jar.score(REFS, HYPS)
        process = jar._jar.meteor_p
        second = jar.score(REFS, greedy)
        assert jar._jar.meteor_p is process  # the same java process for both batches
        assert process.poll() is None
    assert process.returncode is not None and not _java_children()
    assert first == ours
    assert 0 < second.score < first.score


def test_jar_text_keeps_the_whitespace_tokens_and_drops_the_field_separator():
    assert jar_text("  a dog\truns\n") == "a dog runs"
    assert jar_text("a|||b ||| c") == "a b c"


def test_missing_java_gives_the_one_line_and_starts_nothing(monkeypatch, tmp_path):
    pytest.importorskip("pycocoevalcap.meteor.meteor")
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: pytest.fail("started a process"))
    result = meteor(REFS, HYPS)
    assert (result.score, result.per_image, result.note) == (None, {}, NO_JAVA)
    assert "\n" not in NO_JAVA and "`apt-get install default-jre-headless`" in NO_JAVA


def test_missing_pycocoevalcap_gives_the_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap.meteor.meteor", None)  # import fails
    result = meteor(REFS, HYPS)
    assert (result.score, result.note) == (None, NO_PYCOCO)
    assert "\n" not in NO_PYCOCO and '`pip install -e ".[metrics]"`' in NO_PYCOCO


def test_a_java_that_fails_gives_one_line_and_no_traceback(monkeypatch, tmp_path, capfd):
    pytest.importorskip("pycocoevalcap.meteor.meteor")
    java = tmp_path / "java"
    java.write_text("#!/bin/sh\necho 'Error: Could not reserve enough space for object heap' >&2\n"
                    "exit 1\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with MeteorJar() as jar:
        first = jar.score(REFS, HYPS)
        second = jar.score(REFS, HYPS)  # not tried again
    gc.collect()
    assert first.score is None and second == first
    assert first.note == (
        "METEOR n/a: java could not run coco-caption's meteor-1.5.jar (Error: Could not reserve "
        "enough space for object heap); check `java -version` (Java 8 or newer, 2 GB of memory) "
        "or `apt-get install default-jre-headless`."
    )
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err


def test_mismatched_ids_raise_before_any_jar_starts(monkeypatch):
    monkeypatch.setattr(meteor_module, "_jar_class", lambda: pytest.fail("started the jar"))
    with pytest.raises(ValueError, match="no hypothesis for image id 'b.jpg'"):
        meteor(REFS, {"a.jpg": "a dog"})


@pytest.mark.shared
@needs_flickr
@needs_jar
def test_evaluate_on_100_test_photos_writes_the_jars_meteor(tmp_path, capsys):
    """The bundled model on the first 100 Flickr8k test photos: report.json's METEOR is what
    pycocoevalcap's Meteor gives for the same captions and references."""
    out = tmp_path / "report"
    code = main(["evaluate", "--captions", str(FLICKR_TEXT / "Flickr8k.token.txt"),
                 "--images-dir", str(FLICKR_IMAGES), "--split",
                 str(FLICKR_TEXT / "Flickr_8k.testImages.txt"), "--limit", "100",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "METEOR 1.5" in printed.splitlines()[0] and "METEOR n/a" not in printed
    data = json.loads((out / "report.json").read_text())
    assert data["n_images"] == 100 and data["notes"]["meteor"] == meteor_module.METEOR_NOTE
    gts = {im["image"]: im["references"] for im in data["images"]}
    res = {im["image"]: [im["caption"]] for im in data["images"]}
    total, per_image = _their_meteor(gts, res)
    assert data["metrics"]["METEOR"] == pytest.approx(total, abs=1e-4)
    assert [im["METEOR"] for im in data["images"]] == pytest.approx(per_image, abs=1e-4)
    assert 0.15 < data["metrics"]["METEOR"] < 0.3
    assert f"| {100 * total:.1f} |" in (out / "report.md").read_text()
    assert not _java_children()
