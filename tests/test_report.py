"""Stage 5 reports: report.json / report.md / report.html from a hand-built evaluation result."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import HAVE_PYCOCO, ROOT, needs_pycoco
from markupsafe import escape
from PIL import Image

from captioner.evaluation.evaluate import (
    AttentionMap,
    Decoding,
    EvaluationResult,
    Section,
    score_section,
)
from captioner.evaluation.meteor import METEOR_NOTE, NO_JAVA, MeteorScore
from captioner.evaluation.metrics import (
    BLEU_NOTE,
    PYCOCO_NOTE,
    cider_d,
    corpus_bleu_scores,
    rouge_l,
)
from captioner.evaluation.report import (
    format_table,
    md_escape,
    ranked_examples,
    render_markdown,
    write_report,
)
from captioner.formats.run_folder import DecoderInfo, EncoderInfo, RunConfig
from captioner.inference.decoding import Caption

REFS = {
    "a.jpg": ["a dog runs on the grass", "the dog runs on grass"],
    "b.jpg": ["a cat sits on the sofa", "a cat on a sofa"],
    "c.jpg": ["two children play in the water", "kids play in a pool"],
}
GREEDY = {
    "a.jpg": "a dog runs on the grass",
    "b.jpg": "a cat sits on a red sofa",
    "c.jpg": "a dog runs",
}
BEAM = {
    "a.jpg": "the dog runs on grass",
    "b.jpg": "a cat on a sofa",
    "c.jpg": "kids play in a pool",
}
CONFIG = RunConfig(EncoderInfo("tiny", "pool"), DecoderInfo("merge", {"vocab_size": 9, "max_length": 5}))
CHECK_SCRIPT = ROOT / "scripts" / "check_report_html.py"


class _Jar:
    """A stand-in for MeteorJar: the same METEOR for every image, or (None) no Java."""

    def __init__(self, value: float | None) -> None:
        self.value = value

    def score(self, refs: dict[str, list[str]], hyps: dict[str, str]) -> MeteorScore:
        if self.value is None:
            return MeteorScore(None, {}, NO_JAVA)
        return MeteorScore(self.value, dict.fromkeys(refs, self.value))


def _section(beam: int, hyps: dict[str, str], refs: dict[str, list[str]], meteor=None) -> Section:
    caps = {n: Caption(tuple(range(len(t.split()))), -1.5, -1.5, True, t) for n, t in hyps.items()}
    section = Section(Decoding(beam_size=beam), caps, caption_seconds=0.5)
    score_section(section, refs, _Jar(meteor))
    return section


def _result(
    tmp_path: Path,
    *,
    refs=REFS,
    hyps=(GREEDY, BEAM),
    history=True,
    meteor=None,
    image_paths=None,
    attention=None,
) -> EvaluationResult:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    if history:
        (run / "history.csv").write_text(
            "epoch,loss,val_loss,val_bleu4,learning_rate,seconds\n"
            "1,3.5,3.2,0.05,0.001,10\n2,2.9,2.8,0.09,0.001,10\n3,2.5,2.6,0.12,0.001,10\n"
        )
    sections = [_section(b, h, refs, meteor) for b, h in zip((1, 3), hyps, strict=True)]
    sources = {
        "captions": "captions.txt",
        "features": "test.h5",
        "images_dir": None,
        "split": None,
        "weights": "best",
    }
    return EvaluationResult(
        run,
        CONFIG,
        sources,
        refs,
        sections,
        {"gone.jpg": "no reference captions"},
        image_paths or {},
        attention or {},
        0.25,
    )


class _Page(HTMLParser):
    """Tags with their attributes, and the text of <script> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)

    def find(self, tag=None, **attrs) -> list[dict[str, str | None]]:
        cls = attrs.pop("cls", None)
        return [
            a
            for t, a in self.tags
            if (tag is None or t == tag)
            and all(a.get(k) == v for k, v in attrs.items())
            and (cls is None or cls in (a.get("class") or "").split())
        ]


