"""``captioner export`` and the ONNX runtime: a toy two-member run exported and captioned alike
by both runtimes, the runtime choice, integrity of the export, and no TensorFlow on that path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image
from runfolder import make_run

from captioner.cli import main
from captioner.inference.captioner import Captioner
from captioner.inference.loader import load_captioner
from captioner.storage.files import sha256sum

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

FEATURES = (2, 2, 8)
BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "jax", "torch"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from captioner.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _tiny_encoder():
    """32x32 RGB in [0, 255] -> (2, 2, 8) features, random but fixed."""
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=4, activation="relu")(x)
    x = keras.layers.AveragePooling2D(3)(x)
    return keras.Model(inputs, x)


def _two_members(run):
    """Make ``run`` an ensemble: a second member with other weights, listed in config.json."""
    other = make_run(run.parent / "other", "attention", FEATURES, seed=7)
    shutil.copy(other / "best.weights.h5", run / "member1.weights.h5")
    config = json.loads((run / "config.json").read_text())
    config["members"] = ["member1.weights.h5"]
    path = run / "member1.weights.h5"
    config["files"]["member1.weights.h5"] = {"size": path.stat().st_size, "sha256": sha256sum(path)}
    (run / "config.json").write_text(json.dumps(config))
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    run = _two_members(make_run(tmp / "run", "attention", FEATURES, seed=3))
    encoder = _tiny_encoder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Captioner, "encoder", lambda self: encoder)
        assert main(["export", str(run)]) == 0
    rng = np.random.default_rng(0)
    photos = []
    for k in range(5):
        photos.append(tmp / f"p{k}.png")
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(photos[-1])
    return run, encoder, photos


@pytest.fixture()
def keras_runtime(exported, monkeypatch):
    run, encoder, _ = exported
    monkeypatch.setattr(Captioner, "encoder", lambda self: encoder)
    return load_captioner(run, runtime="keras")


def test_export_folder_lists_every_file_with_its_sha256(exported):
    run = exported[0]
    manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "encoder.onnx",
        "init.onnx",
        "step.onnx",
        "tokenizer.json",
        "decoding.json",
    }
    for name, ref in manifest["files"].items():
        assert sha256sum(run / "onnx" / name) == ref["sha256"]
    assert manifest["decoder"]["members"] == 2
    assert manifest["versions"]["opset"]["ai.onnx"] >= 13
    assert set(manifest["source"]["files"]) == {
        "tokenizer.json",
        "best.weights.h5",
        "member1.weights.h5",
    }


@pytest.mark.parametrize(
    "decoding",
    [
        {"beam_size": 1, "n_best": 1},
        {"beam_size": 3, "n_best": 3, "alpha": 0.7, "block_ngram": 2},
        {"beam_size": 4, "n_best": 2, "alpha": 0.0, "block_ngram": 0, "max_length": 5},
    ],
)
def test_both_runtimes_give_the_same_captions_and_attention(exported, keras_runtime, decoding):
    run, _, photos = exported
    onnx = load_captioner(run)  # an export is there: ONNX by default
    assert (
        type(onnx).__name__ == "OnnxCaptioner" and type(keras_runtime).__name__ != "OnnxCaptioner"
    )
    a = onnx.caption(photos, attention=True, **decoding)
    b = keras_runtime.caption(photos, attention=True, **decoding)
    for x, y in zip(a, b, strict=True):
        assert [c.text for c in x.captions] == [c.text for c in y.captions]
        assert [c.tokens for c in x.captions] == [c.tokens for c in y.captions]
        np.testing.assert_allclose(
            [c.score for c in x.captions], [c.score for c in y.captions], atol=1e-4
        )
        assert x.words == y.words
        np.testing.assert_allclose(x.attention, y.attention, atol=1e-5)
        np.testing.assert_allclose(x.attention.sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_every_batch_size_and_an_older_export_give_the_same_captions(exported, keras_runtime):
    """The step graph takes features and keys once per image; an export made before it did
    (no ``per_image_inputs``) gets them gathered per row: the same captions either way."""
    run, _, photos = exported
    onnx = load_captioner(run)
    manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    assert manifest["decoder"]["per_image_inputs"] == ["features", "m0_keys", "m1_keys"]
    decoding = {"beam_size": 3, "n_best": 2, "alpha": 0.7}
    ref = onnx.caption(photos, batch_size=5, **decoding)
    runs = [onnx.caption(photos, batch_size=b, **decoding) for b in (1, 2)]
    runs.append(keras_runtime.caption(photos, batch_size=2, **decoding))
    onnx._blocks = False  # as an older export's manifest says
    runs.append(onnx.caption(photos, batch_size=5, **decoding))
    for found in runs:
        assert [[c.tokens for c in r.captions] for r in found] == [
            [c.tokens for c in r.captions] for r in ref
        ]
        np.testing.assert_allclose(
            [[c.score for c in r.captions] for r in found],
            [[c.score for c in r.captions] for r in ref],
            atol=1e-4,
        )


def test_features_input_and_stored_decoding_on_onnx(exported, keras_runtime):
    run = exported[0]
    onnx = load_captioner(run, runtime="onnx")
    assert onnx.decoding == keras_runtime.decoding
    feats = np.random.default_rng(2).normal(size=(3, *FEATURES)).astype("float32")
    assert [r.text for r in onnx.caption(feats)] == [r.text for r in keras_runtime.caption(feats)]


def test_service_engine_on_onnx_runs_batches_unpadded_and_two_at_once(exported, keras_runtime,
                                                                       monkeypatch):
    """The service's engine on ONNX Runtime: no padding to a power of two (nothing is compiled
    per batch size), CAPTIONER_SERVE_WORKERS model threads, and two batches run at the same
    time give the captions the Keras runtime gives."""
    from concurrent.futures import ThreadPoolExecutor

    from captioner.serve.engine import Engine, Item, Options

    run, _, photos = exported
    monkeypatch.setenv("CAPTIONER_SERVE_WORKERS", "2")
    engine = Engine(load_captioner(run, runtime="onnx"), run)
    assert engine.onnx and engine.workers == 2
    assert Engine(keras_runtime, run).workers == 1
    seen, encode = [], engine.captioner.encode_images
    monkeypatch.setattr(engine.captioner, "encode_images",
                        lambda images: seen.append(len(images)) or encode(images))
    pixels = [np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p in photos]
    expected = [r.text for r in keras_runtime.caption(pixels)]
    batches = [[Item(p, Options()) for p in pixels[:3]], [Item(p, Options()) for p in pixels[3:]]]
    with ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(engine.run, batches * 3))
    texts = [o.captions[0].text for out in outputs for o in out]
    assert texts == expected * 3
    assert sorted(seen) == [2, 2, 2, 3, 3, 3]


def test_onnx_session_threads_sleep_instead_of_spinning(exported):
    onnx = load_captioner(exported[0], runtime="onnx")
    for session in (onnx._encoder_session, onnx._init_session, onnx._step_session):
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_runtime_choice(exported, tmp_path, capsys):
    run = exported[0]
    bare = make_run(tmp_path / "bare", "attention", FEATURES)
    assert type(load_captioner(bare)).__name__ == "Captioner"  # no export: Keras as before
    assert type(load_captioner(run / "onnx")).__name__ == "OnnxCaptioner"  # the folder itself
    assert main(["caption", str(exported[2][0]), "--model", str(bare), "--runtime", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no ONNX export" in err[0] and "captioner export" in err[0]


def _copy(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


@pytest.mark.parametrize("name", ["step.onnx", "encoder.onnx", "tokenizer.json"])
def test_damaged_export_file_is_one_line_naming_it(exported, tmp_path, capsys, name):
    run = _copy(exported[0], tmp_path)
    path = run / "onnx" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["caption", str(exported[2][0]), "--model", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "sha256" in err[0]


def test_missing_and_mismatched_exports_are_refused(exported, tmp_path, capsys):
    run = _copy(exported[0], tmp_path)
    (run / "onnx" / "init.onnx").unlink()
    assert main(["caption", str(exported[2][0]), "--model", str(run)]) == 2
    assert "init.onnx is missing" in capsys.readouterr().err
    other = make_run(tmp_path / "other", "attention", FEATURES, seed=11)
    shutil.copytree(exported[0] / "onnx", other / "onnx")  # an export of another model
    assert main(["caption", str(exported[2][0]), "--model", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exported from another" in err[0] and "captioner export" in err[0]
    (run / "onnx" / "manifest.json").write_text("{not json")
    assert main(["caption", str(exported[2][0]), "--model", str(run)]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_an_export_older_than_a_file_the_run_gained_is_refused(exported, tmp_path, capsys,
                                                               monkeypatch):
    """A neighbour index given to the run after its export: the ONNX folder lacks it, so the
    two runtimes would caption differently; the export must be made again."""
    from helpers import write_cache

    from captioner.features.cache import open_features
    from captioner.train.neighbour_index import attach

    run = _copy(exported[0], tmp_path)
    cache = write_cache(tmp_path / "train.h5", {"a.jpg": np.ones(FEATURES[-1], "float32")})
    with open_features(cache) as reader:
        attach(run, reader, {"a.jpg": ["a dog"]})
    assert main(["caption", str(exported[2][0]), "--model", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gained neighbours.npz" in err[0] and "captioner export" in err[0]
    monkeypatch.setattr(Captioner, "encoder", lambda self: exported[1])
    assert main(["caption", str(exported[2][0]), "--model", str(run), "--runtime", "keras"]) == 0


def test_export_refuses_a_folder_that_is_not_empty(exported, capsys):
    assert main(["export", str(exported[0])]) == 2  # onnx/ is there already
    assert "not an empty folder" in capsys.readouterr().err


def _blocked_caption(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, "caption", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.subprocess
def test_onnx_path_never_imports_tensorflow_keras_jax_or_torch(exported, keras_runtime, tmp_path):
    run, _, photos = exported
    done = _blocked_caption(
        [str(p) for p in photos[:2]] + ["--model", str(run), "--json"], tmp_path
    )
    assert done.returncode == 0, done.stderr
    texts = [json.loads(line)["caption"] for line in done.stdout.splitlines()]
    assert texts == [r.text for r in keras_runtime.caption(photos[:2])]
    assert "blocked" not in done.stderr
    refused = _blocked_caption(
        [str(photos[0]), "--model", str(run), "--runtime", "keras"], tmp_path
    )
    assert refused.returncode != 0 and "blocked: keras" in refused.stderr  # the blocker works


def test_bundled_model_export_captions_the_example_like_keras(capsys):
    """weights/default ships its export: identical captions on both runtimes."""
    example = str(ROOT / "data" / "example.jpg")
    assert (ROOT / "weights" / "default" / "onnx" / "manifest.json").is_file()
    assert main(["caption", example, "--json", "--n-best", "3"]) == 0
    onnx = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["caption", example, "--json", "--n-best", "3", "--runtime", "keras"]) == 0
    keras = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [c["caption"] for c in onnx[0]["captions"]] == [
        c["caption"] for c in keras[0]["captions"]
    ]
    np.testing.assert_allclose(
        [c["score"] for c in onnx[0]["captions"]],
        [c["score"] for c in keras[0]["captions"]],
        atol=1e-4,
    )
