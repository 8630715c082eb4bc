"""Karpathy split files: ``dataset_flickr8k.json``, ``dataset_flickr30k.json``, ``dataset_coco.json``.

One JSON object ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw",
"tokens"}]}]}``: the captions and the train/val/test split of a data set in one file, as most
captioning papers use them. An image's name is ``filepath/filename`` (just ``filename`` without
a ``filepath``), relative to ``--images-dir``. Captions come from ``raw`` (``tokens`` joined
when there is no ``raw``) and go through the same cleaning as every other caption format.
``restval`` (COCO's extra training images) is counted as ``train``.

Nothing is allocated from numbers in the file (``imgid``, ``sentid``, ``cocoid`` are ignored);
memory grows with the file's own size only. Pure Python.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

from captioner.errors import CaptionerError
from captioner.text.caption_file import (
    CaptionFile,
    Problem,
    add_records,
    json_document,
    split_copy_suffix,
)

SPLITS = ("train", "val", "test")  # the split names --split takes
KNOWN_SPLITS = (*SPLITS, "restval")  # restval: COCO's extra training images, used as train


def looks_like_karpathy(data: bytes) -> bool:
    """True for JSON whose image entries hold ``sentences`` and no COCO ``annotations``."""
    return b'"sentences"' in data and b'"annotations"' not in data


def parse_karpathy(data: bytes, result: CaptionFile) -> None:
    """Fill ``result.captions`` and ``result.splits`` from a Karpathy split file; a malformed
    entry becomes one :class:`Problem` naming its index and field."""
    path = result.path
    doc = json_document(data, path)
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise CaptionerError(f"{path}: not a Karpathy split file (needs an 'images' list)")
    records: list[tuple[int | None, str, str]] = []
    for index, entry in enumerate(images):
        name = _entry(entry, f"images[{index}]", records, result)
        if name is not None:
            split = entry.get("split")
            if split in KNOWN_SPLITS:
                # X.jpg.N ids are normalised to X.jpg by add_records; restval is kept as is
                result.splits[split_copy_suffix(name)[0]] = split
            elif split is not None:
                reason = f"images[{index}].split: {split!r} is not one of {', '.join(KNOWN_SPLITS)}"
                result.problems.append(Problem(path, None, reason))
    add_records(records, result)


def _entry(entry: object, where: str, records: list, result: CaptionFile) -> str | None:
    """The image name of one entry (its captions appended to ``records``), or None when bad."""
    problems = result.problems
    if not isinstance(entry, dict):
        problems.append(Problem(result.path, None, f"{where}: not an object"))
        return None
    name = image_name(entry, where)
    if not isinstance(name, tuple):
        problems.append(Problem(result.path, None, name))
        return None
    sentences = entry.get("sentences")
    if not isinstance(sentences, list):
        problems.append(Problem(result.path, None, f"{where}.sentences: needs a list"))
        return None
    found = 0
    for k, sentence in enumerate(sentences):
        caption = _sentence(sentence)
        if caption:
            records.append((None, name[0], caption))
            found += 1
        else:
            reason = f"{where}.sentences[{k}].raw: needs a non-empty caption"
            problems.append(Problem(result.path, None, reason))
    return name[0] if found else None


def image_name(entry: dict, where: str) -> tuple[str] | str:
    """``(filepath/filename,)`` or the reason the entry's name is unusable: it must be a
    relative path that stays inside ``--images-dir``."""
    filename, filepath = entry.get("filename"), entry.get("filepath", "")
    if not isinstance(filename, str) or not filename.strip():
        return f"{where}.filename: needs a file name"
    if not isinstance(filepath, str):
        return f"{where}.filepath: needs a folder name (a string)"
    name = str(PurePosixPath(filepath.strip(), filename.strip()))
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts or "\\" in name:
        return f"{where}.filepath/filename: {name!r} must be a relative path inside --images-dir"
    return (name,)


def _sentence(sentence: object) -> str:
    if not isinstance(sentence, dict):
        return ""
    raw = sentence.get("raw")
    if isinstance(raw, str) and raw.strip():
        return " ".join(raw.split())  # one line: tabs and newlines become spaces
    tokens = sentence.get("tokens")
    if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
        return " ".join(tokens).strip()
    return ""


def karpathy_json(captions: Mapping[str, Sequence[str]], splits: Mapping[str, str]) -> bytes:
    """``captions`` (name -> captions) as a Karpathy split file; images without a split get no
    ``split`` key (they belong to no split)."""
    images = []
    for name, caps in captions.items():
        folder, _, filename = name.rpartition("/")
        entry: dict = {"filename": filename}
        if folder:
            entry["filepath"] = folder
        if name in splits:
            entry["split"] = splits[name]
        entry["sentences"] = [{"raw": c, "tokens": c.split()} for c in caps]
        images.append(entry)
    return json.dumps({"images": images, "dataset": "captioner"}, ensure_ascii=False).encode()