def _page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def _decode_data_uri(uri: str) -> Image.Image:
    header, payload = uri.split(",", 1)
    assert header in ("data:image/jpeg;base64", "data:image/png;base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def _no_constants(name):
    raise AssertionError(f"non-standard JSON constant {name}")


# --------------------------------------------------------------------------- report.json


def test_json_holds_every_number_as_computed_by_the_metrics(tmp_path):
    paths = write_report(tmp_path / "out", _result(tmp_path))
    data = json.loads(paths["json"].read_text(), parse_constant=_no_constants)
    assert data["format"] == "captioner.evaluation" and data["n_images"] == 3
    bleu = corpus_bleu_scores(REFS, GREEDY)
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"):
        assert data["metrics"][key] == bleu[key]
        assert 0.0 <= data["metrics"][key] <= 1.0
    assert data["metrics"]["CIDEr-D"] == cider_d(REFS, GREEDY)[0]
    assert data["metrics"]["ROUGE-L"] == rouge_l(REFS, GREEDY)[0]
    assert 0.0 <= data["metrics"]["ROUGE-L"] <= 1.0
    assert data["metrics"]["METEOR"] is None
    assert [s["settings"]["label"] for s in data["sections"]] == ["greedy", "beam 3"]
    assert data["sections"][0]["metrics"] == data["metrics"]
    assert data["sections"][1]["metrics"]["BLEU-4"] == corpus_bleu_scores(REFS, BEAM)["BLEU-4"]
    assert data["sections"][0]["settings"] == {
        "beam_size": 1,
        "alpha": 0.0,
        "block_ngram": 0,
        "grounding": 0.0,
        "grounding_boost": 0.0,
        "consensus": 0,
        "consensus_weight": 1.0,
        "search": "greedy",
        "label": "greedy",
    }
    assert data["timings"] == {**data["sections"][0]["timings"], "features_s": 0.25}
    assert data["timings"]["images_per_s"] == pytest.approx(3 / 0.5)
    assert data["skipped"] == {"gone.jpg": "no reference captions"}
    assert data["run_config"] == json.loads(json.dumps(CONFIG.to_dict()))
    assert data["run_config"]["format"] == "captioner.run" and data["versions"]["keras"]


def test_json_images_list_scored_strings_and_per_image_scores(tmp_path):
    data = json.loads(write_report(tmp_path / "out", _result(tmp_path))["json"].read_text())
    assert [im["image"] for im in data["images"]] == ["a.jpg", "b.jpg", "c.jpg"]
    first = data["images"][0]
    assert first["caption"] == "a dog runs on the grass"
    assert first["references"] == REFS["a.jpg"]
    assert first["CIDEr-D"] == cider_d(REFS, GREEDY)[1]["a.jpg"]
    assert first["BLEU-4"] == pytest.approx(1.0)  # identical to a reference
    assert data["sections"][1]["images"][2]["caption"] == "kids play in a pool"
    assert data["diversity"] == {
        "distinct_captions": 3,
        "distinct_share": 1.0,
        "vocabulary": 10,
        "mean_length": 16 / 3,
        "mean_reference_length": 5.5,
        "repeated_pair_share": 0.0,
        "reference_repeated_pair_share": 0.0,
    }


@needs_pycoco
def test_pycocoevalcap_cross_check_is_reported_with_its_note(tmp_path):
    paths = write_report(tmp_path / "out", _result(tmp_path))
    data = json.loads(paths["json"].read_text())
    pycoco = data["pycocoevalcap_bleu"]
    assert set(pycoco) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}
    assert pycoco["BLEU-1"] == pytest.approx(data["metrics"]["BLEU-1"], abs=1e-3)
    assert data["notes"]["pycocoevalcap"] == PYCOCO_NOTE and data["notes"]["bleu"] == BLEU_NOTE
    md = paths["markdown"].read_text()
    assert "## pycocoevalcap BLEU (cross-check)" in md and "differ slightly by design" in md


# --------------------------------------------------------------------------- report.md


def test_markdown_has_the_summary_table_notes_and_ranked_examples(tmp_path):
    result = _result(tmp_path)
    md = write_report(tmp_path / "out", result)["markdown"].read_text()
    lines = md.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("| decoding | BLEU-1")))
    greedy, beam = lines[header + 2], lines[header + 3]
    bleu = corpus_bleu_scores(REFS, GREEDY)
    # tables show every score x100 with one decimal; report.json keeps the fractions
    assert greedy.startswith(
        f"| greedy | {100 * bleu['BLEU-1']:.1f} | {100 * bleu['BLEU-2']:.1f} |")
    assert f"| {100 * cider_d(REFS, GREEDY)[0]:.1f} |" in greedy and "| n/a |" in greedy
    assert "Every score in the tables is x100" in md
    assert beam.startswith("| beam 3 | ")
    assert "BLEU-3" in md and "(0.3, 0.3, 0.3, 0)" in md  # the weights note
    assert md_escape(NO_JAVA) in md
    assert "| METEOR 1.5 |" in md  # the header says which METEOR
    best = md.index("## Best examples by CIDEr-D (greedy)")
    worst = md.index("## Worst examples by CIDEr-D (greedy)")
    cider = cider_d(REFS, GREEDY)[1]
    order = sorted(cider, key=lambda n: -cider[n])
    assert md.index(f"### {order[0]}", best) < md.index(f"### {order[1]}", best)
    assert md.index(f"### {order[-1]}", worst) < md.index(f"### {order[0]}", worst)
    assert "- reference: kids play in a pool" in md
    assert md.endswith("## Skipped images\n\n- gone.jpg: no reference captions\n")


