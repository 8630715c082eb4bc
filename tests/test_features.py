"""captioner.features.cache, captioner.features.extraction and `captioner extract`: the crash-safe, resumable HDF5 feature cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import FLICKR_IMAGES, needs_flickr, needs_mobilenet
from PIL import Image

from captioner.cli import main as cli_main
from captioner.encoders import specs as encoders
from captioner.encoders.images import load_image
from captioner.encoders.specs import EncoderSpec, FeatureLayer
from captioner.errors import CacheMismatchError, CaptionerError, ImageError
from captioner.features.cache import (
    DONE,
    FAILED,
    PENDING,
    FeatureReader,
    MissingFeaturesError,
    open_features,
)
from captioner.features.cache_writer import FeatureWriter
from captioner.features.extraction import extract, extract_with_spec

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
IDENTITY = {"encoder": "tiny", "layer": "conv"}


# --------------------------------------------------------------------------- a tiny encoder


@dataclass(frozen=True)
class TinySpec(EncoderSpec):
    """A 32x32 'backbone' with one seeded convolution: (32, 32, 3) -> (4, 4, 8)."""

    def build(self, include_top: bool = False, weights=None):
        import keras

        inputs = keras.Input((*self.input_size, 3))
        x = keras.layers.Conv2D(
            8,
            3,
            strides=8,
            padding="same",
            name="feat",
            kernel_initializer=keras.initializers.GlorotUniform(seed=1),
            bias_initializer=keras.initializers.Constant(0.1),
        )(inputs)
        return keras.Model(inputs, x)

    def weights_identity(self, weights, layer=None) -> str:
        return f"tiny:{weights}"


TINY = TinySpec(
    name="tiny",
    family="tiny",
    input_size=(32, 32),
    preprocessing="tf",
    layers={
        "conv": FeatureLayer("conv", "feat", (4, 4, 8)),
        "pool": FeatureLayer("pool", "feat", (8,), pool=True),
    },
    default_layer="conv",
)


def register_tiny() -> None:
    """Make `--encoder tiny` available (used in subprocesses too)."""
    encoders.SPECS["tiny"] = TINY


@pytest.fixture
def tiny_encoder(monkeypatch):
    monkeypatch.setitem(encoders.SPECS, "tiny", TINY)


@pytest.fixture(scope="module")
def tiny_model():
    return TINY.feature_model("conv", None)


def make_images(
    folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (40, 30)
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def run_tiny(paths, out, model, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("batch_size", 5)
    return extract(paths, out, model=model, identity=IDENTITY, input_size=(32, 32), **kwargs)


def direct(model, paths) -> np.ndarray:
    """Features computed without the cache, for comparison."""
    batch = np.stack([load_image(p, (32, 32)) for p in paths])
    return np.asarray(model.predict_on_batch(batch))


def no_model():
    raise AssertionError("the model must not be built when there is nothing to do")


# --------------------------------------------------------------------------- layout


def test_layout_and_attributes(tmp_path, tiny_model):
    paths = make_images(tmp_path / "imgs", 12)
    summary = run_tiny(paths, tmp_path / "f.h5", tiny_model)
    assert (summary.done, summary.skipped, summary.failed) == (12, 0, {})
    assert summary.requested == 12 and summary.images_per_s > 0
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert set(f) == {"features", "names", "status", "errors", "checksums"}
        assert f["checksums"].dtype == np.uint64 and (f["checksums"][()] > 2**32).all()
        feats = f["features"]
        assert feats.shape == (12, 4, 4, 8) and feats.dtype == np.float32
        assert feats.chunks is not None and feats.compression is None
        for key in f:  # every dataset allocated at creation, fixed-length strings only
            assert f[key].id.get_create_plist().get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY
        assert h5py.check_string_dtype(f["names"].dtype).length == len("img00.png")
        assert h5py.check_string_dtype(f["errors"].dtype).length == 200
        assert f["status"].dtype == np.uint8 and list(f["status"][()]) == [DONE] * 12
        assert [n.decode() for n in f["names"][()]] == [p.name for p in paths]
        attrs = dict(f.attrs)
    for key in ("keras_version", "numpy_version", "h5py_version", "captioner_version", "backend"):
        assert attrs[key]
    assert attrs["encoder"] == "tiny" and attrs["layer"] == "conv"
    assert list(attrs["input_size"]) == [32, 32] and list(attrs["feature_shape"]) == [4, 4, 8]
    assert attrs["dtype"] == "float32" and attrs["resample"] == "bilinear"
    assert attrs["format_version"] == 2
    with FeatureReader(tmp_path / "f.h5") as reader:
        np.testing.assert_allclose(
            reader.read([p.name for p in paths]), direct(tiny_model, paths), atol=1e-6
        )
    assert not list(tmp_path.glob("*.tmp"))


def test_runs_only_overwrite_raw_data(tmp_path, tiny_model):
    """Every byte outside the datasets' chunks (all HDF5 metadata) is unchanged by a run."""
    paths = make_images(tmp_path / "imgs", 12)
    attrs = {**IDENTITY, "format_version": 1, "input_size": (32, 32), "resample": "bilinear",
             "jpeg_draft": True, "dtype": "float32"}  # fmt: skip
    FeatureWriter.create(tmp_path / "f.h5", [p.name for p in paths], (4, 4, 8), "float32", attrs)
    before = np.frombuffer((tmp_path / "f.h5").read_bytes(), np.uint8)
    (tmp_path / "imgs" / "img03.png").write_text("broken")  # a failure writes raw data too
    summary = run_tiny(paths, tmp_path / "f.h5", tiny_model)
    assert (summary.done, len(summary.failed)) == (11, 1)
    after = np.frombuffer((tmp_path / "f.h5").read_bytes(), np.uint8)
    assert len(after) == len(before)
    raw = np.zeros(len(after), bool)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        for key in f:
            dsid = f[key].id
            for i in range(dsid.get_num_chunks()):
                info = dsid.get_chunk_info(i)
                raw[info.byte_offset : info.byte_offset + info.size] = True
    changed = np.flatnonzero(after != before)
    assert len(changed) > 1000  # the features were written...
    assert raw[changed].all()  # ...and nothing else


