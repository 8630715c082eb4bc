"""Caption files: loading (Flickr8k, Kaggle CSV, COCO JSON, Karpathy split JSON), split lists,
several files merged into one.

Pure Python. Loaders never crash on a bad line: they skip it and record a :class:`Problem`
``(file, line, reason)``. Only an unreadable file raises :class:`CaptionerError`.

The stray Flickr8k id ``2258277193_586949ec62.jpg.1`` (an image name with a copy suffix) is
*normalised*: ``X.jpg.N`` becomes ``X.jpg`` and a problem is recorded for each such line. If
``X.jpg`` also has captions of its own, the suffixed lines are dropped instead (also recorded),
so normalising can never give an image extra captions.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from captioner.errors import CaptionerError, OptionError
from captioner.text.caption_file import (
    CaptionFile,
    Problem,
    add_records,
)

log = logging.getLogger(__name__)

FORMATS = ("auto", "flickr8k", "csv", "coco", "karpathy")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")



# ----------------------------------------------------------------------------- loading


def read_captions(path: str | Path, fmt: str = "auto") -> CaptionFile:
    """Read a caption file into a :class:`CaptionFile` (captions plus problems found).

    ``fmt`` is ``"flickr8k"`` (``name#N<TAB>caption``), ``"csv"`` (Kaggle ``image,caption``),
    ``"coco"`` (COCO caption JSON), ``"karpathy"`` (Karpathy split JSON, see
    :mod:`captioner.text.karpathy`) or ``"auto"`` (by extension, then by content).
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise CaptionerError(f"unknown caption format {fmt!r}; use one of {', '.join(FORMATS)}")
    data = _read_bytes(path)
    if fmt == "auto":
        fmt = detect_format(path, data)
    from captioner.text.coco import parse_coco
    from captioner.text.karpathy import parse_karpathy

    reader = {"flickr8k": _parse_flickr, "csv": _parse_csv, "coco": parse_coco,
              "karpathy": parse_karpathy}[fmt]
    result = CaptionFile(path=str(path), format=fmt)
    reader(data, result)
    if not result.captions:
        raise CaptionerError(
            f"{path}: no captions found (read as {fmt}); {_looks_like(data)}"
        )
    return result


def load_captions(path: str | Path, fmt: str = "auto") -> dict[str, list[str]]:
    """Image file name -> raw captions (file order). Problems are logged as one warning;
    use :func:`read_captions` to get them as data."""
    result = read_captions(path, fmt)
    key = str(Path(path).resolve())
    if result.problems and key not in _NOTIFIED:  # once per file and process
        _NOTIFIED.add(key)
        log.warning("%s: %d problem(s), first: %s", path, len(result.problems), result.problems[0])
    return result.captions


_NOTIFIED: set[str] = set()


def detect_format(path: Path, data: bytes) -> str:
    """Guess the caption format from the extension, then from the first non-blank line."""
    from captioner.text.karpathy import looks_like_karpathy

    suffix = path.suffix.lower()
    if suffix == ".json":
        return "karpathy" if looks_like_karpathy(data) else "coco"
    if suffix == ".csv":
        return "csv"
    head = data[:4096].decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    first = head.splitlines()[0] if head else ""
    if first.startswith(("{", "[")):
        return "karpathy" if looks_like_karpathy(data) else "coco"
    if "\t" in first:
        return "flickr8k"
    if "," in first:
        return "csv"
    raise CaptionerError(
        f"{path}: cannot tell the caption format from the first line {first[:60]!r}; "
        f"{_looks_like(data)}"
    )


CAPTION_FORMATS_HELP = ("a caption file is a Flickr8k token file (name#0<TAB>caption), a Kaggle "
                        "captions.txt (image,caption), COCO caption JSON or a Karpathy split "
                        "file (dataset_*.json)")


def _looks_like(data: bytes) -> str:
    """What a file that is not a caption file seems to be, and what is expected."""
    from captioner.encoders.images import is_image_name

    lines = data[:4096].decode("utf-8", errors="replace").split()
    if lines and all(is_image_name(w) for w in lines[:20]):
        return ("it lists image names, like a split file (Flickr_8k.*Images.txt); give the "
                f"captions instead: {CAPTION_FORMATS_HELP}")
    return CAPTION_FORMATS_HELP


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CaptionerError(f"{path}: caption file not found; check the path") from None
    except IsADirectoryError:
        raise CaptionerError(f"{path}: is a folder, expected a caption file") from None
    except OSError as exc:
        raise CaptionerError(f"{path}: cannot read caption file ({exc.strerror})") from None


def _lines(data: bytes, result: CaptionFile) -> Iterable[tuple[int, str]]:
    """Decoded non-blank lines with 1-based numbers; undecodable lines become problems."""
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            result.problems.append(Problem(result.path, number, "not valid UTF-8"))
            continue
        if number == 1:
            line = line.lstrip("\ufeff")
        if line.strip():
            yield number, line


def _parse_flickr(data: bytes, result: CaptionFile) -> None:
    records: list[tuple[int, str, str]] = []
    for number, line in _lines(data, result):
        record = _parse_flickr_line(line)
        if isinstance(record, str):
            result.problems.append(Problem(result.path, number, record))
        else:
            records.append((number, *record))
    add_records(records, result)


def _parse_flickr_line(line: str) -> tuple[str, str] | str:
    """``(image, caption)`` or the reason the line is malformed."""
    if "\t" not in line:
        return "no tab between id and caption"
    key, caption = line.split("\t", 1)
    name, sep, number = key.strip().rpartition("#")
    caption = caption.strip()
    if not sep or not name:
        return f"id {key.strip()!r} is not IMAGE#N"
    if not number.isdigit():
        return f"caption number {number!r} in {key.strip()!r} is not a number"
    if not caption:
        return f"empty caption for {key.strip()!r}"
    return name, caption


def _parse_csv(data: bytes, result: CaptionFile) -> None:
    text = data.decode("utf-8-sig", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    header, image_col, caption_col = _csv_header(reader, result.path)
    records: list[tuple[int, str, str]] = []
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            result.problems.append(Problem(result.path, start, f"bad CSV: {exc}"))
            start = reader.line_num + 1
            continue
        number, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            reason = f"expected {len(header)} fields, found {len(row)} (quote captions with commas)"
            result.problems.append(Problem(result.path, number, reason))
            continue
        name, caption = row[image_col].strip(), row[caption_col].strip()
        if not name or not caption:
            what = "image name" if not name else f"caption for {name!r}"
            result.problems.append(Problem(result.path, number, f"empty {what}"))
            continue
        records.append((number, name, caption))
    if "\ufffd" in text:
        result.problems.append(Problem(result.path, None, "invalid UTF-8 bytes were replaced"))
    add_records(records, result)


def _csv_header(reader: Iterable[list[str]], path: str) -> tuple[list[str], int, int]:
    for row in reader:
        if any(cell.strip() for cell in row):
            header = [cell.strip().lower() for cell in row]
            if "image" in header and "caption" in header:
                return header, header.index("image"), header.index("caption")
            break
    raise CaptionerError(
        f"{path}: the first line must be the CSV header 'image,caption' (Kaggle Flickr8k format)"
    )


# ----------------------------------------------------------------------------- splits


@dataclass
class SplitResult:
    """Captions of one split, plus what :func:`filter_split` could not match."""

    captions: dict[str, list[str]]
    without_captions: list[str]
    missing_images: list[str]


def load_split(path: str | Path) -> list[str]:
    """Image names, one a line (stripped; blank lines skipped; duplicates dropped, order kept)."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionerError(f"{path}: not UTF-8 text ({exc.reason})") from None
    names = [line.strip() for line in text.splitlines()]
    return list(dict.fromkeys(name for name in names if name))


SPLIT_NAMES = {"train": "train", "val": "val", "dev": "val", "test": "test"}


def split_names(split: str | Path, source: CaptionFile) -> list[str]:
    """The names of ``split``: a split file, or a split name (train, val/dev, test) of a
    Karpathy caption file (``restval`` counts as train)."""
    if str(split) not in SPLIT_NAMES or Path(split).exists():
        return load_split(split)
    if not source.splits:
        raise OptionError("split", f"{split}: {source.path} holds no splits (only Karpathy "
                          "JSON does); give a split file, one image name a line")
    wanted = SPLIT_NAMES[str(split)]
    return [name for name, s in source.splits.items() if split_of(s) == wanted]


def split_of(value: str) -> str:
    """The split a Karpathy ``split`` value means: ``restval`` is used as train."""
    return "train" if value == "restval" else value


def merge_files(paths: Sequence[str | Path]) -> CaptionFile:
    """Several caption files read as one (any formats; their Karpathy splits kept). An image
    named in an earlier file keeps that file's captions; the clash is a problem, reported."""
    files = [read_captions(p) for p in paths]
    if len(files) == 1:
        return files[0]
    merged = CaptionFile(" + ".join(f.path for f in files), "+".join(f.format for f in files))
    for f in files:
        clashes = [n for n in f.captions if n in merged.captions]
        merged.problems += f.problems
        if clashes:
            log.warning("%s: %d image name(s) also in an earlier caption file kept the earlier "
                        "captions, first: %s", f.path, len(clashes), ", ".join(clashes[:3]))
            merged.problems.append(Problem(f.path, None, f"{len(clashes)} image name(s) clash "
                                           f"with an earlier file, first {clashes[0]!r}"))
        for name, caps in f.captions.items():
            if name not in merged.captions:
                merged.captions[name] = caps
                if name in f.splits:
                    merged.splits[name] = f.splits[name]
    return merged


def caption_inputs(
    paths: str | Path | Sequence[str | Path], folder: str | Path, split: str | None = None
) -> tuple[str, str | None]:
    """The caption file and split file a command reads: several caption files are merged into
    ``folder``/captions-merged-HASH.json (Karpathy JSON); a split name (train, val, test) is
    written to ``folder``/split-NAME.txt from the caption file's Karpathy splits."""
    from captioner.storage.files import write_bytes, write_text
    from captioner.text.karpathy import karpathy_json

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    folder = Path(folder)
    source = merge_files(paths) if len(paths) > 1 or split else None
    captions = str(paths[0])
    if len(paths) > 1:
        data = karpathy_json(source.captions, source.splits)
        target = folder / f"captions-merged-{hashlib.sha256(data).hexdigest()[:12]}.json"
        if not target.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            write_bytes(target, data)
        captions = str(target)
    if split is None or str(split) not in SPLIT_NAMES or Path(split).exists():
        return captions, split
    folder.mkdir(parents=True, exist_ok=True)
    names = split_names(split, source)
    return captions, str(write_text(folder / f"split-{split}.txt", "".join(f"{n}\n" for n in names)))


def filter_split(
    captions: Mapping[str, list[str]],
    names: Iterable[str],
    images_dir: str | Path | None = None,
) -> SplitResult:
    """Keep the captions of ``names`` (split order). Names without captions are reported; with
    ``images_dir``, names whose image file is missing there are reported and dropped too."""
    kept: dict[str, list[str]] = {}
    without: list[str] = []
    missing: list[str] = []
    folder = Path(images_dir) if images_dir is not None else None
    for name in dict.fromkeys(names):
        if name not in captions:
            without.append(name)
        elif folder is not None and not (folder / name).is_file():
            missing.append(name)
        else:
            kept[name] = list(captions[name])
    return SplitResult(kept, without, missing)
