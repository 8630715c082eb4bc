"""Property-based tests (hypothesis): random truncations and byte flips of every file format
captioner reads give one clear error or the right answer, never a traceback, never a silent
wrong answer, and never cost the other images of a batch."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from runfolder import make_run

from captioner.encoders.images import load_image
from captioner.errors import CaptionerError, ImageError
from captioner.features.cache import FeatureReader
from captioner.features.cache_writer import FeatureWriter
from captioner.features.extraction import encoded_batches
from captioner.inference.captioner import Captioner
from captioner.text.captions import read_captions
from captioner.text.tokenizer import Tokenizer

FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
TMP = Path(tempfile.mkdtemp(prefix="captioner-properties-"))


@st.composite
def damaged(draw, original: bytes) -> bytes:
    """``original`` cut short, or with 1 to 8 bytes replaced, or both."""
    data = bytearray(original)
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data) - 1))]
    if data and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= draw(st.integers(1, 255))
    if bytes(data) == original:  # always some damage
        data = data[:-1]
    return bytes(data)


def _write(name: str, data: bytes) -> Path:
    path = TMP / name
    path.write_bytes(data)
    return path


def _one_line(exc: Exception, *names: str) -> None:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text
    assert any(name in text for name in names), text


# --------------------------------------------------------------------------- images


def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    pixels = np.arange(16 * 12 * 3, dtype=np.uint8).reshape(12, 16, 3)
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


JPEG, PNG = _image_bytes("JPEG"), _image_bytes("PNG")


class Pixels:
    """A numpy 'encoder': the first pixels of each image."""

    def predict_on_batch(self, x):
        return x.reshape(len(x), -1)[:, :6].astype("float32")


@FAST
@given(jpeg=damaged(JPEG), png=damaged(PNG))
def test_damaged_images_fail_alone_with_a_reason(jpeg, png):
    good = [_write("good0.png", PNG), _write("good1.jpg", JPEG)]
    bad = [_write("bad.jpg", jpeg), _write("bad.png", png)]
    for path in bad:
        try:
            image = load_image(path, (8, 8))
        except ImageError as exc:
            _one_line(exc, path.name)
            assert exc.reason
        else:
            assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    load = partial(load_image, size=(8, 8))
    items = [(p.name, p) for p in (good[0], bad[0], good[1], bad[1])]
    got = {}
    for keys, feats, failed in encoded_batches(items, Pixels().predict_on_batch, load, 4):
        got |= dict(zip(keys, [] if feats is None else feats, strict=True))
        assert all(isinstance(r, str) and r for r in failed.values())
    clean = Pixels().predict_on_batch(np.stack([load_image(p, (8, 8)) for p in good]))
    assert np.array_equal(got["good0.png"], clean[0]) and np.array_equal(got["good1.jpg"], clean[1])


# --------------------------------------------------------------------------- feature caches

NAMES = [f"img{i}.jpg" for i in range(6)]
ROWS = np.arange(6 * 4, dtype="float32").reshape(6, 4) / 7


def _clean_cache() -> bytes:
    path = TMP / "clean.h5"
    attrs = {"encoder": "tiny", "layer": "pool", "weights": "random", "input_size": (8, 8)}
    FeatureWriter.create(path, NAMES, (4,), "float32", attrs)
    with FeatureWriter(path) as writer:
        writer.commit(list(range(6)), ROWS, {})
    return path.read_bytes()


CACHE = _clean_cache()


def _raw_ranges() -> list[int]:
    """Byte offsets of the datasets' chunks (features, names, status, errors, checksums)."""
    import h5py

    offsets: list[int] = []
    with h5py.File(TMP / "clean.h5", "r") as f:
        for key in f:
            dsid = f[key].id
            for i in range(dsid.get_num_chunks()):
                info = dsid.get_chunk_info(i)
                offsets += range(info.byte_offset, info.byte_offset + info.size)
    return offsets


RAW = _raw_ranges()


@st.composite
def damaged_rows(draw) -> bytes:
    """1 to 4 bytes of the cache's stored data (not its HDF5 metadata) replaced."""
    data = bytearray(CACHE)
    for pos in draw(st.lists(st.sampled_from(RAW), min_size=1, max_size=4, unique=True)):
        data[pos] ^= draw(st.integers(1, 255))
    return bytes(data)