# --------------------------------------------------------------------------- reader


@pytest.fixture
def cache(tmp_path, tiny_model) -> tuple[Path, list[Path]]:
    paths = make_images(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "bad.jpg").write_text("no")
    paths.append(tmp_path / "imgs" / "bad.jpg")
    run_tiny(paths, tmp_path / "f.h5", tiny_model)
    return tmp_path / "f.h5", paths


def test_reader_api(cache, tiny_model):
    path, paths = cache
    good = [p.name for p in paths[:6]]
    expected = direct(tiny_model, paths[:6])
    with open_features(path, expect={"encoder": "tiny", "input_size": [32, 32]}) as reader:
        assert reader.names == good + ["bad.jpg"] and len(reader) == 7
        assert reader.feature_shape == (4, 4, 8) and reader.dtype == np.float32
        assert reader.attrs["encoder"] == "tiny" and reader.attrs["input_size"] == (32, 32)
        assert reader.done_names == good
        assert reader.failed == {"bad.jpg": "not an image (cannot identify)"}
        assert reader.counts() == {"pending": 0, "done": 6, "failed": 1}
        assert "img02.png" in reader and "bad.jpg" not in reader and "zzz.png" not in reader
        np.testing.assert_allclose(reader["img02.png"], expected[2], atol=1e-6)
        order = ["img05.png", "img00.png", "img05.png", "img03.png"]
        np.testing.assert_allclose(reader.read(order), expected[[5, 0, 5, 3]], atol=1e-6)
        assert reader.read([]).shape == (0, 4, 4, 8)
        with pytest.raises(MissingFeaturesError, match="'zzz.png' is not in the feature cache"):
            reader.read(["img00.png", "zzz.png"])
        with pytest.raises(KeyError):  # also a KeyError, for dict-like callers
            reader["zzz.png"]
        with pytest.raises(CaptionerError, match=r"status failed: not an image .*--retry-failed"):
            reader["bad.jpg"]
        assert reader.status_of("bad.jpg") == "failed" and reader.status_of("zzz.png") == "absent"


