"""Stage 2: decode any image file into an RGB ``uint8`` array, or say exactly why not.

:func:`load_image` never lets a bad file crash a run: every failure is an :class:`ImageError`
whose ``reason`` is a short phrase ("empty file", "truncated image", ...) that the feature
cache records next to the image name.

Conversions (rather than rejections):

* grayscale ``L`` and 1-bit ``1`` images are replicated to three channels;
* 16-bit (``I;16*``) and 32-bit integer (``I``) grayscale is scaled from its real range
  (0..65535) to 0..255 with rounding; PIL's own ``convert("RGB")`` would clip it instead;
* transparent images (``RGBA``, ``LA``, ``PA``, palette with a transparent colour) are
  composited onto a **white** background. Dropping the alpha channel would expose whatever
  colour the encoder left under transparent pixels (often black or noise); white is what a
  viewer shows on a page, and what captioners were shown;
* ``CMYK`` (including Adobe CMYK JPEGs), ``YCbCr``, ``HSV``, ``LAB`` etc. go through PIL's
  conversion;
* JPEGs with an EXIF orientation tag are turned upright (``ImageOps.exif_transpose``).

Resizing goes exactly to ``size`` (the aspect ratio is not kept, as ``keras.utils.load_img``
with ``target_size`` does). Large JPEGs are decoded at a reduced DCT scale (``Image.draft``)
when that scale still leaves at least ``size`` pixels: much faster, and visually equivalent.

Only PIL and numpy are used here (no Keras).
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner.errors import CaptionerError, ImageError

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb limit

RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
ROTATING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width/height
EXIF_ORIENTATION = 0x0112

# warnings.catch_warnings() edits process-wide state; decoder threads take turns.
_OPEN_LOCK = threading.Lock()


def image_error(path: str | os.PathLike, reason: str) -> ImageError:
    """An :class:`ImageError` for ``path`` carrying ``.path`` and the short ``.reason``."""
    exc = ImageError(f"{path}: {reason}")
    exc.path = str(path)
    exc.reason = reason
    return exc


def load_image(
    path: str | os.PathLike,
    size: tuple[int, int] | None = None,
    resample: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    mirror: bool = False,
) -> np.ndarray:
    """Decode ``path`` into an RGB ``uint8`` array of shape (H, W, 3).

    ``size`` is ``(height, width)`` (the order of Keras ``target_size``); None keeps the
    image's own size. ``resample`` is one of :data:`RESAMPLE`. Images with more than
    ``max_pixels`` pixels are refused before decoding. ``mirror`` flips the result left-right
    (for mirrored training features). Raises :class:`ImageError` with a
    short ``reason`` for a missing, empty, truncated, oversized or unreadable file.
    """
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {', '.join(RESAMPLE)}, not {resample!r}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (height, width) with both >= 1, not {size!r}")
    _check_file(path)
    with _open(path, max_pixels) as im:
        orientation = _orientation(im)
        if size is not None and im.format == "JPEG":
            h, w = size
            im.draft(None, (h, w) if orientation in ROTATING_ORIENTATIONS else (w, h))
        _decode(im, path)
        rgb = to_rgb(_upright(im) if orientation not in (None, 1) else im, path)
        if size is not None and rgb.size != (size[1], size[0]):
            rgb = rgb.resize((size[1], size[0]), resample=RESAMPLE[resample])
        if mirror:
            rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(rgb, dtype=np.uint8)  # a copy, before the file is closed


def upright_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image as it is shown (EXIF rotation applied), from its header."""
    with _open(path, DEFAULT_MAX_PIXELS) as im:
        w, h = im.size
        return (h, w) if _orientation(im) in ROTATING_ORIENTATIONS else (w, h)


TINY_SIDE = 32  # pixels; smaller images are captioned with a warning


def tiny_warning(width: int, height: int) -> str | None:
    """A warning for an image too small to show anything, else None."""
    if min(width, height) >= TINY_SIDE:
        return None
    return (f"only {width}x{height} pixels; the encoder sees it blown up to its input size, so "
            "the caption is a guess")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file's header (EXIF rotation not applied)."""
    _check_file(path)
    with _open(path, DEFAULT_MAX_PIXELS) as im:
        return im.size


def pixels_of(
    item, size: tuple[int, int], resample: str = "bilinear"
) -> tuple[np.ndarray | None, str | None, str | None]:
    """(pixels (H, W, 3) uint8 at ``size`` = (height, width), warning, error) for an image
    file, a PIL image or an array (H, W), (H, W, 3) or (H, W, 4) with values in [0, 255]."""
    try:
        if isinstance(item, (str, os.PathLike)):
            width, height = image_size(item)
            return load_image(item, size, resample), tiny_warning(width, height), None
        if isinstance(item, Image.Image):
            im = to_rgb(item)
        else:
            im = _array_image(np.asarray(item))
    except ImageError as exc:
        return None, None, getattr(exc, "reason", None) or str(exc)
    rgb = im.resize((size[1], size[0]), resample=RESAMPLE[resample])
    return np.array(rgb, dtype=np.uint8), tiny_warning(*im.size), None


def _array_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or 0 in array.shape:
        raise image_error("<array>", f"array of shape {array.shape} is not an image "
                          "(expected (H, W, 3) with values in [0, 255])")
    pixels = np.clip(np.nan_to_num(array.astype(np.float64)), 0, 255).round().astype(np.uint8)
    return to_rgb(Image.fromarray(pixels))


