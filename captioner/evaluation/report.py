"""Evaluation reports: ``report.json`` (every number), ``report.md`` and one self-contained
``report.html`` (inline CSS and JS, pictures as base64 data URIs, nothing fetched from outside).

``report.md`` and the tables of ``report.html`` are rendered from the same JSON payload that is
saved, so they can never disagree with it. The HTML adds a gallery sortable by per-image score,
thumbnails (when the image files are known), per-word attention heatmaps for attention runs and
the training curves of the run.
"""

from __future__ import annotations

import base64
import functools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.evaluation.meteor import METEOR_HEADER, report_note
from captioner.evaluation.metrics import BLEU_KEYS, METRIC_KEYS, notes
from captioner.formats.run_folder import HISTORY, read_history, versions
from captioner.storage.files import write_bytes, write_json

if TYPE_CHECKING:
    from captioner.evaluation.evaluate import EvaluationResult, Section

JSON_FILE, MARKDOWN_FILE, HTML_FILE, CURVES_FILE = (
    "report.json",
    "report.md",
    "report.html",
    "curves.png",
)
GALLERY_IMAGES = 1000
THUMBNAIL_SIZE = 160
EXAMPLES = 5
SKIPPED_SHOWN = 20
TEMPLATES = Path(__file__).resolve().parent / "templates"  # package data
REPORT_FORMAT = "captioner.evaluation"
REPORT_VERSION = 1

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
        "failed": result.failed,
        "settings": first["settings"],
        "metrics": first["metrics"],
        "pycocoevalcap_bleu": first["pycocoevalcap_bleu"],
        "diversity": first["diversity"],
        "timings": {**first["timings"], "features_s": result.features_seconds},
        "images": first["images"],
        "sections": sections,
        "notes": notes(report_note(s.scores for s in result.sections),
                       first["pycocoevalcap_bleu"] is not None),
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
    from captioner.evaluation.figures import save_training_curves

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
        *(METEOR_HEADER if k == "METEOR" else k for k in METRIC_KEYS),
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
                *(score(m.get(k)) for k in METRIC_KEYS),
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


def md_escape(text: Any) -> str:
    """``text`` with the characters Markdown would interpret backslash-escaped."""
    text = str(text)
    for ch in "\\`*_[]<>|#":
        text = text.replace(ch, "\\" + ch)
    return text


def ranked_examples(images: list[dict[str, Any]], n: int = EXAMPLES) -> tuple[list, list]:
    """(best n by CIDEr-D, highest first; worst n, lowest first); ties broken by image name."""
    ranked = sorted(images, key=lambda im: (-im["CIDEr-D"], im["image"]))
    worst = sorted(images, key=lambda im: (im["CIDEr-D"], im["image"]))
    return ranked[:n], worst[:n]