def test_ranked_examples_break_ties_by_name():
    images = [
        {"image": "b", "CIDEr-D": 1.0},
        {"image": "a", "CIDEr-D": 1.0},
        {"image": "c", "CIDEr-D": 0.5},
        {"image": "d", "CIDEr-D": 2.0},
    ]
    best, worst = ranked_examples(images, n=3)
    assert [im["image"] for im in best] == ["d", "a", "b"]
    assert [im["image"] for im in worst] == ["c", "a", "b"]


def test_meteor_value_replaces_the_note(tmp_path):
    data = json.loads(
        write_report(tmp_path / "out", _result(tmp_path, meteor=0.25))["json"].read_text()
    )
    assert data["metrics"]["METEOR"] == 0.25 and data["notes"]["meteor"] == METEOR_NOTE
    assert [im["METEOR"] for im in data["images"]] == [0.25] * 3
    md = render_markdown(data)
    assert "| 25.0 |" in md and "METEOR n/a" not in md  # x100
    assert "METEOR 1.5 as coco-caption computes it" in md


def test_stdout_table():
    data = {
        "sections": [
            {
                "settings": {"label": "greedy"},
                "metrics": {
                    "BLEU-1": 0.5,
                    "BLEU-2": 0.25,
                    "BLEU-3": 0.125,
                    "BLEU-4": 0.0625,
                    "CIDEr-D": 1.25,
                    "ROUGE-L": 0.5,
                    "METEOR": None,
                },
                "diversity": {
                    "distinct_captions": 3,
                    "distinct_share": 0.75,
                    "vocabulary": 9,
                    "mean_length": 5.0,
                    "mean_reference_length": 5.5,
                },
                "timings": {"caption_s": 2.0, "images_per_s": 2.0, "score_s": 0.5},
            }
        ]
    }
    lines = format_table(data).splitlines()
    assert len(lines) == 3 and lines[0].split()[:6] == [
        "decoding",
        "BLEU-1",
        "BLEU-2",
        "BLEU-3",
        "BLEU-4",
        "CIDEr-D",
    ]
    assert lines[2].split() == [
        "greedy",  # scores x100, one decimal
        "50.0",
        "25.0",
        "12.5",
        "6.2",
        "125.0",
        "50.0",
        "n/a",
        "3",
        "(75%)",
        "9",
        "5.00",
        "(refs",
        "5.50)",
        "2.00",
        "2.0",
        "0.50",
    ]


# --------------------------------------------------------------------------- report.html


