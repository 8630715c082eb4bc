"""Attention heatmaps: tiles light up where the attention is, one tile per word."""

from __future__ import annotations

import numpy as np
from PIL import Image

from captioner.heatmaps import TILE, attention_strip, grid_of, overlay


def test_overlay_is_bright_where_attention_is():
    image = np.full((32, 32, 3), 200, np.uint8)
    alpha = np.zeros(4, np.float32)
    alpha[3] = 1.0  # bottom-right cell of a 2x2 grid
    tile = np.asarray(overlay(image, alpha, (2, 2), size=64), dtype=float)
    assert tile[48:, 48:].mean() > 190 and tile[:16, :16].mean() < 90


def test_strip_has_image_plus_one_tile_per_word():
    image = np.zeros((20, 20, 3), np.uint8)
    alphas = np.full((7, 9), 1 / 9, np.float32)
    strip = attention_strip(image, [f"w{i}" for i in range(7)], alphas, (3, 3), columns=4)
    assert isinstance(strip, Image.Image)
    assert strip.size == (4 * TILE, 2 * (TILE + 18))  # 8 tiles in rows of 4


def test_grid_of():
    assert grid_of((7, 7, 1280)) == (7, 7)
    assert grid_of((49, 512)) == (7, 7)
    assert grid_of((14, 14, 512)) == (14, 14)