def _check_file(path: str | os.PathLike) -> None:
    """Refuse missing, non-regular and zero-byte files with a precise reason."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise image_error(path, "missing file") from None
    except OSError as exc:
        raise image_error(path, f"unreadable file ({exc.strerror or exc})") from None
    if not Path(path).is_file():
        raise image_error(path, "not a regular file")
    if st.st_size == 0:
        raise image_error(path, "empty file")


def _open(path: str | os.PathLike, max_pixels: int) -> Image.Image:
    """``Image.open`` that treats decompression bombs (warning or error) as failures."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{found.group(1)} pixels" if found else "too many pixels"
        raise image_error(path, f"too large ({pixels})") from None
    except UnidentifiedImageError:
        raise image_error(path, _unidentified(path)) from None
    except PermissionError as exc:
        raise image_error(path, f"unreadable file ({exc.strerror})") from None
    except Exception as exc:  # plugins raise OSError, SyntaxError, ValueError, struct.error
        raise image_error(path, _reason(exc, "corrupt header")) from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise image_error(path, f"too large ({w}×{h} pixels)")
    return im


# Leading bytes of the formats PIL reads; a file that starts like one but cannot be identified
# was cut short (a partial download or copy), not "not an image".
SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)


def _unidentified(path: str | os.PathLike) -> str:
    """Reason for a file PIL cannot identify: "truncated image" when it starts like one."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        head = b""
    webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    if webp or any(head.startswith(sig) for sig in SIGNATURES):
        return "truncated image"
    return "not an image (cannot identify)"


def _orientation(im: Image.Image) -> int | None:
    """The EXIF orientation tag (1..8), or None when absent or unreadable."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block must not lose the picture
        return None
    return value if isinstance(value, int) and 1 <= value <= 8 else None


def _decode(im: Image.Image, path: str | os.PathLike) -> None:
    """Decode the pixel data, turning decoder failures into reasons."""
    try:
        im.load()
    except Exception as exc:
        raise image_error(path, _reason(exc, "cannot decode")) from None


def _reason(exc: Exception, what: str) -> str:
    """ "truncated image" for the many ways PIL reports a short file, else ``what (detail)``."""
    text = str(exc)
    if isinstance(exc, OSError) and ("truncated" in text.lower() or "broken data" in text):
        return "truncated image"
    return f"{what} ({type(exc).__name__}: {text})"


def to_rgb(im: Image.Image, path: str | os.PathLike = "<image>") -> Image.Image:
    """``im`` as an 8-bit RGB image (see the module docstring for each mode)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im), mode)).convert("RGB")
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError):
        raise image_error(path, f"unsupported mode ({mode})") from None


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map 16-bit (or 32-bit integer holding 16-bit) values to 0..255 with rounding.

    ``F`` (float) images are taken as 0..1 when their maximum is at most 1, else as 0..255.
    """
    if mode == "F":
        v = values.astype(np.float64)
        scale = 255.0 if np.nanmax(v, initial=0.0) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(v * scale), 0, 255).round().astype(np.uint8)
    v = np.clip(values.astype(np.int64), 0, 65535)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation says (unchanged if the EXIF block is broken)."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def is_image_name(path: str | os.PathLike) -> bool:
    """True when ``path`` has a common image file suffix."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


GLOB_CHARS = frozenset("*?[")


def list_images(
    source: str | os.PathLike, images_dir: str | os.PathLike | None = None
) -> tuple[list[Path], list[str]]:
    """Resolve ``source`` into image paths and their names (the cache keys).

    ``source`` is a folder (its image files, not recursive; name = file name), a glob pattern
    (``**`` recurses; name = path below the pattern's fixed folder), one image file, or a text
    file listing image names one per line (blank lines and ``#`` comments skipped), resolved
    against ``images_dir`` (default: the list file's folder); name = the line as written.
    Listed files need not exist: a missing one fails later with reason "missing file".
    """
    text = str(source)
    if GLOB_CHARS & set(text):
        return _from_glob(text)
    path = Path(source)
    if path.is_dir():
        # an entry with an image name that is not a file (a folder "x.jpg", a broken link) is
        # kept, so it fails with its own reason instead of vanishing
        paths = sorted(p for p in path.iterdir() if is_image_name(p))
        if not paths:
            raise CaptionerError(
                f"no images in {path} (no files ending in {', '.join(sorted(IMAGE_SUFFIXES))})."
            )
        return paths, [p.name for p in paths]
    if not path.is_file():
        raise CaptionerError(
            f"{path} does not exist (give a folder, a quoted glob, an image or a list file)."
        )
    if is_image_name(path):
        return [path], [path.name]
    return _from_list(path, Path(images_dir) if images_dir else path.parent)


def _from_glob(pattern: str) -> tuple[list[Path], list[str]]:
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    rest = str(Path(*parts[fixed:]))
    paths = sorted(p for p in base.glob(rest) if p.is_file() or is_image_name(p))
    if not paths:
        raise CaptionerError(f"no file matches {pattern!r}.")
    return paths, [p.relative_to(base).as_posix() for p in paths]


def _from_list(path: Path, images_dir: Path) -> tuple[list[Path], list[str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CaptionerError(
            f"cannot read {path} as a UTF-8 list of image names ({exc}); give a folder, a "
            "quoted glob, an image, or a text file with one image name per line."
        ) from None
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise CaptionerError(f"list file {path} names no images.")
    return [images_dir / name for name in names], names
