"""CLI for stage 5: ``captioner evaluate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLE = """\
examples:
  captioner evaluate --model runs/merge --captions Flickr8k.token.txt \\
      --features test.h5 --out reports/merge
  captioner evaluate --model runs/attention --captions Flickr8k.token.txt --features test.h5 \\
      --images-dir Flicker8k_Dataset --beam-size 1 3 5 --out reports/attention
  captioner evaluate --captions Flickr8k.token.txt --images-dir Flicker8k_Dataset \\
      --split Flickr_8k.testImages.txt --out reports/default     # bundled model

The report folder (--out, formerly --report) gets report.json (every number), report.md
(summary table, notes, best and worst examples) and report.html (one self-contained page:
tables, training curves, attention heatmaps for attention runs, and a gallery sortable by
CIDEr-D or BLEU-4). Pass --images-dir
with --features to get thumbnails in the gallery.
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``captioner evaluate``."""
    from captioner.commands.options import (
        add_check,
        add_decoding_options,
        add_memory_option,
        add_model_options,
        add_output_options,
        add_renamed,
    )
    from captioner.evaluation.evaluate import ATTENTION_IMAGES, DEFAULT_BATCH_SIZE
    from captioner.evaluation.report import GALLERY_IMAGES, THUMBNAIL_SIZE
    from captioner.formats.presets import PRESETS

    p = sub.add_parser(
        "evaluate",
        help="score a run on a test split (BLEU-1..4, CIDEr-D, ROUGE-L, METEOR 1.5) into a report",
        description="Caption every image of a split with a run folder and score the captions "
        "against all reference captions (cleaned with the run's own rules).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p, "are evaluated", checkpoint=True)
    p.add_argument(
        "--captions",
        required=True,
        metavar="FILE",
        nargs="+",
        help="caption file holding the references (Flickr8k token file, Kaggle CSV, COCO JSON "
        "or Karpathy dataset_*.json); several files are merged",
    )
    p.add_argument(
        "--features",
        metavar="H5",
        help="feature cache of the test images (made with the run's encoder and layer)",
    )
    p.add_argument(
        "--images-dir",
        metavar="DIR",
        help="folder of the image files: with --split and no --features the run's "
        "encoder reads them; with --features they give the report's thumbnails",
    )
    p.add_argument(
        "--split",
        metavar="FILE|test",
        help="image names to evaluate, one a line, or a split of a Karpathy caption file "
        "(train, val, test) (default with --features: every image in the cache)",
    )
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="decode as this preset does instead of as the run's config.json says",
    )
    add_decoding_options(p, beam_nargs="+")
    p.add_argument(
        "--limit", type=int, default=None, metavar="N", help="evaluate only the first N images"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="images captioned together (default %(default)s): larger batches are faster "
        "and take more memory, up to --max-memory (a batch over it is split, same captions)",
    )
    add_memory_option(p)
    p.add_argument(
        "--gallery",
        type=int,
        default=GALLERY_IMAGES,
        metavar="N",
        help="images shown in the HTML gallery (default %(default)s)",
    )
    p.add_argument(
        "--thumbnail-size",
        type=int,
        default=THUMBNAIL_SIZE,
        metavar="PX",
        help="gallery thumbnail size (default %(default)s)",
    )
    p.add_argument(
        "--attention-images",
        type=int,
        default=ATTENTION_IMAGES,
        metavar="N",
        help="attention runs: images with per-word heatmaps (default %(default)s)",
    )
    g = add_output_options(
        p, out_metavar="OUT_DIR",
        out="folder for report.json, report.md, report.html and curves.png (required)",
        json="one object per image and decoding (image, decoding, caption, references, "
        "metrics) or per failure (image, error), then a summary; no table",
        quiet="no progress bar and no table",
        strict="fail if any image could not be evaluated: damaged features, a failed "
        "captioning, an unreadable image (default: they are left out, counted and listed)")
    add_renamed(g, "--report", "--out", "out")
    add_check(p, _check)
    p.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate, write the report, print the summary table."""
    from captioner.commands.options import decoding_overrides
    from captioner.errors import CaptionerError
    from captioner.evaluation.evaluate import evaluate
    from captioner.evaluation.meteor import missing_line
    from captioner.evaluation.report import build_payload, format_table, write_report
    from captioner.formats.presets import get_preset
    from captioner.formats.run_folder import CONFIG_FILE, DEFAULT_RUN
    from captioner.text.captions import caption_inputs

    models = args.model or []
    model = models[0] if models else None
    if model is None:
        if not (DEFAULT_RUN / CONFIG_FILE).is_file():
            raise CaptionerError(f"no bundled model in {DEFAULT_RUN}; pass --model RUN_DIR")
        model = DEFAULT_RUN
    overrides = decoding_overrides(args)  # None: the run's stored decoding
    args.captions, args.split = caption_inputs(args.captions, args.out, args.split)
    if args.preset:  # the preset's decoding, then the options given
        overrides = {**get_preset(args.preset).decoding.to_dict(),
                     **{k: v for k, v in overrides.items() if v is not None}}
    overrides["n_best"] = 1
    beams = overrides.pop("beam_size")  # the values given, a preset's, or None (the run's)
    beams = beams if isinstance(beams, list) else [beams]
    decodings = [{**overrides, "beam_size": k} for k in dict.fromkeys(beams)]
    result = evaluate(
        model,
        args.captions,
        features=args.features,
        images_dir=args.images_dir,
        split=args.split,
        decodings=decodings,
        limit=args.limit,
        batch_size=args.batch_size,
        weights=args.checkpoint,
        attention_images=args.attention_images,
        progress=False if args.quiet or args.json else None,
        strict=args.strict,
        ensemble=models[1:],
        max_memory=args.max_memory,
    )
    paths = write_report(
        args.out, result, gallery=args.gallery, thumbnail_size=args.thumbnail_size
    )
    meteor_missing = missing_line(s.scores for s in result.sections)  # why, and how to add it
    if args.json:
        _print_json(result, paths["html"])
        if meteor_missing:
            print(meteor_missing, file=sys.stderr)
        return 0
    if not args.quiet:
        print(format_table(build_payload(result)))
        if meteor_missing:
            print(meteor_missing)
        if result.skipped:
            print(f"{len(result.skipped)} image(s) skipped (see report.json 'skipped')")
    if result.failed:
        print(f"{len(result.failed)} image(s) failed and were not scored (see report.json "
              "'failed'; --strict makes this an error):", file=sys.stderr)
        for name, why in list(result.failed.items())[:10]:
            print(f"failed: {name}: {why}", file=sys.stderr)
    print(f"report: {paths['html']}", file=sys.stdout)
    return 0


