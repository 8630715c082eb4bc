"""CLI: ``captioner neighbours`` — give a run folder the neighbour index of consensus reranking."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = """\
examples:
  captioner neighbours runs/attention --captions Flickr8k.token.txt \\
      --features cache/train.h5
  captioner caption photo.jpg --model runs/attention --beam-size 10 --consensus 40

`captioner train` builds the index itself; this command gives one to a run trained before, or
rebuilds it from other training data. The index (neighbours.npz, about 2 MB for 6,000 images)
holds each training image's pooled features, projected and stored as int8, and its captions.
With --consensus K the beam's captions are reranked by their CIDEr-D agreement with the
captions of the K most similar training images. Re-run `captioner export` afterwards so the
ONNX folder carries the index too.
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``neighbours``."""
    p = sub.add_parser(
        "neighbours",
        help="give a run folder the training-image index of consensus reranking",
        description="Build the neighbour index of a run folder from its training features and "
        "captions (cleaned as for training), write it into the folder and name it in "
        "config.json.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--captions", required=True, metavar="FILE",
                   help="caption file of the training images (any format `captioner train` reads)")
    p.add_argument("--features", required=True, metavar="CACHE",
                   help="feature cache of the training images, made with the run's encoder")
    p.set_defaults(handler=run_neighbours)


def run_neighbours(args: argparse.Namespace) -> int:
    """Handler of ``captioner neighbours``."""
    from captioner.errors import CaptionerError
    from captioner.evaluation.evaluate import open_matching_cache
    from captioner.formats.run_folder import CONFIG_FILE, RunConfig
    from captioner.train.neighbour_index import attach
    from captioner.train.training import split_captions

    run = Path(args.run)
    if not (run / CONFIG_FILE).is_file():
        raise CaptionerError(f"{run} is not a run folder (no {CONFIG_FILE}); give the folder "
                             "`captioner train` wrote")
    config = RunConfig.load(run)
    with open_matching_cache(args.features, run, config) as reader:
        captions = split_captions(reader, args.captions, args.features)
        path = attach(run, reader, captions, config)
    print(f"{path}: {len(captions)} training images, {path.stat().st_size / 1e6:.1f} MB")
    return 0
