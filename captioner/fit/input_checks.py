"""Checks that ``captioner fit`` runs before any work: which photos and captions can be used,
and what is wrong with the rest (missing photos, photos without captions, unreadable files,
malformed caption entries, tiny splits), each with a count and the first few names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from captioner.text.caption_file import CaptionFile

SHOW = 3  # names shown per finding
MIN_SPLIT = 5  # fewer dev (or test) images than this gives scores too noisy to select on


@dataclass
class Finding:
    """One kind of problem: what it is, and the names it concerns."""

    what: str
    names: list[str]

    def line(self) -> str:
        shown = ", ".join(self.names[:SHOW]) + (", ..." if len(self.names) > SHOW else "")
        return f"{len(self.names)} {self.what}" + (f": {shown}" if shown else "")


@dataclass
class Inputs:
    """The usable photos (captioned, present, readable) and the findings about the rest."""

    usable: list[str]
    findings: list[Finding] = field(default_factory=list)


def check_inputs(source: CaptionFile, images_dir: Path) -> Inputs:
    """Sort the captioned names of ``source`` into usable photos and findings."""
    findings = []
    if source.problems:
        shown = [str(p) for p in source.problems]
        findings.append(Finding("malformed caption entries skipped", shown))
    present = set(image_files(images_dir))
    missing = [n for n in source.captions if n not in present]
    if missing:
        findings.append(Finding(f"captioned photos missing from {images_dir} (dropped)", missing))
    uncaptioned = sorted(present - set(source.captions))
    if uncaptioned:
        findings.append(Finding("photos without captions (not used)", uncaptioned))
    unreadable = [n for n in source.captions if n in present and not readable(images_dir / n)]
    if unreadable:
        findings.append(Finding("unreadable photos (empty or not an image; dropped)", unreadable))
    bad = set(missing) | set(unreadable)
    return Inputs([n for n in source.captions if n not in bad], findings)


def image_files(folder: Path) -> Iterable[str]:
    """Relative POSIX paths of the image files under ``folder`` (any depth)."""
    from captioner.encoders.images import is_image_name

    for path in folder.rglob("*"):
        if is_image_name(path) and path.is_file():
            yield path.relative_to(folder).as_posix()


def readable(path: Path) -> bool:
    """The file is not empty and its header is an image's (no full decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            return False
        with Image.open(path):
            return True
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def split_findings(splits: Mapping[str, list[str]]) -> list[Finding]:
    """Dev or test splits with fewer than :data:`MIN_SPLIT` photos."""
    return [
        Finding(f"{name} photos only (fewer than {MIN_SPLIT}: its scores are noise)", names)
        for name, names in splits.items()
        if name != "train" and len(names) < MIN_SPLIT
    ]
