"""Figures drawn with matplotlib: attention heat overlays and training curves.

matplotlib is imported inside the functions and only through its object-oriented API
(``matplotlib.figure.Figure``, which renders with the headless Agg canvas), so importing this
module is cheap and the pyplot backend of a program that calls it is left alone.

Attention: each word's weights (a ``grid`` of h x w cells over the encoder's input, which is the
photo squashed to a square) are upsampled to the photo's size with bicubic interpolation,
smoothed with a Gaussian about a third of a cell wide and drawn over the photo with the ``jet``
colour map at partial opacity, stretched per word from its least (blue) to its most (red)
attended spot, with the peak's ratio to an even spread written under each panel.
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

PANEL_PIXELS = 256  # longest side of one attention panel's photo
PANEL_INCHES = 2.4
LABEL_INCHES = 0.6  # per panel row: the word above, the peak ratio below
LEGEND = (
    "Red: where the decoder looked hardest for the word; blue: where it looked least (colours "
    "stretched per word). Peak: the word's largest attention weight over that of an even "
    "spread (1 / {cells} grid cells): 1x is attention spread evenly, {cells}x all of it on "
    "one cell."
)
LEGEND_LINE_INCHES = 0.17  # one line of the 8-point legend
DPI = 100
COLUMNS = 5
HEAT_CMAP = "jet"
HEAT_OPACITY = 0.55
SMOOTHING = 0.35  # Gaussian sigma, in grid cells
TRAIN_COLOUR, VAL_COLOUR, OTHER_COLOUR = "#1f77b4", "#d62728", "#2ca02c"


# --------------------------------------------------------------------------- attention


def as_photo(image: Any, longest: int = PANEL_PIXELS) -> np.ndarray:
    """An RGB uint8 array (H, W, 3) no larger than ``longest`` px, from an array (H, W, 3) in
    [0, 255], a PIL image or an image file."""
    if isinstance(image, (str, os.PathLike)):
        from captioner.encoders.images import load_image  # EXIF rotation, modes, clear errors

        pic = Image.fromarray(load_image(image))
    elif isinstance(image, Image.Image):
        pic = image.convert("RGB")
    else:
        pic = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)).convert("RGB")
    pic.thumbnail((longest, longest))
    return np.asarray(pic)


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) row-normalised Gaussian blur matrix (edges renormalised, no dark border)."""
    x = np.arange(n, dtype=np.float32)
    k = np.exp(-0.5 * ((x[:, None] - x[None, :]) / max(sigma, 1e-3)) ** 2)
    return k / k.sum(axis=1, keepdims=True)


def upsample_attention(
    weights: np.ndarray, size: tuple[int, int], smoothing: float = SMOOTHING, scale: bool = True
) -> np.ndarray:
    """One word's attention (h, w) as a smooth mask (H, W) = ``size``.

    Bicubic upsampling, then a Gaussian of ``smoothing`` grid cells; the mass of each cell is
    kept (a cell's weight becomes its height). With ``scale`` the mask is min-max scaled to
    [0, 1] (a uniform attention gives all zeros); else it keeps the weights' units."""
    weights = np.asarray(weights, dtype=np.float32)
    height, width = size
    mask = np.asarray(Image.fromarray(weights, "F").resize((width, height), Image.BICUBIC))
    sy, sx = smoothing * height / weights.shape[0], smoothing * width / weights.shape[1]
    mask = _gaussian_matrix(height, sy) @ mask @ _gaussian_matrix(width, sx).T  # (H, W)
    mask = np.clip(mask, 0.0, None)  # bicubic overshoot
    if not scale:
        return mask.astype(np.float32)
    low, high = float(mask.min()), float(mask.max())
    if high - low < 1e-6 * max(abs(high), 1e-12):
        return np.zeros((height, width), np.float32)
    return ((mask - low) / (high - low)).astype(np.float32)