def test_sparse_read_uses_fancy_indexing(tmp_path, tiny_model):
    paths = make_images(tmp_path / "imgs", 30)
    run_tiny(paths, tmp_path / "f.h5", tiny_model, batch_size=8)
    expected = direct(tiny_model, paths)
    with FeatureReader(tmp_path / "f.h5") as reader:  # rows 29 and 0: a sparse request
        np.testing.assert_allclose(
            reader.read(["img29.png", "img00.png"]), expected[[29, 0]], atol=1e-6
        )


def test_reader_expect_mismatch_names_both_values(cache):
    path, _ = cache
    with pytest.raises(CacheMismatchError) as info:
        FeatureReader(
            path, expect={"encoder": "mobilenet_v2_0.5", "layer": "conv", "colour": "red"}
        )
    message = str(info.value)
    assert "encoder: file has 'tiny', expected 'mobilenet_v2_0.5'" in message
    assert "colour: file has '(absent)', expected 'red'" in message
    assert "layer:" not in message  # the matching key is not listed
    assert "Write another file, or delete this one" in message


def test_reader_refuses_non_cache_files(tmp_path):
    with pytest.raises(CaptionerError, match="does not exist"):
        FeatureReader(tmp_path / "none.h5")
    (tmp_path / "x.h5").write_text("text")
    with pytest.raises(CaptionerError, match="not a readable HDF5 file"):
        FeatureReader(tmp_path / "x.h5")
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f["features"] = np.zeros(3)
    with pytest.raises(CaptionerError, match="not a captioner feature cache"):
        FeatureReader(tmp_path / "y.h5")


# --------------------------------------------------------------------------- resume, mismatch, union


def test_extract_refuses_a_cache_of_another_encoder(cache, tiny_model):
    path, paths = cache
    with pytest.raises(CacheMismatchError) as info:
        extract(paths, path, model=tiny_model, identity={"encoder": "vgg16", "layer": "fc2"},
                input_size=(32, 32), progress=False)  # fmt: skip
    assert "encoder: file has 'tiny', expected 'vgg16'" in str(info.value)
    assert "layer: file has 'conv', expected 'fc2'" in str(info.value)
    with pytest.raises(CacheMismatchError, match="dtype: file has 'float32', expected 'float16'"):
        run_tiny(paths, path, tiny_model, dtype="float16")


def test_rerun_skips_done_without_building_the_model(cache):
    path, paths = cache
    summary = run_tiny(paths, path, no_model)
    assert (summary.done, summary.skipped, summary.previously_failed) == (0, 6, 1)
    assert summary.failed == {"bad.jpg": "not an image (cannot identify)"}
    assert "extracted 0, skipped 6" in summary.line() and "--retry-failed" in summary.line()


def test_retry_failed(cache, tiny_model):
    path, paths = cache
    Image.new("RGB", (8, 8), (9, 9, 9)).save(paths[-1], format="PNG")  # the bad file is fixed
    assert run_tiny(paths, path, no_model).failed == {"bad.jpg": "not an image (cannot identify)"}
    summary = run_tiny(paths, path, tiny_model, retry_failed=True)
    assert (summary.done, summary.skipped, summary.failed) == (1, 6, {})
    with FeatureReader(path) as reader:
        assert reader.failed == {} and reader.counts()["done"] == 7
        np.testing.assert_allclose(reader["bad.jpg"], direct(tiny_model, paths[-1:])[0], atol=1e-6)


