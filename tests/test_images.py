"""captioner.encoders.images: decoding every kind of image, and refusing bad files with a reason."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from captioner.encoders.images import list_images, load_image, to_rgb
from captioner.errors import CaptionerError, ImageError


def reason_of(path: Path, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        load_image(path, **kwargs)
    assert str(path) in str(info.value)
    return info.value.reason


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no real pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def noise_jpeg(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path, quality=95)
    return path


# --------------------------------------------------------------------------- good images


def test_rgb_png_exact_and_resize_to_height_width(tmp_path: Path):
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    Image.fromarray(a).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out, a)
    assert load_image(tmp_path / "a.png", (5, 7)).shape == (
        5,
        7,
        3,
    )  # (height, width), aspect not kept


def test_nearest_resample_exact_blocks(tmp_path: Path):
    a = np.array([[1, 2], [3, 4]], np.uint8) * 50
    Image.fromarray(np.stack([a] * 3, -1)).save(tmp_path / "n.png")
    out = load_image(tmp_path / "n.png", (4, 4), resample="nearest")[..., 0]
    expected = [[50, 50, 100, 100], [50, 50, 100, 100], [150, 150, 200, 200], [150, 150, 200, 200]]
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="resample"):
        load_image(tmp_path / "n.png", (4, 4), resample="cubic-ish")


def test_grayscale_and_one_bit_replicated(tmp_path: Path):
    Image.fromarray(np.array([[0, 77, 255]], np.uint8)).save(tmp_path / "g.png")
    np.testing.assert_array_equal(load_image(tmp_path / "g.png")[0], [[0] * 3, [77] * 3, [255] * 3])
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    np.testing.assert_array_equal(load_image(tmp_path / "b.png")[0], [[0] * 3, [255] * 3])


def test_palette_with_and_without_transparency(tmp_path: Path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    pal.putdata([0, 1, 2])
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(
        load_image(tmp_path / "p.png")[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    )
    pal.info["transparency"] = 1  # green becomes transparent -> white
    for suffix in ("png", "gif"):
        pal.save(tmp_path / f"pt.{suffix}")
        assert Image.open(tmp_path / f"pt.{suffix}").mode == "P"
        out = load_image(tmp_path / f"pt.{suffix}")[0]
        np.testing.assert_array_equal(out, [[255, 0, 0], [255, 255, 255], [0, 0, 255]])


def test_alpha_composited_onto_white(tmp_path: Path):
    a = np.zeros((1, 3, 4), np.uint8)
    a[0, 0] = (0, 0, 0, 128)  # half-transparent black over white: 255 * 127 / 255
    a[0, 1] = (10, 20, 30, 255)  # opaque: unchanged
    a[0, 2] = (200, 100, 50, 0)  # fully transparent: white, whatever the hidden colour
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(
        load_image(tmp_path / "rgba.png")[0], [[127] * 3, [10, 20, 30], [255] * 3]
    )
    la = np.array([[[100, 255], [100, 0]]], np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(tmp_path / "la.png")[0], [[100] * 3, [255] * 3])


def test_cmyk_tiff_exact_and_cmyk_jpeg(tmp_path: Path):
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # full cyan
    cmyk.save(tmp_path / "c.tif")
    np.testing.assert_array_equal(
        load_image(tmp_path / "c.tif")[0], [[255, 255, 255], [0, 255, 255]]
    )
    Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(tmp_path / "m.jpg", quality=95)  # magenta
    assert Image.open(tmp_path / "m.jpg").mode == "CMYK"
    out = load_image(tmp_path / "m.jpg")
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), [255, 0, 255], atol=3)


def test_sixteen_bit_scaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    out = load_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert (out[..., 0] == out[..., 2]).all()
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "i32.tif")  # mode "I"
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    np.testing.assert_array_equal(load_image(tmp_path / "i32.tif")[0, :, 1], [0, 1, 128, 255])
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "f.tif")  # mode "F"
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif")[0, :, 0], [0, 128, 255])


def test_exif_orientation_6_is_turned_upright(tmp_path: Path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    stored.save(tmp_path / "r6.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r6.jpg")
    assert out.shape == (40, 20, 3)  # 40 wide x 20 high stored -> 20 wide x 40 high shown
    assert out[2, 17, 0] > 240 and out[2, 17, 2] < 15  # marker now at the top-right
    assert out[2, 2, 2] > 240 and out[37, 2, 2] > 240


def test_large_jpeg_uses_draft_and_respects_orientation(tmp_path: Path, monkeypatch):
    stored = Image.new("RGB", (1600, 800), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "big.jpg", exif=exif, quality=95)
    seen: list[tuple] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        seen.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = load_image(tmp_path / "big.jpg", (100, 50))
    # asked in stored orientation (w=100, h=50); decoded at 1/8 scale, still >= the target
    assert seen == [((100, 50), (200, 100))]
    assert out.shape == (100, 50, 3)
    assert out[3, 47, 0] > 240 and out[3, 3, 2] > 240 and out[97, 3, 2] > 240


def test_draft_close_to_full_decode(tmp_path: Path):
    y, x = np.mgrid[0:800, 0:1200]
    smooth = np.stack([x * 255 // 1199, y * 255 // 799, (x + y) * 255 // 1998], -1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "s.jpg", quality=95)
    fast = load_image(tmp_path / "s.jpg", (100, 150)).astype(float)
    full = np.asarray(
        Image.open(tmp_path / "s.jpg").resize((150, 100), Image.Resampling.BILINEAR), float
    )
    assert np.abs(fast - full).mean() < 2.0


def test_unsupported_mode_reason():
    with pytest.raises(ImageError) as info:
        to_rgb(Image.new("La", (2, 2)), "x.png")
    assert info.value.reason == "unsupported mode (La)"


# --------------------------------------------------------------------------- bad files


def test_bad_files_have_precise_reasons(tmp_path: Path, noise_jpeg: Path):
    data = noise_jpeg.read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "head.jpg").write_bytes(data[:300])  # cut inside the header
    (tmp_path / "text.jpg").write_text("this is not a picture\n")
    (tmp_path / "folder.jpg").mkdir()
    assert reason_of(tmp_path / "empty.jpg") == "empty file"
    assert reason_of(tmp_path / "half.jpg") == "truncated image"
    assert reason_of(tmp_path / "head.jpg") == "truncated image"
    assert reason_of(tmp_path / "text.jpg") == "not an image (cannot identify)"
    assert reason_of(tmp_path / "missing.jpg") == "missing file"
    assert reason_of(tmp_path / "folder.jpg") == "not a regular file"
    assert reason_of(noise_jpeg, max_pixels=60 * 40 - 1) == "too large (60×40 pixels)"
    assert load_image(noise_jpeg, max_pixels=60 * 40).shape == (40, 60, 3)
    assert issubclass(ImageError, CaptionerError)


def test_decompression_bomb_warning_and_error_are_refused(tmp_path: Path):
    (tmp_path / "warn.png").write_bytes(png_header(10_000, 10_000))  # > PIL's 89M: a warning
    (tmp_path / "error.png").write_bytes(png_header(20_000, 20_000))  # > 2x: PIL's error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak as a warning either
        assert reason_of(tmp_path / "warn.png", max_pixels=10**12) == "too large (100000000 pixels)"
        assert (
            reason_of(tmp_path / "error.png", max_pixels=10**12) == "too large (400000000 pixels)"
        )
        assert reason_of(tmp_path / "warn.png") == "too large (100000000 pixels)"


# --------------------------------------------------------------------------- sources


def make_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.PNG", "sub/c.jpg"):
        Image.new("RGB", (4, 4)).save(root / name, format="PNG")
    (root / "notes.txt").write_text("x")


def test_list_images_folder_glob_single(tmp_path: Path):
    make_tree(tmp_path / "imgs")
    paths, names = list_images(tmp_path / "imgs")
    assert names == ["a.PNG", "b.jpg"] and paths == [tmp_path / "imgs" / n for n in names]
    paths, names = list_images(f"{tmp_path}/imgs/**/*.jpg")
    assert names == ["b.jpg", "sub/c.jpg"]
    assert paths == [tmp_path / "imgs" / "b.jpg", tmp_path / "imgs" / "sub" / "c.jpg"]
    assert list_images(tmp_path / "imgs" / "b.jpg") == ([tmp_path / "imgs" / "b.jpg"], ["b.jpg"])


def test_list_images_list_file(tmp_path: Path):
    make_tree(tmp_path / "imgs")
    (tmp_path / "split.txt").write_text("# train\nb.jpg\n\n  sub/c.jpg  \nmissing.jpg\n")
    paths, names = list_images(tmp_path / "split.txt", tmp_path / "imgs")
    assert names == ["b.jpg", "sub/c.jpg", "missing.jpg"]
    assert paths == [tmp_path / "imgs" / n for n in names]
    paths, _ = list_images(tmp_path / "split.txt")  # default: the list file's folder
    assert paths[0] == tmp_path / "b.jpg"


def test_list_images_errors(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionerError, match="no images in "):
        list_images(tmp_path / "empty")
    with pytest.raises(CaptionerError, match="does not exist"):
        list_images(tmp_path / "nowhere")
    with pytest.raises(CaptionerError, match="no file matches "):
        list_images(f"{tmp_path}/*.jpg")
    (tmp_path / "blank.txt").write_text("\n# only a comment\n")
    with pytest.raises(CaptionerError, match="names no images"):
        list_images(tmp_path / "blank.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(CaptionerError, match="UTF-8"):
        list_images(tmp_path / "binary.txt")