@FAST
@given(data=damaged(CACHE) | damaged_rows())
def test_damaged_caches_never_give_wrong_features(data):
    path = _write("damaged.h5", data)
    try:
        reader = FeatureReader(path)
    except CaptionerError as exc:
        _one_line(exc, str(path))
        return
    with reader:
        good, feats, bad = reader.read_valid(NAMES)
        assert set(good) | set(bad) == set(NAMES) and not set(good) & set(bad)
        for name, row in zip(good, feats, strict=True):  # what is returned is exactly right
            assert row.tobytes() == ROWS[NAMES.index(name)].tobytes(), name
        assert all(isinstance(why, str) and why for why in bad.values())
        report = reader.verify()
        assert report.line().startswith(str(path)) and "\n" not in report.line()


# --------------------------------------------------------------------------- run folders


ORIGINAL_DECODER: list = []  # the pristine run's DecoderInfo and Tokenizer


@pytest.fixture(scope="module")
def pristine():
    run = make_run(TMP / "run")
    feats = np.random.default_rng(3).normal(size=(2, 16)).astype("float32")
    captioner = Captioner.from_run(run)
    ORIGINAL_DECODER[:] = [captioner.config.decoder, captioner.tokenizer]
    expected = [c[0].text for c in captioner.caption_features(feats)]
    return run, feats, expected


def _load_or_refuse(run: Path, feats, expected, *names: str) -> None:
    """Loading gives one clear error, or a model that captions exactly as the original."""
    try:
        captioner = Captioner.from_run(run)
    except CaptionerError as exc:
        _one_line(exc, *names)
        return
    if (
        captioner.config.decoder == ORIGINAL_DECODER[0]
        and captioner.tokenizer == ORIGINAL_DECODER[1]
    ):
        return  # same decoder config, tokenizer and (checked) weights: the same model
    assert [c[0].text for c in captioner.caption_features(feats)] == expected


RUN_SETTINGS = settings(FAST, max_examples=20)


@RUN_SETTINGS
@given(data=st.data())
def test_damaged_config_json_is_refused_or_harmless(pristine, data):
    run, feats, expected = pristine
    target = TMP / "run-config"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run, target)
    original = (run / "config.json").read_bytes()
    (target / "config.json").write_bytes(data.draw(damaged(original)))
    _load_or_refuse(target, feats, expected, "config.json")


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5000)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))


@settings(RUN_SETTINGS, max_examples=10)
@given(data=st.data())
def test_any_edited_config_value_is_refused_or_harmless(pristine, data):
    run, feats, expected = pristine
    config = json.loads((run / "config.json").read_text())
    where = data.draw(st.sampled_from([p for p in _paths(config) if p]))
    node = config
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = data.draw(JSON_VALUES)
    target = TMP / "run-edit"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run, target)
    (target / "config.json").write_text(json.dumps(config))
    _load_or_refuse(target, feats, expected, "config.json")


@RUN_SETTINGS
@given(data=st.data())
def test_damaged_tokenizer_or_weights_are_refused(pristine, data):
    run, feats, expected = pristine
    name = data.draw(st.sampled_from(["tokenizer.json", "best.weights.h5"]))
    target = TMP / "run-file"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run, target)
    (target / name).write_bytes(data.draw(damaged((run / name).read_bytes())))
    _load_or_refuse(target, feats, expected, name)
    try:  # the tokenizer alone: one clear error or a tokenizer, never a traceback
        Tokenizer.load(target / "tokenizer.json")
    except CaptionerError as exc:
        _one_line(exc, "tokenizer.json")


# --------------------------------------------------------------------------- caption files

CAPTIONS = (
    b"a.jpg#0\tA dog runs on the grass .\n"
    b"a.jpg#1\tThe brown dog is running .\n"
    b"b.jpg#0\tTwo children play in the snow .\n"
    b"b.jpg#1\tKids playing outside in winter .\n"
)


@FAST
@given(data=damaged(CAPTIONS))
def test_damaged_caption_files_give_captions_or_one_error(data):
    path = _write("captions.txt", data)
    try:
        result = read_captions(path)
    except CaptionerError as exc:
        _one_line(exc, str(path))
        return
    for name, caps in result.captions.items():
        assert isinstance(name, str) and all(isinstance(c, str) for c in caps)
    for problem in result.problems:  # each bad line is reported with its line number
        assert "\n" not in str(problem)