def _check(args: argparse.Namespace) -> None:
    """The options of ``evaluate`` not checked by their group, before any model loads."""
    from captioner import option_checks as checks
    from captioner.errors import CaptionerError, OptionError
    from captioner.storage.faults import check_writable

    if not args.out:
        raise CaptionerError("give --out OUT_DIR, the folder for the report")
    checks.at_least("--batch-size", args.batch_size, 1)
    checks.at_least("--limit", args.limit, 1)
    if Path(args.out).is_file():
        raise OptionError("out", f"{args.out} is a file; give a folder for the report")
    check_writable(args.out, Path(args.out) / "report.html")  # before the work, not after
    for name in ("gallery", "thumbnail_size", "attention_images"):
        if getattr(args, name) < 0 or (name == "thumbnail_size" and args.thumbnail_size < 16):
            raise CaptionerError(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    if not args.features and not (args.images_dir and args.split):
        raise CaptionerError(
            "give --features TEST.h5, or --images-dir DIR together with --split FILE")
    if args.images_dir and not Path(args.images_dir).is_dir():
        raise OptionError("images_dir", f"{args.images_dir} is not a folder")
    for path in args.captions:
        if not Path(path).exists():
            raise OptionError("captions", f"{path} does not exist")
    if args.features and not Path(args.features).is_file():
        raise OptionError("features", f"{args.features} does not exist")


def _print_json(result, report_path) -> None:
    """One line per image and decoding, one per failure, then the summary."""
    from captioner.evaluation.report import build_payload
    from captioner.formats import json_lines as records

    payload = build_payload(result)
    for section, data in zip(result.sections, payload["sections"], strict=True):
        for row in data["images"]:
            metrics = {k: row[k] for k in ("BLEU-4", "CIDEr-D", "ROUGE-L", "METEOR") if k in row}
            record = {
                records.IMAGE: row["image"],
                records.DECODING: data["settings"]["label"],
                records.CAPTION: row["caption"],
                records.SCORE: section.captions[row["image"]].score,
                records.FINISHED: row["finished"],
                records.REFERENCES: row["references"],
                records.METRICS: metrics,
            }
            print(records.dumps(record))
    for name, why in {**result.skipped, **result.failed}.items():
        print(records.dumps(records.error_record(name, why)))
    summary = records.summary_record(
        command="evaluate",
        images=payload["n_images"],
        skipped=len(result.skipped),
        failed=len(result.failed),
        metrics={s["settings"]["label"]: s["metrics"] for s in payload["sections"]},
        report=str(report_path),
    )
    print(records.dumps(summary))
