"""Upload names, content types and option parsing of ``captioner serve`` (no web framework)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from captioner.errors import RequestError
from captioner.formats.decoding_config import MAX_BEAM_SIZE, DecodingConfig
from captioner.serve.engine import Options
from captioner.serve.uploads import (
    Limits,
    check_content_type,
    decode_upload,
    parse_options,
    safe_name,
)


def test_safe_name_keeps_only_a_printable_base_name():
    assert safe_name("../../etc/passwd", 0) == "passwd"
    assert safe_name("C:\\Users\\me\\photo.jpg", 0) == "photo.jpg"
    assert safe_name("a\x00b\nc.png", 0) == "abc.png"
    assert safe_name("", 2) == safe_name(None, 2) == "image3"
    assert len(safe_name("x" * 1000 + ".jpg", 0)) == 200


@pytest.mark.parametrize("kind, ok", [
    ("image/jpeg", True), ("image/png; charset=binary", True), ("IMAGE/WEBP", True),
    ("application/octet-stream", True), ("", True), (None, True),
    ("text/plain", False), ("application/pdf", False), ("multipart/mixed", False)])
def test_content_types(kind, ok):
    failure = check_content_type(kind)
    assert (failure is None) == ok
    if failure:
        assert failure.status == 415 and "not an image upload" in failure.reason


def test_options_defaults_and_ranges():
    stored = DecodingConfig(beam_size=3, alpha=0.7, block_ngram=2)  # the model's own
    assert parse_options({}, True, stored) == Options(stored)
    assert parse_options({"beam_size": ["5"], "n_best": ["5"], "attention": ["on"],
                          "heatmap": ["0"]}, True, stored) == Options(
        DecodingConfig(5, 5, 0.7, 2), True, False)
    assert parse_options({"beam_size": [""]}, False, DecodingConfig(2)).decoding.beam_size == 2
    assert parse_options({"alpha": ["0"], "block_ngram": ["0"], "max_length": ["7"]}, False,
                         stored).decoding == DecodingConfig(3, 1, 0.0, 0, 7)
    assert parse_options({"alpha": [".5"]}, False, stored).decoding.alpha == 0.5
    for fields in ({"beam_size": ["1.5"]}, {"beam_size": ["1e3"]}, {"n_best": ["0"]},
                   {"beam_size": ["99999999"]}, {"attention": ["2"]}, {"n_best": ["4"]},
                   {"alpha": ["-1"]}, {"alpha": ["nan"]}, {"alpha": ["1e9"]}, {"alpha": ["11"]},
                   {"block_ngram": ["-1"]}, {"max_length": ["0"]}, {"max_length": ["501"]},
                   {"beam_size": [str(MAX_BEAM_SIZE + 1)]}):
        with pytest.raises(RequestError) as err:
            parse_options(fields, True, stored)
        assert err.value.status == 400 and "\n" not in str(err.value)


def test_upload_larger_than_the_limit_is_not_copied_past_it(tmp_path):
    data = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(data, "PNG")
    upload = SimpleNamespace(filename="noise.png", content_type="image/png", file=data)
    refused = decode_upload(upload, 0, tmp_path, (8, 8), Limits(max_bytes=1000))
    assert (refused.name, refused.pixels, refused.failure.status) == ("noise.png", None, 413)
    assert list(tmp_path.iterdir()) == []  # the partial copy is gone too
    decoded = decode_upload(upload, 0, tmp_path, (8, 8), Limits())
    assert decoded.failure is None and decoded.pixels.shape == (8, 8, 3)
    assert decoded.pixels.dtype == np.uint8
    assert list(tmp_path.iterdir()) == []


def test_an_upload_keeps_its_own_aspect_ratio_for_the_heat_map(tmp_path):
    data = io.BytesIO()
    Image.new("RGB", (120, 40), (200, 10, 10)).save(data, "PNG")
    upload = SimpleNamespace(filename="wide.png", content_type="image/png", file=data)
    decoded = decode_upload(upload, 0, tmp_path, (8, 8), Limits())
    assert decoded.pixels.shape == (8, 8, 3) and decoded.aspect == pytest.approx(3.0)
