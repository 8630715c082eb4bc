"""Evaluation reports: ``report.json`` (every number), ``report.md`` and one self-contained
``report.html`` (inline CSS and JS, pictures as base64 data URIs, nothing fetched from outside).

``report.md`` and the tables of ``report.html`` are rendered from the same JSON payload that is
saved, so they can never disagree with it. The HTML adds a gallery sortable by per-image score,
thumbnails (when the image files are known), per-word attention heatmaps for attention runs and
the training curves of the run.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from captioner.files import write_bytes, write_json
from captioner.metrics import BLEU_KEYS, METEOR_UNAVAILABLE_NOTE
from captioner.runs import HISTORY, read_history, versions

if TYPE_CHECKING:
    from captioner.evaluation import EvaluationResult, Section

JSON_FILE, MARKDOWN_FILE, HTML_FILE, CURVES_FILE = (
    "report.json",
    "report.md",
    "report.html",
    "curves.png",
)
SCORE_KEYS = (*BLEU_KEYS, "CIDEr-D", "ROUGE-L", "METEOR")
GALLERY_IMAGES = 1000
THUMBNAIL_SIZE = 160
THUMBNAIL_QUALITY = 80
ATTENTION_TILE = 256
ATTENTION_COLUMNS = 7
EXAMPLES = 5
SKIPPED_SHOWN = 20
REPORT_FORMAT = "captioner.evaluation"
REPORT_VERSION = 1

BLEU_NOTE = (
    "BLEU-1..4 are nltk corpus_bleu scores with the standard cumulative uniform weights: BLEU-n "
    "is the geometric mean of the 1..n-gram precisions (weight 1/n each) times the brevity "
    "penalty, counted over the whole split against all references of each image, without "
    "smoothing. Some tutorials use non-standard weights, e.g. (0.3, 0.3, 0.3, 0) for BLEU-3, "
    "which gives numbers that cannot be compared with these."
)
SCALE_NOTE = (
    "Every score in the tables is x100 (BLEU-4 18.8 means 0.188), as in papers and the README; "
    "report.json keeps the fractions. BLEU-1..4, ROUGE-L (LCS F-measure, beta 1.2) and METEOR "
    "are fractions in [0, 1]; CIDEr-D is on the usual pycocoevalcap scale (0.442, shown as "
    "44.2; it can exceed 1), with document frequencies taken over the references of the "
    "evaluated images."
)
PER_IMAGE_NOTE = (
    "Per-image BLEU-4 is nltk sentence_bleu with smoothing method1 (for ranking examples); the "
    "corpus BLEU-4 above is not its mean."
)
PYCOCO_NOTE = (
    "pycocoevalcap's BLEU is shown as a cross-check. The two implementations differ slightly "
    "by design: pycocoevalcap picks the closest reference length differently and adds tiny "
    "epsilons to the n-gram precisions."
)


def notes(meteor_missing: bool, pycoco_available: bool) -> dict[str, str]:
    """The explanations every report carries, keyed by topic."""
    out = {"bleu": BLEU_NOTE, "scale": SCALE_NOTE, "per_image": PER_IMAGE_NOTE}
    if meteor_missing:
        out["meteor"] = METEOR_UNAVAILABLE_NOTE
    if pycoco_available:
        out["pycocoevalcap"] = PYCOCO_NOTE
    return out


# --------------------------------------------------------------------------- payload


def section_payload(section: Section, references: dict[str, list[str]]) -> dict[str, Any]:
    """One decoding setting: settings, metrics, diversity, timings and per-image rows."""
    n = len(section.captions)
    per_image = section.scores.get("per_image", {})
    images = [
        {
            "image": name,
            "caption": section.captions[name].text,
            "references": refs,
            "finished": section.captions[name].finished,
            **per_image.get(name, {}),
        }
        for name, refs in references.items()
    ]
    seconds = section.caption_seconds
    return {
        "settings": section.decoding.to_json(),
        "metrics": section.metrics,
        "pycocoevalcap_bleu": section.pycoco_bleu,
        "diversity": section.scores.get("diversity", {}),
        "timings": {
            "caption_s": seconds,
            "score_s": section.score_seconds,
            "images_per_s": n / seconds if seconds > 0 else None,
        },
        "images": images,
    }


def build_payload(result: EvaluationResult) -> dict[str, Any]:
    """The ``report.json`` payload; report.md and report.html are rendered from it alone."""
    sections = [section_payload(s, result.references) for s in result.sections]
    first = sections[0]
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": result.created,
        "run": str(result.run_dir),
        "sources": result.sources,
        "n_images": len(result.references),
        "skipped": result.skipped,
        "settings": first["settings"],
        "metrics": first["metrics"],
        "pycocoevalcap_bleu": first["pycocoevalcap_bleu"],
        "diversity": first["diversity"],
        "timings": {**first["timings"], "features_s": result.features_seconds},
        "images": first["images"],
        "sections": sections,
        "notes": notes(
            result.sections[0].scores.get("METEOR") is None,
            first["pycocoevalcap_bleu"] is not None,
        ),
        "run_config": result.run_config.to_dict(),
        "versions": versions(),
    }


# --------------------------------------------------------------------------- writing


def write_report(
    out_dir: str | os.PathLike,
    result: EvaluationResult,
    *,
    gallery: int = GALLERY_IMAGES,
    thumbnail_size: int = THUMBNAIL_SIZE,
) -> dict[str, Path]:
    """Write report.json, report.md, report.html (and curves.png when the run has a history)."""
    from captioner.errors import CaptionerError

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CaptionerError(f"cannot create the report folder {out} ({exc.strerror})") from None
    data = build_payload(result)
    paths = {"json": out / JSON_FILE, "markdown": out / MARKDOWN_FILE, "html": out / HTML_FILE}
    write_json(paths["json"], data)
    curves = write_curves(Path(result.run_dir), out / CURVES_FILE)
    if curves is not None:
        paths["curves"] = out / CURVES_FILE
    write_bytes(paths["markdown"], render_markdown(data).encode())
    page = render_html(
        data,
        image_paths=result.image_paths,
        attention=result.attention,
        curves=curves,
        gallery=gallery,
        thumbnail_size=thumbnail_size,
    )
    write_bytes(paths["html"], page.encode())
    return paths


def write_curves(run_dir: Path, path: Path) -> bytes | None:
    """Plot the run's training history into ``path``; the PNG bytes, or None without history."""
    from captioner.figures import save_training_curves

    rows = [r for r in read_history(run_dir / HISTORY) if r.get("epoch") is not None]
    if not rows:
        return None
    save_training_curves(rows, path)
    return path.read_bytes()


