"""CLI for ``captioner fit``: photos and captions to a trained, evaluated run folder."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
One command from your photos and captions to a trained and evaluated run folder: checks the
inputs, splits the photos into train/dev/test (a Karpathy dataset_*.json brings its own
splits; otherwise a seeded shuffle), extracts features into caches inside the run folder,
trains with the preset's recipe (best epoch selected on dev), evaluates on test and writes the
report. Each stage is the code of its own command (extract, train, evaluate). Interrupted? Run
the same command again: finished batches, epochs and stages are kept."""

EPILOG = """\
examples:
  captioner fit --captions my_captions.csv --images-dir my_photos --out runs/mine
  captioner fit --captions dataset_flickr30k.json --images-dir flickr30k-images --out runs/f30k
  captioner fit --captions dataset_coco.json --images-dir coco --out runs/coco   # val2014/... paths
  captioner fit --captions captions_train2017.json captions_val2017.json \\
      --images-dir coco/all2017 --out runs/coco17 --dry-run
  captioner caption --model runs/mine photo.jpg

The run folder holds the trained run (config.json, best.weights.h5, ...), splits/*.txt,
fit.json (what was planned), features/{train,dev,test}.h5 and report/report.html.
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``captioner fit``."""
    from captioner.commands.options import strict_help
    from captioner.formats.presets import add_preset_option

    p = sub.add_parser(
        "fit",
        help="photos + captions -> trained and evaluated run (one command)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--captions",
        required=True,
        nargs="+",
        metavar="FILE",
        help="caption file(s): Karpathy dataset_*.json (splits included), Flickr8k "
        "token file, Kaggle captions.txt or COCO JSON; several are merged",
    )
    p.add_argument(
        "--images-dir",
        required=True,
        metavar="DIR",
        help="folder of the photos (caption names, or Karpathy filepath/filename, "
        "are relative to it)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="RUN_DIR",
        help="run folder to create, or to resume after an interruption",
    )
    add_preset_option(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (photos per split, cache sizes, a time estimate from a "
        "short measurement) and stop",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help=strict_help("stop before any work if a check finds a problem (missing or "
                         "unreadable photos, photos without captions, malformed captions, "
                         "fewer than 5 dev photos)"),
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the train/dev/test shuffle and of training (default %(default)s)",
    )
    p.add_argument(
        "--dev-fraction",
        type=float,
        default=0.1,
        help="share of photos for dev without Karpathy splits (default %(default)s)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.1,
        help="share of photos for test without Karpathy splits (default %(default)s)",
    )
    p.add_argument(
        "--mirror",
        action="store_true",
        help="also encode the training photos mirrored left-right and train on both views "
        "(`captioner train --mirrored-features`): twice the training extraction, no slower "
        "training",
    )
    g = p.add_argument_group("overriding the preset (quick trials)")
    g.add_argument("--encoder", default=None, help="encoder (default: the preset's)")
    g.add_argument("--layer", default=None, help="feature layer (default: the preset's)")
    g.add_argument(
        "--weights",
        default="imagenet",
        metavar="imagenet|PATH",
        help="encoder weights (default imagenet)",
    )
    g.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default: the preset's)"
    )
    g.add_argument(
        "--batch-size", type=int, default=32, help="images per encoder call (default %(default)s)"
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="how features are stored (default float32; float16 halves the caches)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    """Handler of ``captioner fit``."""
    from captioner import option_checks as checks
    from captioner.fit.pipeline import (
        FitOptions,
        describe,
        dry_run,
        make_plan,
        report_findings,
        run_fit,
    )

    checks.at_least("--epochs", args.epochs, 1)
    checks.at_least("--batch-size", args.batch_size, 1)
    fields = FitOptions.__dataclass_fields__
    options = FitOptions(**{k: v for k, v in vars(args).items() if k in fields})
    plan = make_plan(options)
    report_findings(plan)
    if args.dry_run:
        print("\n".join(dry_run(plan)))
        return 0
    print("\n".join(describe(plan)))
    try:
        run = run_fit(plan)
    except KeyboardInterrupt:
        print(
            f"captioner fit: interrupted; finished batches, epochs and stages are kept in "
            f"{args.out}: run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    print(f"run folder: {run} (caption with: captioner caption --model {run} PHOTO)")
    return 0
