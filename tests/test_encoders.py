"""Stage 1: VGG built from layers is exact, weights load by name, errors are clear."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from conftest import FLICKR_IMAGES, needs_flickr, needs_mobilenet

from captioner.encoders import specs as E
from captioner.encoders import weight_files as W
from captioner.encoders.preprocessing import Preprocess, preprocess_array
from captioner.errors import WeightsError


def _randomize(model, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([rng.normal(0, 0.05, w.shape).astype("float32") for w in layer.weights])


def _copy_by_name(src, dst) -> None:
    for layer in src.layers:
        if layer.weights:
            dst.get_layer(layer.name).set_weights(layer.get_weights())


def _write_official_h5(model, path: Path) -> None:
    """Write weights the way the official Keras files are laid out (written here, by hand)."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode("utf8") for layer in model.layers]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.1.5"
        for layer in model.layers:
            g = f.create_group(layer.name)
            names = []
            for w, suffix in zip(layer.get_weights(), ("W_1:0", "b_1:0"), strict=False):
                name = f"{layer.name}_{suffix}"
                g.create_dataset(name, data=w)
                names.append(name.encode("utf8"))
            g.attrs["weight_names"] = names


@pytest.mark.slow
@pytest.mark.parametrize(("builder", "count"), [(E.vgg16, 138_357_544), (E.vgg19, 143_667_240)])
def test_parameter_counts(builder, count):
    assert builder().count_params() == count


def test_notop_parameter_count_and_layer_names():
    ours = E.vgg16(include_top=False)
    ref = keras.applications.VGG16(include_top=False, weights=None)
    assert ours.count_params() == ref.count_params() == 14_714_688
    assert [lyr.name for lyr in ours.layers[1:]] == [lyr.name for lyr in ref.layers[1:]]


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_identical_outputs_to_keras_applications_small_input(arch):
    ours = getattr(E, arch)(include_top=False, input_shape=(32, 32, 3))
    app = keras.applications.VGG16 if arch == "vgg16" else keras.applications.VGG19
    ref = app(include_top=False, weights=None, input_shape=(32, 32, 3))
    _randomize(ours)
    _copy_by_name(ours, ref)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(ours.predict(x, verbose=0), ref.predict(x, verbose=0))


@pytest.mark.slow
def test_identical_outputs_full_vgg16_with_top():
    ours = E.vgg16()
    ref = keras.applications.VGG16(weights=None)
    assert [lyr.name for lyr in ours.layers[1:]] == [lyr.name for lyr in ref.layers[1:]]
    _copy_by_name(ours, ref)  # ours keeps its (random) initial weights
    x = np.random.default_rng(2).uniform(-100, 100, (1, 224, 224, 3)).astype("float32")
    a, b = ours.predict(x, verbose=0), ref.predict(x, verbose=0)
    assert a.shape == (1, 1000)
    np.testing.assert_array_equal(a, b)


