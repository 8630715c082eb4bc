"""``captioner extract``: run an encoder over images into a resumable HDF5 feature cache."""

from __future__ import annotations

import argparse
import sys

from captioner.commands.options import strict_help
from captioner.encoders.specs import SPECS
from captioner.formats.presets import add_preset_option, get_preset

# Kept here (not imported from features/images) so `captioner --help` stays fast; extract()
# validates the same values.
DTYPES = ("float32", "float16")
MIXED_PRECISION = ("float16", "bfloat16")
RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")

DESCRIPTION = """\
Run a pretrained CNN encoder over images and store one feature vector (or map) per image in
an HDF5 cache. The cache is crash-safe and resumable: rerun the same command after an
interruption and it continues where it stopped. Unreadable images (empty, truncated, not an
image, too large, missing) are recorded with the reason and never stop the run.
"""

EPILOG = """\
SOURCE is one of:
  a folder of images            photos/
  a glob (quote it)             'photos/**/*.jpg'
  a single image                photos/dog.jpg
  a list file, one name a line  Flickr_8k.trainImages.txt  (names resolved against --images-dir)

examples:
  captioner extract Flickr8k_text/Flickr_8k.trainImages.txt --images-dir Flicker8k_Dataset \\
      --encoder vgg16 --layer fc2 --out features/vgg16_fc2.h5
  captioner extract photos/ --encoder mobilenet_v2_0.5 --layer pool --out mobilenet_pool.h5
  captioner extract 'photos/*.jpg' --encoder resnet50 --layer conv --dtype float16 \\
      --mixed-precision --batch-size 128 --out resnet_conv.h5     # on a GPU
  captioner extract photos/ --encoder mobilenet_v2_0.5 --out m.h5 --retry-failed --strict
  captioner extract --verify m.h5          # check every row; rerun the extract to repair
  captioner extract photos/ --encoder vgg16 --out f.h5 --engine ray --ray-address auto \\
      --actors 8 --gpus-per-actor 1      # on a Ray cluster (`ray start --head` first)

Extracting another list into the same --out file adds its images to the cache (the file then
holds both lists). A file made with another encoder, layer, weights, input size, resampling or
dtype is refused: choose another --out file.
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``extract`` subcommand."""
    p = sub.add_parser(
        "extract",
        help="run an encoder over images into a resumable HDF5 feature cache",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        nargs="?",
        help="folder, quoted glob, image file, or text file of image names (see below)",
    )
    add_preset_option(p)
    p.add_argument(
        "--verify",
        metavar="CACHE",
        help="check every row of a cache (checksums, finite values, status) and print a "
        "one-line summary; exit 1 if a row is damaged. e.g. --verify features/train.h5",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="JSON lines: one object per failed or damaged image (image, error, file), then a "
        "summary object (see the README's 'JSON lines')",
    )
    p.add_argument(
        "--encoder",
        default=None,
        choices=list(SPECS),
        help="CNN encoder (default: the preset's, e.g. efficientnet_lite2 for 'default' and "
        "vgg16 for 'classic'); e.g. --encoder resnet50",
    )
    p.add_argument(
        "--layer",
        default=None,
        help="feature layer: fc2 (VGG only, 4096 values), conv (spatial map, for attention) or "
        "pool (global average of conv); default: the preset's for the preset's encoder, else "
        "the encoder's own (fc2 for VGG, pool otherwise). e.g. --layer conv",
    )
    p.add_argument(
        "--out",
        metavar="FILE.h5",
        help="the feature cache to create or resume, e.g. --out features/vgg16_fc2.h5",
    )
    p.add_argument(
        "--weights",
        default="imagenet",
        metavar="imagenet|PATH",
        help="'imagenet' (the official Keras file, from the Keras cache or downloaded) or a "
        "weights file, e.g. --weights weights/vgg16_notop.h5 (default imagenet)",
    )
    p.add_argument(
        "--images-dir",
        metavar="DIR",
        help="folder the names of a list-file SOURCE are relative to (default: the list "
        "file's folder), e.g. --images-dir Flicker8k_Dataset",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        metavar="N",
        help="images per model call (default 32; larger is faster on a GPU), e.g. --batch-size 128",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=4,
        metavar="N",
        help="threads decoding and resizing images while the model runs (default 4; 0 decodes "
        "in the main thread), e.g. --workers 8",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="how features are stored (default float32; float16 halves the file), e.g. --dtype float16",
    )
    p.add_argument(
        "--mixed-precision",
        nargs="?",
        const="float16",
        choices=MIXED_PRECISION,
        default=None,
        help="compute in mixed precision (GPU speed-up; features are still stored as --dtype): "
        "--mixed-precision (float16) or --mixed-precision bfloat16 (place it after SOURCE)",
    )
    p.add_argument(
        "--resample",
        choices=list(RESAMPLE),
        default="bilinear",
        help="resizing filter to the encoder's input size (default bilinear), e.g. --resample bicubic",
    )
    p.add_argument(
        "--mirror",
        action="store_true",
        help="encode each photo flipped left-right (a separate cache, recorded as mirrored): "
        "`captioner train --mirrored-features` trains on both views",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help=strict_help("fail if any image has no features (failed now or earlier)"),
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="try again the images that failed in an earlier run (they are skipped otherwise)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="use only the first N images of SOURCE (quick trials), e.g. --limit 100",
    )
    add_engine_options(p)
    p.add_argument("more_sources", nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(handler=run_extract)


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """--engine local|ray and the Ray options (shared by extract and caption)."""
    g = p.add_argument_group("scaling out (Ray; `pip install \"captioner[ray]\"`)")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: a Ray Data pipeline, decoding in "
                   "tasks and running the model in an actor pool, e.g. --engine ray")
    g.add_argument("--ray-address", metavar="ADDRESS", default=None,
                   help="join this Ray cluster ('auto': the one `ray start --head` runs here); "
                   "default: start a local Ray for this command")
    g.add_argument("--actors", type=int, default=1, metavar="N",
                   help="model actors (one model each; default 1), e.g. --actors 4")
    g.add_argument("--gpus-per-actor", type=float, default=0.0, metavar="G",
                   help="GPUs each actor reserves (default 0; 0.5 puts two actors on a GPU)")  # fmt: skip


