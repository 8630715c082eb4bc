"""What the model names on photos outside Flickr8k: the ImageNet sample (one photo per class).

    python benchmarks/imagenet_families.py [--model RUN ...] [--features CACHE]
        [--images ../shared/imagenet-sample] [--grounding G ...] [--out table.md]

For every grounding strength given (default: 0, i.e. off, and the model's own; a strength
above 0 takes the model's boost), captions the 1,000 photos
of ``../shared/imagenet-sample`` (named ``WNID_label.jpg``; the class index is the position of
the WordNet id in their sorted list) and prints, as a Markdown table, the share of the 882
photos of non-dog classes whose caption says "dog" (or another dog word of the family map), the
share of the 118 dog-breed photos that do, and for every family of the map the share of its
photos whose caption names one of its words. ``--features`` reads a cache made with
``captioner extract IMAGES_DIR --encoder efficientnet_lite2 --layer conv`` instead of
encoding the photos again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOG_BREEDS = range(151, 269)  # the 118 dog-breed classes of ImageNet-1k


def _photos(folder: Path) -> tuple[list[Path], np.ndarray]:
    """The sample's photos in class order and their class indices."""
    photos = sorted(folder.glob("*.jpg"))
    if len(photos) != 1000:
        sys.exit(f"{folder}: expected the 1,000 photos of the ImageNet sample, found {len(photos)}")
    return photos, np.arange(1000)


def _captions(captioner, photos: list[Path], features: Path | None, decoding) -> list[str]:
    if features is None:
        found = captioner.caption([str(p) for p in photos], decoding=decoding, batch_size=64)
    else:
        from captioner.features.cache import open_features

        with open_features(features) as reader:  # (N, H, W, C) as stored: both runtimes take it
            feats = np.asarray(reader.read([p.name for p in photos]), dtype="float32")
        found = captioner.caption(feats, decoding=decoding, batch_size=128)
    return [r.captions[0].text if r.captions else "" for r in found]


def _row(label: str, caps: list[str], classes: np.ndarray, families) -> dict:
    def named(words, picked) -> tuple[int, int]:
        hits = sum(any(w in caps[i].split() for w in words) for i in np.flatnonzero(picked))
        return int(hits), int(picked.sum())

    dog_words = families.words[families.names.index("dog")]
    breeds = np.isin(classes, DOG_BREEDS)
    return {"decoding": label, "non_dog_says_dog": named(dog_words, ~breeds),
            "dog_says_dog": named(dog_words, breeds),
            "families": {name: named(words, np.isin(classes, cls)) for name, cls, words
                         in zip(families.names, families.classes, families.words, strict=True)}}


def _markdown(rows: list[dict]) -> str:
    def pct(pair) -> str:
        return f"{pair[0]}/{pair[1]} ({100 * pair[0] / max(pair[1], 1):.1f}%)"

    head = ["family (photos)", *[r["decoding"] for r in rows]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| **non-dog photos captioned 'dog'** | "
                 + " | ".join(f"**{pct(r['non_dog_says_dog'])}**" for r in rows) + " |")
    lines.append("| dog-breed photos captioned 'dog' | "
                 + " | ".join(pct(r["dog_says_dog"]) for r in rows) + " |")
    for name in rows[0]["families"]:
        if name != "dog":
            lines.append(f"| {name} | " + " | ".join(pct(r["families"][name]) for r in rows) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=None, help="run folder(s) (default: bundled)")
    p.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "imagenet-sample")
    p.add_argument("--features", type=Path, default=None, help="feature cache of the photos")
    p.add_argument("--grounding", type=float, nargs="+", default=None,
                   help="grounding strengths to compare (default: 0 and the model's own)")
    p.add_argument("--out", type=Path, default=None, help="also write the table (and .json)")
    args = p.parse_args(argv)

    from captioner.inference.grounding import BUNDLED_FAMILIES, ObjectFamilies
    from captioner.inference.loader import load_captioner

    captioner = load_captioner(args.model)
    families = ObjectFamilies.load(BUNDLED_FAMILIES)
    photos, classes = _photos(args.images)
    strengths = args.grounding or sorted({0.0, captioner.decoding.grounding})
    rows = []
    for g in strengths:  # grounding 0: off (no boost either); else the model's boost
        boost = captioner.decoding.grounding_boost if g else 0.0
        decoding = captioner.decoding.replace(grounding=g, grounding_boost=boost)
        caps = _captions(captioner, photos, args.features, decoding)
        label = f"grounding {g:g}" + (f" (boost {boost:g})" if boost else "")
        rows.append(_row(label, caps, classes, families))
        print(f"grounding {g:g}: non-dog photos captioned 'dog': {rows[-1]['non_dog_says_dog']}",
              file=sys.stderr, flush=True)
    table = _markdown(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
