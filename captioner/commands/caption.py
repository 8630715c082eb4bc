"""CLI: ``captioner caption`` — caption images with a trained run folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from captioner.commands.extract import add_engine_options
from captioner.commands.options import (  # noqa: F401  (decoding_overrides: used by others)
    add_check,
    add_decoding_options,
    add_image_inputs,
    add_memory_option,
    add_model_options,
    add_output_options,
    decoding_overrides,
    expand_images,
    model_decoding,
)

EXAMPLE = """\
examples:
  captioner caption photo.jpg                       # the bundled default model
  captioner caption photos/ "more/*.jpg" --beam-size 5 --n-best 3
  captioner caption photo.jpg --model runs/attention --attention-map attention.png
  captioner caption 3385593926_d3e9c21170.jpg --features test.h5 --json   # a Flickr8k test photo
  captioner caption archive/ --out captions.jsonl --engine ray --ray-address auto --actors 8

Exit status: 0 when every image was captioned, 1 when some failed (each failure prints one
line and the others go on), 2 on a usage or model error. Folders and globs are resolved, and
every option checked, before the model loads.
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``captioner caption``."""
    p = sub.add_parser(
        "caption",
        help="caption images (default: the bundled model)",
        description="Caption images with a trained run folder: the run's own encoder runs on "
        "the images, then greedy or beam search over the decoder.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_image_inputs(p, features_names=True)
    add_model_options(p, runtime=True)
    add_decoding_options(p)
    p.add_argument("--features", metavar="H5",
                   help="read image features from this cache instead of running the encoder")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default "
                   "%(default)s): larger batches are faster per image and take more memory, "
                   "up to --max-memory (a batch over it is split, with the same captions)")
    add_memory_option(p)
    p.add_argument("--attention-map", metavar="OUT.png",
                   help="attention models: save per-word attention heatmaps (several images: "
                   "OUT-<image>.png)")
    add_output_options(
        p, out_metavar="FILE.jsonl",
        out="write JSON lines (as --json) to this file; a rerun captions only the images it "
        "lacks, e.g. --out captions.jsonl",
        json="one object per image: image, caption, score, captions (n-best), error",
        quiet="no progress bar")
    add_engine_options(p)
    add_check(p, _check)
    p.set_defaults(handler=run_caption, lazy_keras=True)


def resolve_runtime(args: argparse.Namespace, models: list[Path]) -> str:
    """The runtime this command runs on; Keras is imported (quietly) only when it is keras."""
    from captioner.inference.onnx_runtime import choose_runtime

    chosen = choose_runtime(models, "best", args.runtime)
    if chosen == "keras":
        from captioner.quiet import quiet_keras_import

        quiet_keras_import()
    return chosen


def _emit(image: str, captions, error: str | None, as_json: bool, file: str | None = None) -> None:
    from captioner.formats import json_lines as records

    if as_json:
        if error:
            record = records.caption_error_record(image, error, file)
        else:
            record = records.caption_record(image, captions)
        print(records.dumps(record), flush=True)
    elif error:
        where = f" (in {file})" if file else ""
        print(f"{image}: error: {error}{where}", file=sys.stderr, flush=True)
    elif len(captions) == 1:
        print(f"{image}: {captions[0].text}", flush=True)
    else:
        print(f"{image}:")
        for rank, c in enumerate(captions, 1):
            print(f"  {rank}. {c.text}  ({c.score:.3f})")


def _check(args: argparse.Namespace) -> None:
    """The options of ``caption`` that go together, before the model is loaded."""
    from captioner import option_checks as checks
    from captioner.errors import CaptionerError

    checks.at_least("--batch-size", args.batch_size, 1)
    if args.attention_map:
        checks.output_file("--attention-map", args.attention_map, "attention.png")
        if args.features:
            raise CaptionerError("--attention-map draws over the photos, so it needs image "
                                 "files, not --features")
    if args.engine == "ray" and not args.out:
        raise CaptionerError("--engine ray writes its captions to a file: add --out FILE.jsonl")
    if args.out:
        if args.features or args.attention_map:
            raise CaptionerError("--out captions images; it does not go with --features or "
                                 "--attention-map")
        from captioner.storage.faults import check_writable

        checks.output_file("--out", args.out, "captions.jsonl")
        check_writable(Path(args.out).parent, args.out)  # a read-only or full folder


def run_caption(args: argparse.Namespace) -> int:
    """Handler of ``captioner caption`` (its checks ran in ``cli.main``)."""
    from captioner.errors import CaptionerError
    from captioner.formats.run_folder import DEFAULT_RUN
    from captioner.inference.loader import load_captioner

    paths = getattr(args, "image_paths", None)
    if paths is None and not args.features:
        paths = expand_images(args.images)
    if paths and not args.out and not any(p.exists() for p in paths):
        for p in paths:  # nothing to caption: said at once, no model loaded
            _emit(str(p), None, "missing file", args.json)
        return 1
    models = [Path(m) for m in args.model or [DEFAULT_RUN]]
    runtime = resolve_runtime(args, models)
    if args.out:
        return _to_file(args, models, paths, decoding_overrides(args), runtime)
    captioner = load_captioner(models, runtime=runtime)
    captioner.max_memory = args.max_memory
    decoding = model_decoding(captioner, **decoding_overrides(args))
    if args.attention_map and captioner.decoder.kind != "attention":
        raise CaptionerError("--attention-map needs an attention model (this run's decoder is "
                             f"'{captioner.decoder.kind}')")
    if args.features:
        results = _from_features(captioner, models[0], args.features, args.images, decoding)
    else:
        found = captioner.caption(paths, decoding, batch_size=args.batch_size,
                                  attention=bool(args.attention_map),
                                  progress=False if args.quiet or args.json else None)
        for r in found:
            if r.warning:
                print(f"{r.image}: warning: {r.warning}", file=sys.stderr)
        results = [(r.image, r.captions or None, r.error, None) for r in found]
    failed = 0
    for image, captions, error, file in results:
        failed += error is not None
        _emit(str(image), captions, error, args.json, file if error else None)
    if args.attention_map:
        _attention_maps([r for r in found if r.error is None], args.attention_map)
    return 1 if failed else 0


def _to_file(args: argparse.Namespace, models: list[Path], paths: list[Path], overrides: dict,
             runtime: str = "keras") -> int:
    """``--out FILE.jsonl`` (either engine, every --model): resumable JSON lines that record
    the model and decoding they were made with; a summary line on stdout."""
    if args.engine == "ray":
        from captioner.engines.ray_caption import caption_ray

        summary = caption_ray(models, paths, Path(args.out), batch_size=args.batch_size,
                              address=args.ray_address, actors=args.actors,
                              gpus_per_actor=args.gpus_per_actor, overrides=overrides,
                              progress=not args.quiet, max_memory=args.max_memory)
    else:
        from captioner.inference.caption_lines import caption_to_file
        from captioner.inference.loader import load_captioner

        captioner = load_captioner(models, runtime=runtime)
        captioner.max_memory = args.max_memory
        decoding = model_decoding(captioner, **overrides)
        summary = caption_to_file(captioner, paths, Path(args.out), args.batch_size, decoding,
                                  models, progress=False if args.quiet else None)
    print(summary.line())
    return 1 if summary.failed else 0


def _from_features(captioner, model_dir: Path, path: str, names: list[str], decoding):
    """(name, captions, error, file) per name: a missing or damaged row fails alone."""
    from captioner.evaluation.evaluate import open_matching_cache

    with open_matching_cache(path, model_dir, captioner.config) as reader:
        good, feats, bad = reader.read_valid(list(dict.fromkeys(names)))
    found = captioner.caption(feats, decoding, batch_size=128) if good else []
    by_name = {name: (r.captions or None, r.error) for name, r in zip(good, found, strict=True)}
    results = []
    for name in names:
        caps, error = by_name.get(name, (None, bad.get(name)))
        results.append((name, caps, error, path))
    return results


def _attention_maps(results, out: str) -> None:
    """One PNG per captioned image: the photo, then one heat overlay per word."""
    from captioner.evaluation.figures import save_attention_map

    for r in results:
        target = Path(out)
        if len(results) > 1:
            target = target.with_name(f"{target.stem}-{Path(r.image).stem}{target.suffix or '.png'}")
        target.parent.mkdir(parents=True, exist_ok=True)
        save_attention_map(target, r.image, r.words, r.attention, caption=r.text)
        print(f"attention map: {target}", file=sys.stderr)