def run_extract(args: argparse.Namespace) -> int:
    """Handler of ``captioner extract``; returns the exit status."""
    from captioner import option_checks as checks
    from captioner.encoders.images import list_images
    from captioner.errors import CaptionerError

    if args.verify:
        if args.source is not None or args.more_sources:
            raise CaptionerError("--verify CACHE takes no SOURCE; run the check and the extraction apart")
        return run_verify(args.verify, args.json)
    if args.source is None or args.out is None:
        raise CaptionerError("give SOURCE and --out FILE.h5 (or --verify CACHE to check a cache)")
    checks.no_extra_sources(args.more_sources, args.source)
    checks.at_least("--limit", args.limit, 1)
    checks.at_least("--batch-size", args.batch_size, 1)
    checks.at_least("--workers", args.workers, 0)
    checks.output_file("--out", args.out, "features.h5")
    preset = get_preset(args.preset)
    encoder = args.encoder or preset.encoder
    layer = args.layer or (preset.layer if encoder == preset.encoder else None)
    paths, names = list_images(args.source, args.images_dir)
    if args.limit is not None:
        paths, names = paths[: args.limit], names[: args.limit]
    if args.engine == "ray":
        from captioner.engines.ray_extract import extract_ray_with_spec as run
        from captioner.engines.ray_runtime import check_options

        check_options(args.actors, args.gpus_per_actor, args.batch_size)
        engine = {"address": args.ray_address, "actors": args.actors,
                  "gpus_per_actor": args.gpus_per_actor}  # fmt: skip
    else:
        from captioner.features.extraction import extract_with_spec as run

        engine = {"workers": args.workers}
    summary = run(
        paths,
        args.out,
        encoder=encoder,
        layer=layer,
        weights=args.weights,
        mixed_precision=args.mixed_precision,
        names=names,
        batch_size=args.batch_size,
        dtype=args.dtype,
        resample=args.resample,
        mirror=args.mirror,
        retry_failed=args.retry_failed,
        progress=not (args.json or args.quiet),
        **engine,
    )
    if args.json:
        _print_json(summary)
    else:
        for name, reason in list(summary.failed.items())[:10]:
            print(f"failed: {name}: {reason}", file=sys.stderr)
        if len(summary.failed) > 10:
            print(f"... and {len(summary.failed) - 10} more failures", file=sys.stderr)
        print(summary.line())
    from captioner.commands.options import STRICT_EXIT

    return STRICT_EXIT if args.strict and summary.failed else 0


def _print_json(summary) -> None:
    from captioner.formats import json_lines as records

    for name, reason in summary.failed.items():
        print(records.dumps(records.error_record(name, reason)))
    print(
        records.dumps(
            records.summary_record(
                command="extract",
                file=str(summary.out),
                requested=summary.requested,
                done=summary.done,
                skipped=summary.skipped,
                failed=len(summary.failed),
                repaired=summary.repaired,
                seconds=round(summary.seconds, 3),
            )
        )
    )


def run_verify(path: str, as_json: bool) -> int:
    """``captioner extract --verify CACHE``: 0 when no row is damaged, else 1."""
    from captioner.features.cache import FeatureReader
    from captioner.formats import json_lines as records
    from captioner.storage.temp_files import remove_stale

    remove_stale(path)
    with FeatureReader(path) as reader:
        report = reader.verify()
    if as_json:
        for name, why in report.damaged.items():
            print(records.dumps(records.error_record(name, f"damaged row: {why}", str(path))))
        fields = {k: getattr(report, k) for k in ("rows", "done", "pending", "failed")}
        fields |= {"verified": report.verified, "unverified": report.unverified}
        print(
            records.dumps(
                records.summary_record(
                    command="verify", file=str(path), **fields, damaged=len(report.damaged)
                )
            )
        )
    else:
        print(report.line())
    return 0 if report.ok else 1