def test_loads_official_legacy_h5_by_name(tmp_path):
    src = E.vgg16(include_top=False, input_shape=(32, 32, 3))
    _randomize(src, seed=3)
    path = tmp_path / "vgg16_notop_like.h5"
    _write_official_h5(src, path)
    ours = E.vgg16(include_top=False, weights=path, input_shape=(32, 32, 3))
    for a, b in zip(ours.get_weights(), src.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # keras.applications itself reads the same file, so the layout is the official one
    ref = keras.applications.VGG16(include_top=False, weights=str(path), input_shape=(32, 32, 3))
    x = np.random.default_rng(4).uniform(0, 1, (1, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(ours.predict(x, verbose=0), ref.predict(x, verbose=0))


def test_save_weights_by_name_round_trip(tmp_path):
    src = E.vgg19(include_top=False, input_shape=(32, 32, 3))
    _randomize(src, seed=5)
    W.save_weights_by_name(src, tmp_path / "w.h5")
    dst = E.vgg19(include_top=False, weights=tmp_path / "w.h5", input_shape=(32, 32, 3))
    for a, b in zip(dst.get_weights(), src.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_shape_mismatch_names_the_layer(tmp_path):
    vgg19 = E.vgg19(include_top=False, input_shape=(32, 32, 3))
    W.save_weights_by_name(vgg19, tmp_path / "vgg19.h5")
    # VGG19's block3 has four convolutions, but the shapes agree; damage block1_conv1 instead
    with h5py.File(tmp_path / "vgg19.h5", "a") as f:
        g = f["block1_conv1"]
        name = g.attrs["weight_names"][0]
        name = name.decode() if isinstance(name, bytes) else str(name)
        del g[name]
        g.create_dataset(name, data=np.zeros((5, 5, 3, 64), "float32"))
    with pytest.raises(WeightsError, match=r"block1_conv1.*\(5, 5, 3, 64\)"):
        E.vgg19(include_top=False, weights=tmp_path / "vgg19.h5", input_shape=(32, 32, 3))


def test_missing_layer_and_non_keras_file(tmp_path):
    small = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="other")])
    W.save_weights_by_name(small, tmp_path / "other.h5")
    with pytest.raises(WeightsError, match="no weights for layer 'block1_conv1'"):
        E.vgg16(include_top=False, weights=tmp_path / "other.h5", input_shape=(32, 32, 3))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(WeightsError, match="junk.h5"):
        E.vgg16(include_top=False, weights=tmp_path / "junk.h5", input_shape=(32, 32, 3))
    with pytest.raises(WeightsError, match="does not exist"):
        E.vgg16(include_top=False, weights=tmp_path / "nope.h5", input_shape=(32, 32, 3))


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    """An empty Keras cache and an empty project weights/ folder."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(W, "PROJECT_WEIGHTS_DIR", tmp_path / "project_weights")
    return tmp_path / "keras_home" / "models"


def test_wrong_hash_in_cache_is_a_clear_error(isolated_cache):
    isolated_cache.mkdir(parents=True)
    spec = W.VGG_WEIGHTS[("vgg16", False)]
    (isolated_cache / spec.fname).write_bytes(b"truncated download")
    with pytest.raises(WeightsError) as err:
        E.vgg16(include_top=False, weights="imagenet")
    msg = str(err.value)
    assert spec.fname in msg and spec.md5 in msg and hashlib.md5(b"truncated download").hexdigest() in msg


def test_offline_error_names_file_md5_and_folder(isolated_cache, monkeypatch):
    spec = W.VGG_WEIGHTS[("vgg16", True)]
    offline = W.WeightsFile(spec.fname, "http://127.0.0.1:9/" + spec.fname, spec.md5)
    monkeypatch.setitem(W.VGG_WEIGHTS, ("vgg16", True), offline)
    with pytest.raises(WeightsError) as err:
        W.resolve_vgg_weights("vgg16", True, "imagenet")
    msg = str(err.value)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels.h5" in msg
    assert "64373286793e3c8b2b4e3219cbf3544b" in msg
    assert str(isolated_cache) in msg


@pytest.fixture()
def local_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_from_local_server_is_hash_checked_and_cached(isolated_cache, local_server):
    root, url = local_server
    payload = b"weights" * 1000
    (root / "w.h5").write_bytes(payload)
    good = W.WeightsFile("w.h5", url + "w.h5", hashlib.md5(payload).hexdigest())
    path = W.fetch_weights(good)
    assert path == isolated_cache / "w.h5" and path.read_bytes() == payload
    (root / "w.h5").unlink()  # a second call must come from the cache
    assert W.fetch_weights(good) == path
    bad = W.WeightsFile("v.h5", url + "v.h5", "0" * 32)
    (root / "v.h5").write_bytes(payload)
    with pytest.raises(WeightsError, match="v.h5"):
        W.fetch_weights(bad)


def test_json_round_trip(tmp_path):
    model = E.vgg16(include_top=False, input_shape=(32, 32, 3))
    _randomize(model, seed=6)
    W.export_json(model, tmp_path / "arch.json")
    W.save_weights_by_name(model, tmp_path / "w.h5")
    rebuilt = W.model_from_json_file(tmp_path / "arch.json", tmp_path / "w.h5")
    x = np.random.default_rng(7).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(model.predict(x, verbose=0), rebuilt.predict(x, verbose=0))


def test_feature_model_json_round_trip_keeps_preprocessing(tmp_path):
    model = E.get_spec("mobilenet_v2_0.35").feature_model("pool", weights=None)
    W.export_json(model, tmp_path / "m.json")
    model.save_weights(tmp_path / "m.weights.h5")
    rebuilt = W.model_from_json_file(tmp_path / "m.json")
    rebuilt.load_weights(tmp_path / "m.weights.h5")
    assert isinstance(rebuilt.get_layer("preprocess"), Preprocess)
    x = np.random.default_rng(8).integers(0, 256, (1, 224, 224, 3)).astype("uint8")
    np.testing.assert_allclose(model.predict(x, verbose=0), rebuilt.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize("mode,fn", [
    ("caffe", keras.applications.vgg16.preprocess_input),
    ("tf", keras.applications.mobilenet_v2.preprocess_input),
])
def test_preprocessing_matches_keras(mode, fn):
    x = np.random.default_rng(9).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = fn(x.copy())
    np.testing.assert_allclose(preprocess_array(x, mode), expected, atol=1e-4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(Preprocess(mode)(x)), expected, atol=1e-4)


def test_spec_names_and_defaults():
    assert list(E.SPECS) == [
        "vgg16", "vgg19", "resnet50", "mobilenet_v2_0.35", "mobilenet_v2_0.5",
        "mobilenet_v2_0.75", "mobilenet_v2", "mobilenet_v2_1.3", "mobilenet_v2_1.4",
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
    ]
    assert E.DEFAULT_ENCODER == "vgg16"
    vgg = E.get_spec("vgg16")
    assert {k: v.shape for k, v in vgg.layers.items()} == {
        "fc2": (4096,), "conv": (14, 14, 512), "pool": (512,)}
    assert vgg.layers["fc2"].needs_top and not vgg.layers["conv"].needs_top
    with pytest.raises(WeightsError, match="choose one of"):
        E.get_spec("alexnet")
    with pytest.raises(WeightsError, match="fc2"):
        E.get_spec("mobilenet_v2_0.5").layer("fc2")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "resnet50", "mobilenet_v2_0.5", "mobilenet_v2_1.4"])
def test_spec_feature_shapes_match_built_models(name):
    spec = E.get_spec(name)
    for layer, feat in spec.layers.items():
        model = spec.feature_model(layer, weights=None)
        assert tuple(model.output_shape[1:]) == feat.shape, (name, layer)


def test_weights_identity(tmp_path):
    spec = E.get_spec("mobilenet_v2_0.5")
    assert spec.weights_identity("imagenet") == (
        "imagenet:mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5")
    assert E.get_spec("vgg16").weights_identity("imagenet", "fc2") == (
        "imagenet:vgg16_weights_tf_dim_ordering_tf_kernels.h5")
    assert E.get_spec("vgg16").weights_identity("imagenet", "conv").endswith("_notop.h5")
    (tmp_path / "x.h5").write_bytes(b"abc")
    assert spec.weights_identity(tmp_path / "x.h5") == (
        f"file:x.h5:md5:{hashlib.md5(b'abc').hexdigest()}")


def test_mobilenet_offline_error_is_clear():
    # Keras fixes its cache folder at import; only the alpha=0.5 file is ever seeded there
    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    with pytest.raises(WeightsError, match=name.replace(".", r"\.")) as err:
        E.get_spec("mobilenet_v2_0.35").feature_model("pool", weights="imagenet")
    assert "KERAS_HOME" in str(err.value)


@pytest.mark.shared
@needs_mobilenet
@needs_flickr
def test_mobilenet_v2_05_real_weights_match_keras_applications():
    from PIL import Image

    path = sorted(FLICKR_IMAGES.glob("*.jpg"))[0]
    x = np.asarray(Image.open(path).convert("RGB"), dtype="uint8")[None]
    ours = E.get_spec("mobilenet_v2_0.5").feature_model("pool").predict(x, verbose=0)
    ref = keras.applications.MobileNetV2(alpha=0.5, include_top=False, weights="imagenet",
                                         pooling="avg", input_shape=(224, 224, 3))
    expected = ref.predict(keras.applications.mobilenet_v2.preprocess_input(x.astype("float32")),
                           verbose=0)
    assert ours.shape == (1, 1280)
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    assert float(ours.std()) > 0.1  # genuine weights give a non-degenerate feature
