"""Line charts drawn with Pillow (no plotting library needed): training curves as PNG."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
           x: Sequence[float], series: Mapping[str, Sequence[float | None]]) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline="#888888")
    draw.text((left + 6, top - 16), title, fill="black")
    values = [v for s in series.values() for v in _finite(s)]
    if not values or not x:
        draw.text((left + 10, top + 10), "no data", fill="#888888")
        return
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = min(x), max(x) if max(x) > min(x) else min(x) + 1

    def point(xv: float, yv: float) -> tuple[float, float]:
        px = left + 40 + (xv - x0) / (x1 - x0) * (right - left - 50)
        py = bottom - 20 - (yv - lo) / (hi - lo) * (bottom - top - 30)
        return px, py

    draw.text((left + 2, top + 4), f"{hi:.3g}", fill="#555555")
    draw.text((left + 2, bottom - 26), f"{lo:.3g}", fill="#555555")
    draw.text((right - 60, bottom - 14), f"epoch {int(x1)}", fill="#555555")
    for i, (name, ys) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = [point(xv, yv) for xv, yv in zip(x, ys, strict=False)
               if yv is not None and math.isfinite(yv)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        draw.text((left + 50 + 110 * i, top + 4), name, fill=colour)


def plot_history(rows: Sequence[Mapping[str, float | None]], path: str | os.PathLike) -> None:
    """Two panels side by side: losses, and validation BLEU-4, against the epoch."""
    epochs = [float(r["epoch"]) for r in rows]
    losses = {k: [r.get(k) for r in rows] for k in ("loss", "val_loss") if any(k in r for r in rows)}
    bleu = {k: [r.get(k) for r in rows] for k in ("val_bleu4",) if any(k in r for r in rows)}
    image = Image.new("RGB", (900, 340), "white")
    draw = ImageDraw.Draw(image)
    _panel(draw, (10, 30, 440, 330), "loss (per real token)", epochs, losses)
    _panel(draw, (460, 30, 890, 330), "validation BLEU-4 (greedy)", epochs, bleu)
    image.save(path)