def test_new_names_grow_the_cache_into_the_union(tmp_path, tiny_model):
    paths = make_images(tmp_path / "imgs", 12)
    run_tiny(paths[:6], tmp_path / "f.h5", tiny_model)
    with FeatureReader(tmp_path / "f.h5") as reader:
        first = reader.read(reader.names)
    summary = run_tiny(paths[3:], tmp_path / "f.h5", tiny_model)  # 3 known + 6 new
    assert (summary.done, summary.skipped) == (6, 3)
    with FeatureReader(tmp_path / "f.h5") as reader:
        assert reader.names == [p.name for p in paths]  # old rows first, then the new names
        assert reader.done_names == reader.names
        assert np.array_equal(reader.read(reader.names[:6]), first)  # copied bit for bit
        np.testing.assert_allclose(reader.read(reader.names), direct(tiny_model, paths), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "imgs"]  # no temp files left


def test_duplicate_names_and_empty_input_refused(tmp_path, tiny_model):
    paths = make_images(tmp_path / "imgs", 2)
    with pytest.raises(CaptionerError, match="'img00.png' appears twice"):
        run_tiny([paths[0], paths[1], paths[0]], tmp_path / "f.h5", tiny_model)
    with pytest.raises(CaptionerError, match="no images"):
        run_tiny([], tmp_path / "f.h5", tiny_model)
    assert not (tmp_path / "f.h5").exists()


# --------------------------------------------------------------------------- bad images, strict, dtype


def test_every_bad_image_kind_recorded_while_good_ones_extract(tmp_path, tiny_model):
    good = make_images(tmp_path / "imgs", 8)
    folder = tmp_path / "imgs"
    Image.new("RGB", (100, 100)).save(folder / "huge.png")  # over max_pixels below
    jpeg = folder / "ok.jpg"
    Image.fromarray(np.full((30, 40, 3), 100, np.uint8)).save(jpeg)
    (folder / "truncated.jpg").write_bytes(jpeg.read_bytes()[:-200])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("hello")
    bad = ["huge.png", "truncated.jpg", "empty.jpg", "text.jpg", "missing.jpg"]
    paths = good[:3] + [folder / n for n in bad] + good[3:]
    summary = run_tiny(paths, tmp_path / "f.h5", tiny_model, max_pixels=50 * 50, batch_size=3)
    expected = {
        "huge.png": "too large (100×100 pixels)",
        "truncated.jpg": "truncated image",
        "empty.jpg": "empty file",
        "text.jpg": "not an image (cannot identify)",
        "missing.jpg": "missing file",
    }
    assert summary.failed == expected and summary.done == 8
    with FeatureReader(tmp_path / "f.h5") as reader:
        assert reader.failed == expected
        assert reader.done_names == [p.name for p in good]
        np.testing.assert_allclose(
            reader.read(reader.done_names), direct(tiny_model, good), atol=1e-6
        )
    with pytest.raises(ImageError, match="5 image"):
        run_tiny(paths, tmp_path / "f.h5", tiny_model, strict=True)


def test_unexpected_decoder_error_is_a_failure_not_a_crash(tmp_path, tiny_model, monkeypatch):
    from captioner.features import extraction

    paths = make_images(tmp_path / "imgs", 4)

    def flaky(path, **kwargs):
        if path.name == "img01.png":
            raise RuntimeError("decoder bug")
        return load_image(path, **kwargs)

    monkeypatch.setattr(extraction, "load_image", flaky)
    summary = run_tiny(paths, tmp_path / "new" / "dir" / "f.h5", tiny_model)  # folders made
    assert summary.done == 3
    assert summary.failed == {"img01.png": "unexpected error (RuntimeError: decoder bug)"}


def test_float16_storage(tmp_path, tiny_model):
    paths = make_images(tmp_path / "imgs", 7)
    run_tiny(paths, tmp_path / "a.h5", tiny_model)
    run_tiny(paths, tmp_path / "b.h5", tiny_model, dtype="float16")
    with FeatureReader(tmp_path / "a.h5") as a, FeatureReader(tmp_path / "b.h5") as b:
        assert b.dtype == np.float16 and b.attrs["dtype"] == "float16"
        full, half = a.read(a.names), b.read(b.names)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), full, rtol=1e-3, atol=1e-3)
    assert not np.array_equal(half.astype(np.float32), full)


