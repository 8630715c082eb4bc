"""COCO caption JSON (``captions_train2017.json``): ``images`` (id, file_name) and
``annotations`` (image_id, caption). An image's name is the base name of its ``file_name``.
Pure Python."""

from __future__ import annotations

from pathlib import Path

from captioner.errors import CaptionerError
from captioner.text.caption_file import CaptionFile, Problem, json_document


def parse_coco(data: bytes, result: CaptionFile) -> None:
    """Fill ``result.captions`` (in ``images`` order) from a COCO caption file."""
    path = result.path
    doc = json_document(data, path)
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise CaptionerError(f"{path}: not a COCO caption file (needs 'images' and 'annotations')")
    names = _coco_images(doc.get("images"), result)
    for index, ann in enumerate(doc["annotations"]):
        where = f"annotations[{index}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            result.problems.append(Problem(path, None, f"{where}: needs image_id and caption"))
            continue
        name = names.get(_coco_id(ann["image_id"]))
        caption = ann["caption"].strip() if isinstance(ann["caption"], str) else ""
        if name is None:
            reason = f"{where}: image_id {ann['image_id']!r} is not in 'images'"
            result.problems.append(Problem(path, None, reason))
        elif not caption:
            result.problems.append(Problem(path, None, f"{where}: empty caption for {name!r}"))
        else:
            result.captions.setdefault(name, []).append(caption)
    order = {name: i for i, name in enumerate(names.values())}
    result.captions = dict(sorted(result.captions.items(), key=lambda kv: order[kv[0]]))


def _coco_id(value: object) -> object:
    return str(value) if isinstance(value, (int, str)) else None


def _coco_images(images: object, result: CaptionFile) -> dict[object, str]:
    if not isinstance(images, list):
        raise CaptionerError(f"{result.path}: not a COCO caption file (no 'images' list)")
    names: dict[object, str] = {}
    for index, image in enumerate(images):
        ok = isinstance(image, dict) and isinstance(image.get("file_name"), str)
        if not ok or _coco_id(image.get("id")) is None:
            reason = f"images[{index}]: needs id and file_name"
            result.problems.append(Problem(result.path, None, reason))
            continue
        names[_coco_id(image["id"])] = Path(image["file_name"]).name
    return names