@functools.cache
def _templates(kind: str):
    """The Jinja2 environment of the package's report templates: autoescaping HTML for
    ``html``, Markdown escaping through the ``md`` filter for ``md``."""
    import jinja2

    loader = jinja2.FileSystemLoader(TEMPLATES)
    if kind == "html":
        return jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)
    env = jinja2.Environment(loader=loader, autoescape=False, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["md"] = md_escape
    return env


def _tables(data: dict[str, Any]) -> dict[str, Any]:
    header, rows = summary_rows(data)
    n = 1 + len(METRIC_KEYS)
    pycoco = None
    if data["pycocoevalcap_bleu"] is not None:
        pycoco = dict(zip(("header", "rows"), _pycoco_rows(data), strict=True))
    return {
        "all": {"header": header, "rows": rows},
        "scores": {"header": header[:n], "rows": [r[:n] for r in rows],
                   "titles": {"n/a": data["notes"]["meteor"]}},
        "details": {"header": [header[0], *header[n:]], "rows": [[r[0], *r[n:]] for r in rows]},
        "pycoco": pycoco,
    }


def render_markdown(data: dict[str, Any]) -> str:
    """report.md from the report.json payload (template ``report.md.j2``)."""
    best, worst = ranked_examples(data["images"])
    label = data["sections"][0]["settings"]["label"]
    tables = _tables(data)
    ranked = [(f"Best examples by CIDEr-D ({label})", best),
              (f"Worst examples by CIDEr-D ({label})", worst)]
    text = _templates("md").get_template("report.md.j2").render(
        run=data["run"], overview=_overview(data), scores=tables["all"], pycoco=tables["pycoco"],
        notes=list(data["notes"].values()), ranked=ranked, skipped=_skipped(data),
        failed=_skipped(data, key="failed"),
    )
    return text.rstrip("\n") + "\n"


def _skipped(
    data: dict[str, Any], n: int = SKIPPED_SHOWN, key: str = "skipped"
) -> list[tuple[str, str]]:
    """The first ``n`` skipped (or ``key="failed"``) images with their reasons, plus a "more"
    line."""
    items = list((data.get(key) or {}).items())
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
        ("images failed", str(len(data.get("failed") or {}))),
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


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _card(index: int, name: str, data: dict[str, Any], per_section: list[dict[str, dict]],
          thumb: bytes | None) -> dict[str, Any]:
    attrs, items = [("data-order", str(index))], []
    for i, (section, images) in enumerate(zip(data["sections"], per_section, strict=True)):
        im = images[name]
        attrs += [(f"data-cider-{i}", f"{im['CIDEr-D']:.6f}"), (f"data-bleu4-{i}", f"{im['BLEU-4']:.6f}")]
        items.append({"label": section["settings"]["label"], "text": im["caption"],
                      "cider": im["CIDEr-D"], "bleu4": im["BLEU-4"]})
    return {"name": name, "attrs": attrs, "lines": items,
            "refs": per_section[0][name]["references"],
            "thumb": data_uri(thumb, "image/jpeg") if thumb else None}


def _gallery(data: dict[str, Any], image_paths: dict[str, Path], limit: int, size: int) -> dict:
    from captioner.evaluation.figures import thumbnail_jpeg

    per_section = [{im["image"]: im for im in s["images"]} for s in data["sections"]]
    names = [im["image"] for im in data["images"]][:limit]
    cards = []
    for index, name in enumerate(names):
        path = image_paths.get(name)
        thumb = thumbnail_jpeg(path, size) if path is not None else None
        cards.append(_card(index, name, data, per_section, thumb))
    total = len(data["images"])
    options = []
    for i, s in enumerate(data["sections"]):
        label = s["settings"]["label"]
        options += [{"value": f"data-cider-{i}", "text": f"CIDEr-D ({label})", "selected": i == 0},
                    {"value": f"data-bleu4-{i}", "text": f"BLEU-4 ({label})", "selected": False}]
    shown = f"{len(names)} of {total} images" if len(names) < total else f"{len(names)} images"
    return {"shown": shown, "options": options, "cards": cards}


def _attention_blocks(data: dict[str, Any], attention: dict, image_paths: dict[str, Path]) -> list:
    from captioner.evaluation.figures import attention_strip_jpeg

    captions = {im["image"]: im["caption"] for im in data["images"]}
    return [
        {"name": name, "caption": captions.get(name, ""),
         "strip": data_uri(attention_strip_jpeg(image_paths.get(name), amap.words, amap.weights),
                           "image/jpeg")}
        for name, amap in attention.items() if amap.words
    ]


def render_html(
    data: dict[str, Any],
    *,
    image_paths: dict[str, Path] | None = None,
    attention: dict | None = None,
    curves: bytes | None = None,
    gallery: int = GALLERY_IMAGES,
    thumbnail_size: int = THUMBNAIL_SIZE,
) -> str:
    """The whole self-contained report page (template ``report.html.j2``, autoescaped)."""
    image_paths = image_paths or {}
    tables = _tables(data)
    return _templates("html").get_template("report.html.j2").render(
        run_name=Path(str(data["run"])).name,
        overview=_overview(data),
        scores=tables["scores"],
        details=tables["details"],
        pycoco=tables["pycoco"],
        notes=list(data["notes"].values()),
        skipped=_skipped(data),
        failed=_skipped(data, key="failed"),
        curves=data_uri(curves, "image/png") if curves else None,
        attention=_attention_blocks(data, attention or {}, image_paths),
        label=data["sections"][0]["settings"]["label"],
        gallery=_gallery(data, image_paths, gallery, thumbnail_size),
    ) + "\n"