def test_mirror_encodes_flipped_photos_into_a_cache_marked_mirrored(tmp_path, tiny_model):
    paths = make_images(tmp_path / "imgs", 4)
    np.testing.assert_array_equal(load_image(paths[0], (32, 32), mirror=True),
                                  load_image(paths[0], (32, 32))[:, ::-1])
    run_tiny(paths, tmp_path / "m.h5", tiny_model, mirror=True)
    flipped = np.stack([load_image(p, (32, 32))[:, ::-1] for p in paths])
    with FeatureReader(tmp_path / "m.h5") as reader:
        assert reader.attrs["mirrored"] is True
        np.testing.assert_allclose(reader.read(reader.names),
                                   np.asarray(tiny_model.predict_on_batch(flipped)), atol=1e-5)
    # a mirrored cache never takes unmirrored photos, nor the other way round
    with pytest.raises(CacheMismatchError, match="mirrored: file has True, expected False"):
        run_tiny(make_images(tmp_path / "more", 5), tmp_path / "m.h5", tiny_model)
    run_tiny(paths, tmp_path / "plain.h5", tiny_model)
    with pytest.raises(CacheMismatchError, match="mirrored: file has False, expected True"):
        run_tiny(paths, tmp_path / "plain.h5", tiny_model, mirror=True)


def test_ray_decoding_mirrors_as_the_local_loader(tmp_path):
    from captioner.engines.ray_runtime import decode_batch  # needs no Ray to run

    paths = make_images(tmp_path / "imgs", 2)
    out = decode_batch({"row": np.arange(2), "path": np.array([str(p) for p in paths])},
                       (32, 32), "bilinear", 10**8, mirror=True)
    np.testing.assert_array_equal(out["pixels"],
                                  np.stack([load_image(p, (32, 32), mirror=True) for p in paths]))


def test_caches_from_before_mirroring_resume_as_unmirrored(tmp_path, tiny_model):
    paths = make_images(tmp_path / "imgs", 3)
    run_tiny(paths[:2], tmp_path / "old.h5", tiny_model)
    with h5py.File(tmp_path / "old.h5", "a") as f:
        del f.attrs["mirrored"]  # as every cache written before --mirror
    assert run_tiny(paths, tmp_path / "old.h5", tiny_model).done == 1
    with pytest.raises(CacheMismatchError, match=r"mirrored: file has False, expected True"):
        run_tiny(paths, tmp_path / "old.h5", tiny_model, mirror=True)


def test_serial_decoding_gives_the_same_cache(tmp_path, tiny_model):
    paths = make_images(tmp_path / "imgs", 9)
    run_tiny(paths, tmp_path / "a.h5", tiny_model, workers=4)
    run_tiny(paths, tmp_path / "b.h5", tiny_model, workers=0)
    with FeatureReader(tmp_path / "a.h5") as a, FeatureReader(tmp_path / "b.h5") as b:
        assert np.array_equal(a.read(a.names), b.read(b.names))


def test_mixed_precision_stores_requested_dtype(tmp_path, tiny_encoder):
    import keras

    paths = make_images(tmp_path / "imgs", 4)
    full = extract_with_spec(paths, tmp_path / "a.h5", "tiny", "pool", None, progress=False)
    mixed = extract_with_spec(paths, tmp_path / "b.h5", "tiny", "pool", None, mixed_precision="float16",
                              progress=False)  # fmt: skip
    assert full.done == mixed.done == 4
    assert keras.config.dtype_policy().name == "float32"  # restored
    with FeatureReader(tmp_path / "a.h5") as a, FeatureReader(tmp_path / "b.h5") as b:
        assert a.attrs["compute_dtype"] == "float32" and b.attrs["compute_dtype"] == "mixed_float16"
        assert b.dtype == np.float32 and b.feature_shape == (8,)
        assert a.attrs["weights"] == "tiny:None" and a.attrs["preprocessing"] == "tf"
        np.testing.assert_allclose(b.read(b.names), a.read(a.names), atol=2e-2)
    with pytest.raises(CacheMismatchError, match="compute_dtype"):
        extract_with_spec(paths, tmp_path / "a.h5", "tiny", "pool", None, mixed_precision="float16",
                          progress=False)  # fmt: skip


