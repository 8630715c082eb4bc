"""Figures: attention heat overlays and training curves are drawn, not blank, and show the
data (heat where the attention is, one line per series)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from captioner.evaluation import figures  # noqa: E402

JET_RED = np.array([128, 0, 0])  # jet's top end; its low end is dark blue (0, 0, 128)


def _png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=float)


def _not_blank(pixels: np.ndarray) -> None:
    """Fails for a blank or uniform figure: many distinct colours and real contrast."""
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 50


def _photo(size=(120, 160)) -> np.ndarray:
    """A grey-ish photo with a diagonal gradient (H, W, 3)."""
    y, x = np.mgrid[0 : size[0], 0 : size[1]]
    grey = (80 + 80 * (x / size[1] + y / size[0]) / 2).astype(np.uint8)
    return np.stack([grey, grey, grey], axis=-1)


def _redness(region: np.ndarray) -> float:
    return float((region[..., 0] - region[..., 2]).mean())


def test_upsampled_mask_is_smooth_and_peaks_at_the_attended_cell():
    weights = np.zeros((7, 7), np.float32)
    weights[1, 5] = 1.0
    mask = figures.upsample_attention(weights, (140, 280))
    assert mask.shape == (140, 280) and mask.min() == 0.0 and mask.max() == pytest.approx(1.0)
    peak = np.unravel_index(np.argmax(mask), mask.shape)
    assert 20 <= peak[0] <= 40 and 200 <= peak[1] <= 240  # cell (1, 5): rows 20-40, cols 200-240
    assert np.abs(np.diff(mask, axis=1)).max() < 0.1  # smooth: no cell edges
    assert not figures.upsample_attention(np.full((7, 7), 1 / 49), (50, 50)).any()


def test_word_overlay_is_hot_where_the_word_looked():
    weights = np.zeros(49, np.float32)
    weights[6] = 1.0  # top-right cell of a 7x7 grid
    pixels = _png(figures.word_overlay_png(_photo(), "dog", weights))
    _not_blank(pixels)
    drawn = (pixels < 250).any(-1)  # the photo panel: rows and columns mostly not white
    rows, cols = np.nonzero(drawn.mean(1) > 0.5)[0], np.nonzero(drawn.mean(0) > 0.5)[0]
    panel = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = panel.shape[:2]
    top_right = panel[: height // 7, -width // 7 :]
    bottom_left = panel[-height // 2 :, : width // 2]
    assert _redness(top_right) > _redness(bottom_left) + 40
    assert ((np.abs(panel - JET_RED[None, None]).sum(-1) < 150).sum()) > 50  # red heat drawn


def test_attention_strip_has_one_panel_per_word_titled_with_it():
    words = ["a", "dog", "runs", "<end>"]
    weights = np.zeros((4, 7, 7), np.float32)
    for t in range(4):
        weights[t, t, t] = 1.0  # each word looks further down the diagonal
    fig = figures.attention_figure(_photo(), words, weights, caption="a dog runs", columns=5)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["(photo)", *words]
    notes = [t.get_text() for ax in fig.axes[1:] for t in ax.texts]
    assert notes == ["peak 49.00x an even spread"] * 4  # all weight on one of 49 cells
    assert [t for t in fig.texts if t is not fig._suptitle] == []  # report.html explains it
    fig = figures.attention_figure(_photo(), words, weights, caption="a dog runs", legend=True)
    (legend,) = [t.get_text() for t in fig.texts if t is not fig._suptitle]  # the CLI's PNG
    assert "1x is attention spread evenly" in legend.replace("\n", " ")
    assert "(1 / 49 grid cells)" in legend.replace("\n", " ")
    assert fig._suptitle.get_text() == "a dog runs"
    panels = [np.asarray(im.get_array()) for ax in fig.axes[1:] for im in ax.get_images()[1:]]
    peaks = [np.unravel_index(np.argmax(p), p.shape) for p in panels]
    assert [r for r, _ in peaks] == sorted(r for r, _ in peaks) and peaks[0] != peaks[-1]
    pixels = _png(figures.attention_strip_png(_photo(), words, weights))
    _not_blank(pixels)
    assert pixels.shape[1] > 4 * pixels.shape[0]  # five panels side by side


def test_attention_from_a_file_and_a_pil_image(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(_photo((300, 200))).save(path)
    weights = np.random.default_rng(0).dirichlet(np.ones(49), size=2).astype("float32")
    out = tmp_path / "att.png"
    figures.save_attention_map(out, path, ["a", "b"], weights)
    _not_blank(_png(out.read_bytes()))
    bare = figures.png_bytes(figures.attention_figure(path, ["a", "b"], weights))
    legend_rows = _png(out.read_bytes()).shape[0] - _png(bare).shape[0]
    assert 30 <= legend_rows <= 80  # the CLI's PNG (caption --attention-map) has its legend
    assert figures.as_photo(Image.open(path)).shape == (256, 171, 3)  # fitted into 256 px


HISTORY = [
    {
        "epoch": e,
        "loss": 33 - e * 0.3,
        "val_loss": 3.3 - e * 0.05,
        "val_bleu4": b,
        "learning_rate": 1e-3 * 0.5 ** (e // 3),
        "seconds": 400.0,
    }
    for e, b in zip(
        range(1, 9), (0.128, 0.117, 0.141, 0.158, 0.136, 0.141, 0.132, 0.133), strict=True
    )
]


def _colour_pixels(pixels: np.ndarray, hex_colour: str) -> int:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb).sum(-1) < 40).sum())


def test_training_curves_without_cross_entropy_use_separate_axes_and_say_why():
    fig = figures.training_curves(HISTORY)
    loss_ax = fig.axes[0]
    assert (
        loss_ax.get_ylabel() == "training loss" and fig.axes[-1].get_ylabel() == "validation loss"
    )
    assert any(figures.CURVES_NOTE in t.get_text().replace("\n", " ") for t in fig.texts)
    assert fig.axes[1].get_yscale() == "linear"  # 1e-3 .. 1.25e-4 is under 10x
    legend = fig.axes[2].get_legend().get_texts()[0].get_text()
    assert legend == "best: 15.8 (epoch 4)"  # BLEU-4 x100
    pixels = _png(figures.png_bytes(fig))
    _not_blank(pixels)
    assert _colour_pixels(pixels, figures.TRAIN_COLOUR) > 100  # 0 when a line is missing
    assert _colour_pixels(pixels, figures.VAL_COLOUR) > 100
    assert _colour_pixels(pixels, figures.OTHER_COLOUR) > 50


def test_training_curves_draw_the_training_cider_when_scored():
    rows = [{**r, "val_cider": 0.4, "train_cider": 0.4 + 0.1 * r["epoch"]} for r in HISTORY]
    fig = figures.training_curves(rows)
    labels = [t.get_text() for t in fig.axes[2].get_legend().get_texts()]
    assert labels[-2:] == ["CIDEr-D x100", "training CIDEr-D x100"]
    assert fig.axes[2].get_lines()[-1].get_ydata()[-1] == pytest.approx(120.0)
    assert "training CIDEr-D" in fig.axes[2].get_title()
    assert "training" not in figures.training_curves(HISTORY).axes[2].get_title()


def test_training_curves_with_cross_entropy_share_one_axis(tmp_path):
    rows = [{**r, "xent": 3.2 - 0.1 * r["epoch"], "val_xent": r["val_loss"]} for r in HISTORY]
    fig = figures.training_curves(rows)
    assert fig.axes[0].get_title() == "cross-entropy per word" and len(fig.axes) == 3
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["training", "validation"]
    assert not fig.texts  # same footing: no note needed
    figures.save_training_curves(rows, tmp_path / "curves.png")
    _not_blank(_png((tmp_path / "curves.png").read_bytes()))