# --------------------------------------------------------------------------- text


def fmt(value: float | int | None, digits: int = 4) -> str:
    """A number for a table: ``n/a`` for None, integers as they are."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def score(value: float | None) -> str:
    """A score as the tables show it: x100 with one decimal (0.1877 -> ``18.8``)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}"


def summary_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and one row per section: scores, diversity and timings."""
    header = [
        "decoding",
        *SCORE_KEYS,
        "distinct",
        "vocab",
        "mean len",
        "caption s",
        "img/s",
        "score s",
    ]
    rows = []
    for s in data["sections"]:
        m, d, t = s["metrics"], s["diversity"], s["timings"]
        rows.append(
            [
                s["settings"]["label"],
                *(score(m.get(k)) for k in SCORE_KEYS),
                f"{d['distinct_captions']} ({d['distinct_share']:.0%})",
                str(d["vocabulary"]),
                f"{d['mean_length']:.2f} (refs {d['mean_reference_length']:.2f})",
                fmt(t["caption_s"], 2),
                fmt(t["images_per_s"], 1),
                fmt(t["score_s"], 2),
            ]
        )
    return header, rows


def format_table(data: dict[str, Any]) -> str:
    """The summary as an aligned plain-text table (for stdout)."""
    header, rows = summary_rows(data)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    for ch in "\\`*_[]<>|#":
        text = text.replace(ch, "\\" + ch)
    return text


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = [
        "| " + " | ".join(_md_escape(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    return out + ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]


def ranked_examples(images: list[dict[str, Any]], n: int = EXAMPLES) -> tuple[list, list]:
    """(best n by CIDEr-D, highest first; worst n, lowest first); ties broken by image name."""
    ranked = sorted(images, key=lambda im: (-im["CIDEr-D"], im["image"]))
    worst = sorted(images, key=lambda im: (im["CIDEr-D"], im["image"]))
    return ranked[:n], worst[:n]


def render_markdown(data: dict[str, Any]) -> str:
    """report.md from the report.json payload."""
    header, rows = summary_rows(data)
    lines = [f"# Caption evaluation: {_md_escape(str(data['run']))}", ""]
    lines += [f"- {_md_escape(k)}: {_md_escape(v)}" for k, v in _overview(data)]
    lines += ["", "## Scores", "", *_md_table(header, rows), ""]
    if data["pycocoevalcap_bleu"] is not None:
        lines += ["## pycocoevalcap BLEU (cross-check)", "", *_md_table(*_pycoco_rows(data)), ""]
    lines += ["## Notes", ""] + [f"- {_md_escape(v)}" for v in data["notes"].values()] + [""]
    best, worst = ranked_examples(data["images"])
    label = data["sections"][0]["settings"]["label"]
    for title, chosen in (
        (f"Best examples by CIDEr-D ({label})", best),
        (f"Worst examples by CIDEr-D ({label})", worst),
    ):
        lines += [f"## {_md_escape(title)}", ""]
        for im in chosen:
            lines += [
                f"### {_md_escape(im['image'])}: CIDEr-D {score(im['CIDEr-D'])}, "
                f"BLEU-4 {score(im['BLEU-4'])}",
                "",
                f"- generated: {_md_escape(im['caption'])}",
            ]
            lines += [f"- reference: {_md_escape(r)}" for r in im["references"]] + [""]
    if data["skipped"]:
        lines += ["## Skipped images", ""]
        lines += [f"- {_md_escape(n)}: {_md_escape(r)}" for n, r in _skipped(data)] + [""]
    return "\n".join(lines)


def _skipped(data: dict[str, Any], n: int = SKIPPED_SHOWN) -> list[tuple[str, str]]:
    """The first ``n`` skipped images with their reasons, plus a "more" line."""
    items = list(data["skipped"].items())
    shown = items[:n]
    if len(items) > n:
        shown.append(("...", f"{len(items) - n} more in report.json"))
    return shown


def _overview(data: dict[str, Any]) -> list[tuple[str, str]]:
    config, src = data.get("run_config") or {}, data["sources"]
    enc = config.get("encoder") or {}
    items = [
        ("decoder", str((config.get("decoder") or {}).get("kind"))),
        ("encoder", f"{enc.get('name')} (layer {enc.get('layer')})"),
        ("images evaluated", str(data["n_images"])),
        ("images skipped", str(len(data["skipped"]))),
        ("captions", str(src.get("captions"))),
    ]
    items += [
        (k, str(src[k])) for k in ("features", "images_dir", "split", "weights") if src.get(k)
    ]
    items += [
        ("features read in", f"{data['timings']['features_s']:.2f} s"),
        ("created", data["created"]),
        ("versions", ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v)),
    ]
    return items


def _pycoco_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["decoding", *(f"{k} (pycocoevalcap)" for k in BLEU_KEYS), "BLEU-4 difference"]
    rows = []
    for s in data["sections"]:
        p = s["pycocoevalcap_bleu"] or {}
        diff = round(100 * (p["BLEU-4"] - s["metrics"]["BLEU-4"]), 3) + 0.0 if p else None
        rows.append(
            [
                s["settings"]["label"],
                *(score(p.get(k)) for k in BLEU_KEYS),
                "n/a" if diff is None else f"{diff:+.3f}",
            ]
        )
    return header, rows


# --------------------------------------------------------------------------- pictures


def thumbnail_jpeg(
    path: str | os.PathLike, size: int = THUMBNAIL_SIZE, quality: int = THUMBNAIL_QUALITY
) -> bytes | None:
    """A JPEG of the image fitted into size x size (aspect kept); None if it cannot be read."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))
            pic = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None
    pic.thumbnail((size, size))
    return _jpeg(pic, quality)