# --------------------------------------------------------------------------- CLI


def test_cli_list_file_summary_and_strict(tmp_path, tiny_encoder, capsys):
    paths = make_images(tmp_path / "imgs", 5)
    (tmp_path / "split.txt").write_text("\n".join([p.name for p in paths] + ["gone.jpg"]) + "\n")
    args = ["extract", str(tmp_path / "split.txt"), "--images-dir", str(tmp_path / "imgs"),
            "--encoder", "tiny", "--layer", "pool", "--out", str(tmp_path / "f.h5"),
            "--batch-size", "2", "--workers", "2"]  # fmt: skip
    assert cli_main(args) == 0
    out, err = capsys.readouterr()
    assert out.startswith("extracted 5, skipped 0 (already in the cache), failed 1 in ")
    assert "failed: gone.jpg: missing file" in err
    assert cli_main(args + ["--strict"]) == 1
    out, _ = capsys.readouterr()
    assert out.startswith(
        "extracted 0, skipped 5 (already in the cache), failed 1 (1 in an earlier run"
    )
    with FeatureReader(tmp_path / "f.h5", expect={"encoder": "tiny", "layer": "pool"}) as reader:
        assert reader.feature_shape == (8,) and reader.failed == {"gone.jpg": "missing file"}
    assert cli_main(args[:2] + args[4:] + ["--limit", "2", "--out", str(tmp_path / "g.h5")]) == 0
    with FeatureReader(tmp_path / "g.h5") as reader:
        assert reader.names == [paths[0].name, paths[1].name]


def test_cli_mismatch_is_a_clean_error(tmp_path, tiny_encoder, capsys):
    make_images(tmp_path / "imgs", 3)
    base = ["extract", str(tmp_path / "imgs"), "--encoder", "tiny", "--out", str(tmp_path / "f.h5")]
    assert cli_main(base + ["--layer", "conv"]) == 0
    capsys.readouterr()
    assert cli_main(base + ["--layer", "pool"]) == 2
    err = capsys.readouterr().err
    assert "layer: file has 'conv', expected 'pool'" in err and "Traceback" not in err


def test_cli_choices_match_the_library():
    from captioner.commands import extract as command
    from captioner.encoders.images import RESAMPLE
    from captioner.features.cache import DTYPES
    from captioner.features.extraction import MIXED_PRECISION

    assert command.DTYPES == DTYPES and command.MIXED_PRECISION == MIXED_PRECISION
    assert command.RESAMPLE == tuple(RESAMPLE)


# --------------------------------------------------------------------------- SIGKILL and resume

KILLABLE = """
import sys, time
sys.path.insert(0, {tests!r})
from test_features import register_tiny
from captioner.features.cache_writer import FeatureWriter

register_tiny()
delay = float(sys.argv[1])
original = FeatureWriter._set_status

def slow(self, rows, value):  # widen the window between a batch's rows and its status
    if rows:
        time.sleep(delay)
    original(self, rows, value)

FeatureWriter._set_status = slow
from captioner.cli import main
sys.exit(main(sys.argv[2:]))
"""