def test_html_is_self_contained_with_tables_gallery_and_sort_script(tmp_path):
    paths = write_report(tmp_path / "out", _result(tmp_path))
    page = _page(paths["html"])
    for tag, attrs in page.tags:
        for key in ("src", "href", "action"):
            value = attrs.get(key)
            assert value is None or value.startswith("data:"), (tag, key, value[:40])
    assert not page.find("link") and not page.find("iframe")
    assert "http" not in "".join(page.scripts)
    assert len(page.find("table", id="metrics")) == 1
    assert [a["title"] for a in page.find("td") if "title" in a] == [NO_JAVA, NO_JAVA]  # n/a cells
    assert len(page.find("ul", id="skipped")) == 1
    tables = 3 if HAVE_PYCOCO else 2  # scores, details (and the pycocoevalcap cross-check)
    assert len([t for t, _ in page.tags if t == "tr"]) == 3 * tables  # header + 2 rows each
    cards = page.find("figure", cls="card")
    cider = cider_d(REFS, GREEDY)[1]
    assert [c["data-cider-0"] for c in cards] == [f"{cider[n]:.6f}" for n in REFS]
    assert [c["data-order"] for c in cards] == ["0", "1", "2"]
    assert all("data-bleu4-1" in c for c in cards)
    options = [a["value"] for a in page.find("option")]
    assert options == ["data-order", "data-cider-0", "data-bleu4-0", "data-cider-1", "data-bleu4-1"]
    assert page.find("button", id="sort-asc") and page.find("button", id="sort-desc")
    assert "sortCards" in "".join(page.scripts)
    assert len(page.find("div", cls="nopic")) == 3  # no images dir: gallery without pictures
    curves = page.find("img", id="curves")[0]["src"]
    picture = _decode_data_uri(curves)
    assert picture.size == (1300, 420)  # matplotlib, 13 x 4.2 inches at 100 dpi
    assert np.asarray(picture.convert("RGB"), dtype=float).std() > 20  # not blank
    assert (tmp_path / "out" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_escapes_all_text(tmp_path):
    evil = 'x<b>&"y.jpg'
    refs = {evil: ["<script>alert(1)</script> dog"], "b.jpg": ["a cat"]}
    hyps = {evil: "a <i>dog</i>", "b.jpg": "a cat"}
    text = write_report(tmp_path / "out", _result(tmp_path, refs=refs, hyps=(hyps, hyps)))["html"]
    page = text.read_text()
    assert "<script>alert(1)</script>" not in page and "<i>dog</i>" not in page
    assert escape("<script>alert(1)</script> dog") in page  # Jinja2's autoescaping
    assert f'<div class="name">{escape(evil)}</div>' in page
    assert _page(text).scripts and len(_page(text).find("script")) == 1


def test_gallery_thumbnails_are_embedded_jpegs(tmp_path):
    paths = {}
    for i, name in enumerate(REFS):
        paths[name] = tmp_path / f"{name}.png"
        Image.new("RGB", (300, 200), (40 * i, 100, 200)).save(paths[name])
    paths["c.jpg"] = tmp_path / "broken.jpg"
    paths["c.jpg"].write_bytes(b"not an image")
    out = write_report(tmp_path / "out", _result(tmp_path, image_paths=paths), thumbnail_size=120)
    page = _page(out["html"])
    imgs = [a for a in page.find("img") if (a.get("alt") or "").endswith(".jpg")]
    assert [a["alt"] for a in imgs] == ["a.jpg", "b.jpg"]
    thumbs = [_decode_data_uri(a["src"]) for a in imgs]
    assert [(t.format, t.size) for t in thumbs] == [("JPEG", (120, 80))] * 2
    assert thumbs[1].getpixel((60, 40))[2] > 150  # the picture, not a blank
    assert len(page.find("div", cls="nopic")) == 1  # the broken file


def test_gallery_limit_and_missing_history(tmp_path):
    out = write_report(tmp_path / "out", _result(tmp_path, history=False), gallery=2)
    page = _page(out["html"])
    assert len(page.find("figure", cls="card")) == 2
    assert "2 of 3 images" in out["html"].read_text()
    assert not page.find("img", id="curves") and not (tmp_path / "out" / "curves.png").exists()
    assert "curves" not in out


def test_attention_heatmap_strips(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "white").save(image)
    weights = np.zeros((2, 2, 2), "float32")
    weights[0, 0, 0] = weights[1, 1, 1] = 1.0
    attention = {
        "a.jpg": AttentionMap(["a", "dog"], weights),
        "b.jpg": AttentionMap([], np.zeros((0, 2, 2), "float32")),
    }
    result = _result(tmp_path, image_paths={"a.jpg": image}, attention=attention)
    page = _page(write_report(tmp_path / "out", result)["html"])
    assert len(page.find("div", id="attention")) == 1
    strips = [a for a in page.find("img") if (a.get("alt") or "").startswith("attention of")]
    assert [a["alt"] for a in strips] == ["attention of a.jpg"]  # empty captions get no strip
    strip = _decode_data_uri(strips[0]["src"])
    assert strip.format == "JPEG" and strip.size == (3 * 240, 240 + 60)  # photo + 2 words
    pixels = np.asarray(strip.convert("RGB"), dtype=float)
    first_word = pixels[:, 240:480]
    drawn = (first_word < 245).any(-1)  # the panel's photo: rows/columns mostly not white
    rows, cols = np.nonzero(drawn.mean(1) > 0.5)[0], np.nonzero(drawn.mean(0) > 0.5)[0]
    panel = first_word[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = panel.shape[:2]
    red = panel[..., 0] - panel[..., 2]
    # the word "a" looked at the top-left cell: red (hot) there, blue bottom-right
    assert red[: h // 4, : w // 4].mean() > 60 and red[-h // 4 :, -w // 4 :].mean() < -60


def test_no_attention_section_without_maps(tmp_path):
    page = _page(write_report(tmp_path / "out", _result(tmp_path))["html"])
    assert not page.find("div", id="attention")


# --------------------------------------------------------------------------- real browser


@pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists(), reason="/usr/bin/chromium is not installed"
)
@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path):
    images = {}
    for i, name in enumerate(REFS):
        images[name] = tmp_path / f"{i}.jpg"
        Image.new("RGB", (200, 150), (80 * i, 120, 60)).save(images[name])
    out = tmp_path / "out"
    write_report(out, _result(tmp_path, image_paths=images))
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [sys.executable, str(CHECK_SCRIPT), str(out), "--screenshot", str(shot)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK:")
    assert Image.open(shot).size == (1280, 2000)
    # the checker fails a page whose script does not run
    broken = tmp_path / "broken"
    broken.mkdir()
    text = (out / "report.html").read_text()
    (broken / "report.html").write_text(text[: text.index("<script>")] + "</body></html>")
    proc = subprocess.run(
        [sys.executable, str(CHECK_SCRIPT), str(broken)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "did not finish" in proc.stderr and "not sorted" in proc.stderr


@pytest.mark.subprocess
def test_check_script_without_a_report_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(CHECK_SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "report.html not found" in proc.stderr or "chromium" in proc.stderr
