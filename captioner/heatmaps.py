"""Pictures drawn with Pillow: attention heatmaps over the image (for ``caption
--attention-map`` and report.html) and report thumbnails."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

TILE = 160
THUMBNAIL_SIZE = 160
THUMBNAIL_QUALITY = 80
ATTENTION_TILE = 96


def overlay(image: np.ndarray, alpha: np.ndarray, grid: tuple[int, int], size: int = TILE) -> Image.Image:
    """``image`` (H, W, 3) uint8 with the attention ``alpha`` (grid[0]*grid[1],) over it.

    The weights are min-max scaled per word, so the most attended cell is fully lit and the
    least attended one darkest, even when the attention is spread out."""
    base = Image.fromarray(image).convert("RGB").resize((size, size), Image.BILINEAR)
    heat = np.asarray(alpha, dtype=np.float32).reshape(grid)
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-8)  # (h, w) in [0, 1]
    mask = Image.fromarray(np.uint8(heat * 255)).resize((size, size), Image.BICUBIC)
    dark = Image.blend(base, Image.new("RGB", base.size, "black"), 0.6)
    return Image.composite(base, dark, mask)


def attention_strip(image: np.ndarray, words: Sequence[str], alphas: np.ndarray,
                    grid: tuple[int, int], size: int = TILE, columns: int = 6,
                    gap: int = 0) -> Image.Image:
    """The image, then one tile per word: the image lit where the model looked for that word,
    ``columns`` tiles a row, ``gap`` pixels apart, each labelled below.

    ``alphas`` is (len(words), grid[0]*grid[1]).
    """
    tiles = [(Image.fromarray(image).convert("RGB").resize((size, size)), "(image)")]
    tiles += [(overlay(image, a, grid, size), w) for w, a in zip(words, alphas, strict=False)]
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * (size + gap), rows * (size + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, word) in enumerate(tiles):
        x, y = (i % columns) * (size + gap), (i // columns) * (size + 18)
        sheet.paste(tile, (x, y))
        draw.text((x + 4, y + size + 3), word[:16], fill="black")
    return sheet


def teacher_forced_attention(captioner, features: np.ndarray,
                             captions: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Attention weights (len(tokens) + 1, L) of each generated caption: one row per word,
    then the row of the ``<end>`` step. ``features`` is (B, *feature_shape), one per caption."""
    from keras import ops

    from captioner.tokenizer import START

    longest = max((len(c) for c in captions), default=0)
    inputs = np.zeros((len(captions), longest + 1), dtype="int32")  # <start> w1 .. wn, padded
    inputs[:, 0] = START
    for row, tokens in enumerate(captions):
        inputs[row, 1 : len(tokens) + 1] = tokens
    alphas = ops.convert_to_numpy(captioner.decoder.attention_weights(features, inputs))
    return [np.asarray(alphas[row, : len(t) + 1], "float32") for row, t in enumerate(captions)]


def caption_attention(captioner, features: np.ndarray, tokens: Sequence[int]) -> tuple[list[str], np.ndarray]:
    """Words of a generated caption (with ``<end>``) and their attention weights (T, L)."""
    alphas = teacher_forced_attention(captioner, features[None], [tokens])[0]
    words = [captioner.tokenizer.decode([t]) or "<unk>" for t in tokens] + ["<end>"]
    return words, alphas


def grid_of(feature_shape: Sequence[int]) -> tuple[int, int]:
    """The (h, w) attention grid of spatial features (H, W, D) or (L, D) with square L."""
    if len(feature_shape) == 3:
        return int(feature_shape[0]), int(feature_shape[1])
    side = int(round(np.sqrt(feature_shape[0])))
    return side, int(feature_shape[0]) // side


def save_attention_map(captioner, image_path: str | os.PathLike, caption, out: str | os.PathLike) -> None:
    """Encode ``image_path``, get the attention of ``caption`` and save the strip as PNG."""
    from captioner.images import load_image

    pixels = load_image(image_path, captioner.input_size, resample=captioner.resample)
    features = captioner.encode_images(pixels[None])[0]
    words, alphas = caption_attention(captioner, features, caption.tokens)
    grid = grid_of(captioner.decoder.feature_shape)
    attention_strip(pixels, words, alphas, grid).save(out)


# --------------------------------------------------------------------------- report pictures


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


def _square_pixels(path: Path | None, size: int) -> np.ndarray:
    """The image squashed to size x size (as the encoder saw it), or plain grey."""
    if path is not None:
        try:
            with Image.open(path) as im:
                return np.asarray(ImageOps.exif_transpose(im).convert("RGB").resize((size, size)))
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            pass
    return np.full((size, size, 3), 128, np.uint8)


def attention_strip_jpeg(
    path: Path | None, words: Sequence[str], weights: np.ndarray, tile: int = ATTENTION_TILE
) -> bytes:
    """:func:`attention_strip` of the image file (or grey) in one row, as JPEG bytes for
    report.html; ``weights`` is (len(words), h, w)."""
    grid = tuple(weights.shape[1:])
    alphas = np.asarray(weights).reshape(len(words), -1)
    strip = attention_strip(_square_pixels(path, tile), words, alphas, grid, tile,
                            columns=len(words) + 1, gap=4)
    return _jpeg(strip, 85)