def cli_process(delay: float, images: Path, out: Path) -> subprocess.Popen:
    script = KILLABLE.format(tests=str(TESTS))
    argv = ["extract", str(images), "--encoder", "tiny", "--out", str(out), "--batch-size", "4",
            "--workers", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", script, str(delay), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def done_count(path: Path) -> int:
    if not path.exists():
        return 0
    with FeatureReader(path) as reader:
        return reader.counts()["done"]


@pytest.mark.subprocess
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    images = tmp_path / "imgs"
    make_images(images, 40, seed=3)
    out = tmp_path / "killed.h5"
    proc = cli_process(0.25, images, out)
    deadline = time.monotonic() + 240
    while done_count(out) < 8:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the extraction never got going"
        time.sleep(0.02)
    time.sleep(0.1)  # land inside a later batch (most likely in the status window)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    with FeatureReader(out) as reader:  # the killed file opens; its status is a clean prefix
        status = np.array([reader.status_of(n) == "done" for n in reader.names])
        done = int(status.sum())
        assert 8 <= done < 40 and done % 4 == 0
        assert status[:done].all() and not status[done:].any()
        assert (
            set(reader.counts()) == {"done", "pending", "failed"} and reader.counts()["failed"] == 0
        )
    assert PENDING == 0 and FAILED == 2

    resumed = cli_process(0, images, out)
    stdout, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr
    assert stdout.startswith(
        f"extracted {40 - done}, skipped {done} (already in the cache), failed 0"
    )
    clean = cli_process(0, images, tmp_path / "clean.h5")
    _, stderr = clean.communicate(timeout=240)
    assert clean.returncode == 0, stderr
    with FeatureReader(out) as a, FeatureReader(tmp_path / "clean.h5") as b:
        assert a.names == b.names == [f"img{i:02d}.png" for i in range(40)]
        assert a.done_names == a.names
        assert np.array_equal(a.read(a.names), b.read(b.names))


# --------------------------------------------------------------------------- real encoder


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.shared
@needs_flickr
@needs_mobilenet
def test_mobilenet_conv_pool_on_flickr(tmp_path):
    photos = sorted(FLICKR_IMAGES.glob("*.jpg"))[:16]
    near = tmp_path / "near"
    near.mkdir()
    for p in photos[:4]:
        rgb = np.asarray(Image.open(p).convert("RGB"))
        Image.fromarray(rgb).save(near / f"{p.stem}_q95.jpg", quality=95)
        shifted = np.concatenate([rgb[:, :1], rgb[:, :-1]], axis=1)  # one pixel to the right
        Image.fromarray(shifted).save(near / f"{p.stem}_shift.png")
    extra = sorted(near.iterdir())
    paths = photos + extra
    names = [p.name for p in paths]
    common = {
        "encoder": "mobilenet_v2_0.5",
        "weights": "imagenet",
        "batch_size": 8,
        "progress": False,
    }
    conv = extract_with_spec(paths, tmp_path / "conv.h5", layer="conv", **common)
    pool = extract_with_spec(paths, tmp_path / "pool.h5", layer="pool", **common)
    assert conv.done == pool.done == 24 and not conv.failed
    expect = {"encoder": "mobilenet_v2_0.5", "preprocessing": "tf", "input_size": (224, 224),
              "weights": "imagenet:mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"}  # fmt: skip
    with (
        open_features(tmp_path / "conv.h5", {**expect, "layer": "conv"}) as c,
        open_features(tmp_path / "pool.h5", {**expect, "layer": "pool"}) as p,
    ):
        assert c.feature_shape == (7, 7, 1280) and p.feature_shape == (1280,)
        conv_f, pool_f = c.read(names), p.read(names)
    np.testing.assert_allclose(pool_f, conv_f.mean(axis=(1, 2)), atol=1e-4)
    assert pool_f.min() >= 0 and pool_f.std() > 0.01  # ReLU6 outputs, not constant
    feats = dict(zip(names, pool_f, strict=True))
    near_sims = [cosine(feats[p.name], feats[f"{p.stem}_{kind}"])
                 for p in photos[:4] for kind in ("q95.jpg", "shift.png")]  # fmt: skip
    other_sims = [
        cosine(feats[a.name], feats[b.name]) for a, b in zip(photos[:8], photos[8:16], strict=True)
    ]
    assert min(near_sims) > 0.95  # measured: 0.971 .. 0.998
    assert max(other_sims) < 0.8 and max(other_sims) < min(near_sims)  # measured: <= 0.46