def _grid_weights(weights: np.ndarray, grid: tuple[int, int] | None) -> np.ndarray:
    """Weights (T, h, w) from (T, h, w) or (T, h*w) with a known or square grid."""
    weights = np.asarray(weights, dtype=np.float32)
    if weights.ndim == 3:
        return weights
    if grid is None:
        side = int(round(math.sqrt(weights.shape[-1])))
        grid = (side, weights.shape[-1] // side)
    return weights.reshape(len(weights), *grid)


def _panel(
    ax, photo: np.ndarray, title: str, mask: np.ndarray | None = None, peak: float = 1.0
) -> None:
    """The photo, with ``mask`` as a heat overlay stretched from its least to its most attended
    spot, titled with the word; below it ``peak``, the largest weight over an even spread's."""
    ax.imshow(photo, interpolation="bilinear")
    if mask is not None:
        low, high = float(mask.min()), float(mask.max())
        ax.imshow(
            mask,
            cmap=HEAT_CMAP,
            alpha=HEAT_OPACITY,
            vmin=low,
            vmax=high if high > low else low + 1e-9,
            interpolation="bilinear",
        )
        ax.text(
            0.5,
            -0.02,
            f"peak {peak:.2f}x an even spread",
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=8,
            color="#555555",
        )
    ax.set_title(title, fontsize=12)
    ax.set_axis_off()


def _masks(photo: np.ndarray, alphas: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
    """Smooth masks (T, H, W) at the photo's size, and each word's largest weight over that
    of an even spread (1 / cells; the raw weights, not the smoothed ones)."""
    masks = [upsample_attention(a, photo.shape[:2], scale=False) for a in alphas]
    return masks, [float(a.max()) * a.size for a in alphas]


def attention_figure(
    image: Any,
    words: Sequence[str],
    weights: np.ndarray,
    grid: tuple[int, int] | None = None,
    caption: str | None = None,
    columns: int = COLUMNS,
    legend: bool = False,
):
    """A matplotlib ``Figure``: the photo, then one heat overlay per word titled with the word.

    ``weights`` is (len(words), h, w) or (len(words), h*w). Each word's colours run from its
    least (blue) to its most attended spot (red), so the place it looked at shows even when the
    attention is spread out; the number under each panel says how peaked it is (the largest
    weight over that of an even spread, 1/cells); ``legend``: a note at the bottom says all
    this (for a PNG seen on its own; report.html says it beside its strips)."""

    import textwrap

    from matplotlib.figure import Figure

    photo = as_photo(image)
    grid_weights = _grid_weights(weights, grid)
    masks, peaks = _masks(photo, grid_weights)
    if len(masks) != len(words):
        raise ValueError(f"{len(words)} words but {len(masks)} attention maps")
    panels = [("(photo)", None, 1.0)] + list(zip(words, masks, peaks, strict=True))
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    aspect = photo.shape[0] / photo.shape[1]
    width = columns * PANEL_INCHES
    cells = int(np.prod(grid_weights.shape[1:])) if len(grid_weights) else 1
    note = textwrap.fill(LEGEND.format(cells=cells), width=max(40, int(width * 15)))
    legend_inches = (note.count("\n") + 1) * LEGEND_LINE_INCHES + 0.1 if legend else 0.0
    height = rows * (PANEL_INCHES * aspect + LABEL_INCHES) + legend_inches
    fig = Figure(figsize=(width, height), dpi=DPI)
    for i, (title, mask, peak) in enumerate(panels):
        _panel(fig.add_subplot(rows, columns, i + 1), photo, title, mask, peak)
    if caption:
        fig.suptitle(caption, fontsize=13)
    if legend:
        fig.text(0.5, 0.05 / height, note, ha="center", va="bottom", fontsize=8, color="#555555")
    fig.tight_layout(rect=(0, legend_inches / height, 1, 1))
    return fig


def word_overlay(image: Any, word: str, weights: np.ndarray, grid: tuple[int, int] | None = None):
    """A one-panel ``Figure``: one word's heat overlay (as in :func:`attention_figure`),
    titled with the word; ``weights`` is (h, w) or (h*w,)."""
    from matplotlib.figure import Figure

    photo = as_photo(image)
    masks, peaks = _masks(photo, _grid_weights(np.asarray(weights)[None], grid))
    aspect = photo.shape[0] / photo.shape[1]
    fig = Figure(figsize=(PANEL_INCHES * 1.5, PANEL_INCHES * 1.5 * aspect + LABEL_INCHES), dpi=DPI)
    _panel(fig.add_subplot(1, 1, 1), photo, word, masks[0], peaks[0])
    fig.tight_layout()
    return fig


def image_bytes(fig, fmt: str = "png") -> bytes:
    """The figure as PNG (or ``"jpeg"``, smaller for photos) bytes."""
    buf = io.BytesIO()
    extra = {"pil_kwargs": {"quality": 85}} if fmt == "jpeg" else {}
    fig.savefig(buf, format=fmt, dpi=DPI, **extra)
    return buf.getvalue()


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes."""
    return image_bytes(fig, "png")


def attention_strip_png(
    image: Any,
    words: Sequence[str],
    weights: np.ndarray,
    grid: tuple[int, int] | None = None,
    caption: str | None = None,
    columns: int = COLUMNS,
) -> bytes:
    """PNG bytes of :func:`attention_figure` (the photo and one panel per word)."""
    return png_bytes(attention_figure(image, words, weights, grid, caption, columns))


def word_overlay_png(
    image: Any, word: str, weights: np.ndarray, grid: tuple[int, int] | None = None
) -> bytes:
    """PNG bytes of :func:`word_overlay` (one word's heat overlay)."""
    return png_bytes(word_overlay(image, word, weights, grid))


def save_attention_map(
    path: str | os.PathLike,
    image: Any,
    words: Sequence[str],
    weights: np.ndarray,
    grid: tuple[int, int] | None = None,
    caption: str | None = None,
) -> None:
    """Write :func:`attention_figure` as a PNG file, with its legend (``caption
    --attention-map``: the PNG is read on its own)."""
    figure = attention_figure(image, words, weights, grid, caption, legend=True)
    figure.savefig(path, format="png", dpi=DPI)


# --------------------------------------------------------------------------- report pictures

THUMBNAIL_SIZE = 160
THUMBNAIL_QUALITY = 80
REPORT_COLUMNS = 7


def _photo_or_grey(path: str | os.PathLike | None, size: int = PANEL_PIXELS) -> np.ndarray:
    """The image fitted into size x size (EXIF-upright), or plain grey when unreadable."""
    if path is not None:
        try:
            with Image.open(path) as im:
                pic = ImageOps.exif_transpose(im).convert("RGB")
            pic.thumbnail((size, size))
            return np.asarray(pic)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            pass
    return np.full((size, size, 3), 128, np.uint8)


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
    buf = io.BytesIO()
    pic.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def attention_strip_jpeg(
    path: str | os.PathLike | None,
    words: Sequence[str],
    weights: np.ndarray,
    columns: int = REPORT_COLUMNS,
) -> bytes:
    """:func:`attention_figure` of an image file (grey when unreadable) as JPEG bytes, for
    report.html; ``weights`` is (len(words), h, w)."""
    figure = attention_figure(_photo_or_grey(path), words, weights, columns=columns)
    return image_bytes(figure, "jpeg")


# --------------------------------------------------------------------------- curves

CURVES_NOTE = (
    "Training loss is the mean over the epoch's batches, with dropout on and including any "
    "regulariser (the attention decoder's doubly stochastic penalty, label smoothing); "
    "validation loss is measured after the epoch without them."
)


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float(r[key]) if r.get(key) is not None else math.nan for r in rows]


def _has(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
    return any(r.get(key) is not None and math.isfinite(float(r[key])) for r in rows)


def _loss_panel(ax, epochs: list[int], rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Train vs validation loss; returns a note when they are not on the same footing."""
    if _has(rows, "xent"):  # the same masked cross-entropy, measured on both splits
        ax.plot(epochs, _column(rows, "xent"), "o-", color=TRAIN_COLOUR, label="training")
        if _has(rows, "val_xent"):
            ax.plot(epochs, _column(rows, "val_xent"), "s-", color=VAL_COLOUR, label="validation")
        ax.set_title("cross-entropy per word")
        ax.legend(loc="upper right", fontsize=9)
        return None
    ax.plot(epochs, _column(rows, "loss"), "o-", color=TRAIN_COLOUR, label="training loss")
    ax.set_ylabel("training loss", color=TRAIN_COLOUR)
    ax.set_title("loss (separate axes)")
    if not _has(rows, "val_loss"):
        return None
    right = ax.twinx()
    right.plot(epochs, _column(rows, "val_loss"), "s-", color=VAL_COLOUR, label="validation loss")
    right.set_ylabel("validation loss", color=VAL_COLOUR)
    return CURVES_NOTE


def training_curves(rows: Sequence[Mapping[str, Any]]):
    """A ``Figure`` of a run's history rows: loss (training and validation), learning rate and
    validation BLEU-4 and CIDEr-D (x100, and the training images' CIDEr-D when scored) against
    the epoch; the best BLEU-4 epoch is marked."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [int(r["epoch"]) for r in rows]
    fig = Figure(figsize=(13, 4.2), dpi=DPI)
    loss_ax, lr_ax, bleu_ax = fig.subplots(1, 3)
    note = _loss_panel(loss_ax, epochs, rows)
    if _has(rows, "learning_rate"):
        lrs = _column(rows, "learning_rate")
        lr_ax.plot(epochs, lrs, "o-", color=OTHER_COLOUR)
        finite = [v for v in lrs if v > 0]
        if finite and max(finite) / min(finite) > 10:
            lr_ax.set_yscale("log")
        else:
            lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_ax.set_title("learning rate (end of epoch)")
    if _has(rows, "val_bleu4"):
        bleu = [v * 100 for v in _column(rows, "val_bleu4")]
        bleu_ax.plot(epochs, bleu, "o-", color=VAL_COLOUR)
        best = int(np.nanargmax(bleu))
        bleu_ax.plot(
            [epochs[best]],
            [bleu[best]],
            "*",
            color="black",
            markersize=14,
            label=f"best: {bleu[best]:.1f} (epoch {epochs[best]})",
        )
        if _has(rows, "val_cider"):
            cider = [v * 100 for v in _column(rows, "val_cider")]
            bleu_ax.plot(epochs, cider, "^--", color=OTHER_COLOUR, label="CIDEr-D x100")
        if _has(rows, "train_cider"):  # far above the dev curve: reciting training captions
            train = [v * 100 for v in _column(rows, "train_cider")]
            bleu_ax.plot(epochs, train, "v:", color=TRAIN_COLOUR, label="training CIDEr-D x100")
        bleu_ax.legend(loc="best", fontsize=9)
    else:
        bleu_ax.text(
            0.5,
            0.5,
            "no validation BLEU-4",
            ha="center",
            va="center",
            transform=bleu_ax.transAxes,
            color="#888888",
        )
    bleu_ax.set_title("validation scores x100"
                      + (" (and training CIDEr-D)" if _has(rows, "train_cider") else ""))
    for ax in (loss_ax, lr_ax, bleu_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if note:
        fig.text(0.01, 0.01, textwrap.fill(note, 150), fontsize=8.5, color="#444444")
        fig.tight_layout(rect=(0, 0.09, 1, 1))
    else:
        fig.tight_layout()
    return fig


def save_training_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write :func:`training_curves` as a PNG file."""
    training_curves(rows).savefig(path, format="png", dpi=DPI)


def training_curves_png(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """PNG bytes of :func:`training_curves`."""
    return png_bytes(training_curves(rows))