def _jpeg(image: Image.Image, quality: int = THUMBNAIL_QUALITY) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _photo(path: Path | None, size: int) -> np.ndarray:
    """The image fitted into size x size, or plain grey when it cannot be read."""
    if path is not None:
        try:
            with Image.open(path) as im:
                pic = ImageOps.exif_transpose(im).convert("RGB")
            pic.thumbnail((size, size))
            return np.asarray(pic)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            pass
    return np.full((size, size, 3), 128, np.uint8)


def attention_strip(
    path: Path | None, words: Sequence[str], weights: np.ndarray, tile: int = ATTENTION_TILE
) -> bytes:
    """The photo, then one heat overlay per word titled with the word; JPEG bytes."""
    from captioner.figures import attention_figure, image_bytes

    figure = attention_figure(_photo(path, tile), words, weights, columns=ATTENTION_COLUMNS)
    return image_bytes(figure, "jpeg")


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:1.5em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;background:#fff}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;font-variant-numeric:tabular-nums}
th:first-child,td:first-child{text-align:left}th{background:#eef}
dl.overview{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:.9em}
dl.overview dt{font-weight:600}dl.overview dd{margin:0;word-break:break-all}
ul.notes li{margin:.3em 0;max-width:70em}
#sort-controls{margin:.6em 0;display:flex;gap:8px;align-items:center;flex-wrap:wrap}
#gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.card{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;display:flex;gap:10px}
.card .pic{flex:0 0 auto;width:160px;min-height:60px;display:flex;align-items:flex-start;justify-content:center}
.card .pic img{max-width:160px;border-radius:3px}
.card .nopic{width:160px;height:60px;background:#eee;color:#888;font-size:.8em;display:flex;align-items:center;justify-content:center}
.card figcaption{flex:1;font-size:.85em;min-width:0}
.name{color:#666;font-size:.85em;word-break:break-all}
.generated{margin:.3em 0;padding-left:0;list-style:none}.generated li{margin:.2em 0}
.generated .text{font-weight:600}.score{color:#555;font-size:.9em;white-space:nowrap}
.refs{margin:.2em 0;padding-left:1.1em;color:#444}
.att{margin:.8em 0}.att .strip{overflow-x:auto}.att img{display:block;max-width:100%}
img.curves{max-width:100%;border:1px solid #ddd;background:#fff}
"""

SCRIPT = """
(function () {
  var gallery = document.getElementById('gallery');
  var select = document.getElementById('sort-key');
  function value(card, key) { var v = parseFloat(card.getAttribute(key)); return isNaN(v) ? 0 : v; }
  function sortCards(key, dir) {
    var cards = Array.prototype.slice.call(gallery.querySelectorAll('.card'));
    cards.sort(function (a, b) {
      var d = value(a, key) - value(b, key);
      return d !== 0 ? dir * d : value(a, 'data-order') - value(b, 'data-order');
    });
    cards.forEach(function (card) { gallery.appendChild(card); });
    gallery.setAttribute('data-sorted', key + ':' + (dir > 0 ? 'asc' : 'desc'));
  }
  document.getElementById('sort-desc').addEventListener('click', function () { sortCards(select.value, -1); });
  document.getElementById('sort-asc').addEventListener('click', function () { sortCards(select.value, 1); });
  select.addEventListener('change', function () { sortCards(select.value, select.value === 'data-order' ? 1 : -1); });
  var m = /^#sort=([A-Za-z0-9-]+):(asc|desc)$/.exec(window.location.hash);
  if (m) { select.value = 'data-' + m[1]; sortCards('data-' + m[1], m[2] === 'asc' ? 1 : -1); }
  document.body.setAttribute('data-ready', '1');
})();
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(
    table_id: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    titles: dict[str, str] | None = None,
) -> str:
    titles = titles or {}
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td title="{_e(titles[c])}">{_e(c)}</td>' if c in titles else f"<td>{_e(c)}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _metric_tables(data: dict[str, Any]) -> str:
    header, rows = summary_rows(data)
    n_scores = 1 + len(SCORE_KEYS)
    meteor_title = {"n/a": METEOR_UNAVAILABLE_NOTE} if "meteor" in data["notes"] else None
    parts = [
        _html_table("metrics", header[:n_scores], [r[:n_scores] for r in rows], meteor_title),
        "<h3>Diversity and timings</h3>",
        _html_table(
            "details", [header[0], *header[n_scores:]], [[r[0], *r[n_scores:]] for r in rows]
        ),
    ]
    if data["pycocoevalcap_bleu"] is not None:
        parts += [
            "<h3>pycocoevalcap BLEU (cross-check)</h3>",
            _html_table("pycocoevalcap", *_pycoco_rows(data)),
        ]
    return "\n".join(parts)


def _sort_options(data: dict[str, Any]) -> str:
    options = ['<option value="data-order">split order</option>']
    for i, s in enumerate(data["sections"]):
        label = s["settings"]["label"]
        options += [
            f'<option value="data-cider-{i}"{" selected" if i == 0 else ""}>'
            f"CIDEr-D ({_e(label)})</option>",
            f'<option value="data-bleu4-{i}">BLEU-4 ({_e(label)})</option>',
        ]
    return "".join(options)


def _card(
    index: int,
    name: str,
    data: dict[str, Any],
    per_section: list[dict[str, dict]],
    thumb: bytes | None,
) -> str:
    attrs = [f'data-order="{index}"']
    items = []
    for i, (section, images) in enumerate(zip(data["sections"], per_section, strict=True)):
        im = images[name]
        attrs += [f'data-cider-{i}="{im["CIDEr-D"]:.6f}"', f'data-bleu4-{i}="{im["BLEU-4"]:.6f}"']
        items.append(
            f'<li><span class="label">{_e(section["settings"]["label"])}:</span> '
            f'<span class="text">{_e(im["caption"] or "(empty)")}</span> '
            f'<span class="score">CIDEr-D {score(im["CIDEr-D"])} · BLEU-4 '
            f"{score(im['BLEU-4'])}</span></li>"
        )
    refs = "".join(f"<li>{_e(r)}</li>" for r in per_section[0][name]["references"])
    pic = (
        f'<img src="{data_uri(thumb, "image/jpeg")}" alt="{_e(name)}" loading="lazy">'
        if thumb
        else '<div class="nopic">no picture</div>'
    )
    return (
        f'<figure class="card" {" ".join(attrs)}><div class="pic">{pic}</div><figcaption>'
        f'<div class="name">{_e(name)}</div><ul class="generated">{"".join(items)}</ul>'
        f'<div class="name">references</div><ul class="refs">{refs}</ul></figcaption></figure>'
    )


def _gallery(data: dict[str, Any], image_paths: dict[str, Path], limit: int, size: int) -> str:
    per_section = [{im["image"]: im for im in s["images"]} for s in data["sections"]]
    names = [im["image"] for im in data["images"]][:limit]
    cards = []
    for index, name in enumerate(names):
        path = image_paths.get(name)
        thumb = thumbnail_jpeg(path, size) if path is not None else None
        cards.append(_card(index, name, data, per_section, thumb))
    shown = (
        f"{len(names)} of {len(data['images'])} images"
        if len(names) < len(data["images"])
        else f"{len(names)} images"
    )
    return (
        f"<p>{_e(shown)}, in split order until sorted.</p>"
        f'<div id="sort-controls"><label for="sort-key">Sort by</label>'
        f'<select id="sort-key">{_sort_options(data)}</select>'
        '<button type="button" id="sort-desc">best first</button>'
        '<button type="button" id="sort-asc">worst first</button></div>'
        f'<div id="gallery">{"".join(cards)}</div>'
    )


def _attention_section(data: dict[str, Any], attention: dict, image_paths: dict[str, Path]) -> str:
    captions = {im["image"]: im["caption"] for im in data["images"]}
    blocks = []
    for name, amap in attention.items():
        if not amap.words:
            continue
        strip = attention_strip(image_paths.get(name), amap.words, amap.weights)
        blocks.append(
            f'<div class="att"><div><span class="name">{_e(name)}</span> '
            f'<b>{_e(captions.get(name, ""))}</b></div><div class="strip">'
            f'<img src="{data_uri(strip, "image/jpeg")}" alt="attention of {_e(name)}">'
            "</div></div>"
        )
    if not blocks:
        return ""
    label = data["sections"][0]["settings"]["label"]
    return (
        f'<h2>Attention</h2><div id="attention"><p>Where the decoder looked for each word of '
        f"its caption ({_e(label)}): red where it looked hardest, blue where its attention "
        "was no more than an even spread.</p>"
        f"{''.join(blocks)}</div>"
    )


def render_html(
    data: dict[str, Any],
    *,
    image_paths: dict[str, Path] | None = None,
    attention: dict | None = None,
    curves: bytes | None = None,
    gallery: int = GALLERY_IMAGES,
    thumbnail_size: int = THUMBNAIL_SIZE,
) -> str:
    """The whole self-contained report page."""
    image_paths = image_paths or {}
    overview = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in _overview(data))
    note_items = "".join(f"<li>{_e(v)}</li>" for v in data["notes"].values())
    skipped = "".join(f"<li>{_e(n)}: {_e(r)}</li>" for n, r in _skipped(data))
    skipped_html = f'<h2>Skipped images</h2><ul id="skipped">{skipped}</ul>' if skipped else ""
    curves_html = (
        f'<h2>Training curves</h2><img class="curves" id="curves" alt="training curves" '
        f'src="{data_uri(curves, "image/png")}">'
        if curves
        else ""
    )
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>Caption evaluation: {_e(Path(str(data['run'])).name)}</title>",
            f"<style>{CSS}</style></head><body>",
            f'<h1>Caption evaluation</h1><dl class="overview">{overview}</dl>',
            f"<h2>Scores</h2>{_metric_tables(data)}",
            f'<h2>Notes</h2><ul class="notes">{note_items}</ul>',
            skipped_html,
            curves_html,
            _attention_section(data, attention or {}, image_paths),
            f"<h2>Gallery</h2>{_gallery(data, image_paths, gallery, thumbnail_size)}",
            f"<script>{SCRIPT}</script></body></html>\n",
        ]
    )
