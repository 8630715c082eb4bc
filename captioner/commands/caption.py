"""CLI: ``captioner caption`` — caption images with a trained run folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from captioner.commands.extract import add_engine_options

EXAMPLE = """\
examples:
  captioner caption photo.jpg                       # the bundled default model
  captioner caption photos/ "more/*.jpg" --beam-size 5 --n-best 3
  captioner caption photo.jpg --model runs/attention --attention-map attention.png
  captioner caption 1000268201_693b08cb0b.jpg --features test.h5 --json
  captioner caption archive/ --out captions.jsonl --engine ray --ray-address auto --actors 8

Exit status: 0 when every image was captioned, 1 when some failed (each failure prints one
line and the others go on), 2 on a usage or model error.
"""


def add_decoding_options(p: argparse.ArgumentParser, beam_nargs: str | None = None) -> None:
    """The decoding options of ``caption``, ``evaluate`` and ``serve``: each left unset takes
    the model's stored decoding (``"decoding"`` in its config.json)."""
    from captioner.decoding_config import MAX_BEAM_SIZE, MAX_LENGTH

    g = p.add_argument_group("decoding (default: the model's own, stored in its config.json)")
    g.add_argument("--beam-size", type=int, default=None, nargs=beam_nargs, metavar="K",
                   help=f"beam width, 1 = greedy, at most {MAX_BEAM_SIZE}"
                   + ("; one report section per value" if beam_nargs else ""))
    if not beam_nargs:
        g.add_argument("--n-best", type=int, default=None, metavar="N",
                       help="captions per image, best first (at most the beam size)")
    g.add_argument("--alpha", type=float, default=None,
                   help="length normalisation: score = log-prob / length**alpha (0 = off)")
    g.add_argument("--block-ngram", type=int, default=None, metavar="N",
                   help="forbid repeating any N-gram within a caption (0 = off)")
    g.add_argument("--max-length", type=int, default=None, metavar="TOKENS",
                   help=f"most tokens to generate (at most {MAX_LENGTH}; default: the model's "
                   "maximum)")


def decoding_overrides(args: argparse.Namespace) -> dict:
    """The decoding fields given on the command line (None: the model's), each checked on its
    own before any model loads."""
    from captioner.decoding_config import DecodingError, check_overrides, cli_error

    names = ("beam_size", "n_best", "alpha", "block_ngram", "max_length")
    overrides = {k: getattr(args, k) for k in names if hasattr(args, k)}
    try:
        check_overrides(**{k: v for k, v in overrides.items() if not isinstance(v, list)})
    except DecodingError as exc:
        raise cli_error(exc) from None
    return overrides


def model_decoding(captioner, **overrides):
    """The model's stored decoding with the command line's overrides (errors name the flag)."""
    from captioner.decoding_config import DecodingError, cli_error

    try:
        return captioner.decoding_for(**overrides)
    except DecodingError as exc:
        raise cli_error(exc) from None


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
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders (their images) or quoted globs; with --features, "
                   "image names in the cache")
    p.add_argument("--model", metavar="RUN_DIR", default=None, nargs="+", action="extend",
                   help="run folder from `captioner train` (default: weights/default, the "
                   "bundled Flickr8k model); several folders over the same encoder decode as "
                   "an ensemble that averages their per-step log-probabilities")
    add_decoding_options(p)
    p.add_argument("--features", metavar="H5",
                   help="read image features from this cache instead of running the encoder")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default "
                   "%(default)s): larger batches are faster per image and take more memory, "
                   "up to --max-memory (a batch over it is split, with the same captions)")
    add_memory_option(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: image, caption, score, captions (n-best), error")
    p.add_argument("--attention-map", metavar="OUT.png",
                   help="attention models: save per-word attention heatmaps (several images: "
                   "OUT-<image>.png)")
    p.add_argument("--out", metavar="FILE.jsonl",
                   help="write JSON lines (as --json) to this file; a rerun captions only the "
                   "images it lacks, e.g. --out captions.jsonl")
    add_runtime_option(p)
    add_engine_options(p)
    p.set_defaults(handler=run_caption, lazy_keras=True)


def add_memory_option(p: argparse.ArgumentParser) -> None:
    """``--max-memory`` of ``caption``, ``evaluate`` and ``serve`` (:mod:`captioner.memory`)."""
    p.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                   help="most memory a batch may take beside the loaded model, e.g. 1.5G or "
                   "800M; a batch that would take more is encoded and searched in pieces "
                   "(default: 128M, or half of the available memory when that is less; "
                   "larger pieces buy little speed on a CPU)")


def memory_size(text: str) -> int:
    """argparse ``type`` of ``--max-memory``: bytes of a size such as 1.5G."""
    from captioner.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_runtime_option(p: argparse.ArgumentParser) -> None:
    """``--runtime`` of ``caption`` and ``serve``."""
    p.add_argument("--runtime", choices=("keras", "onnx"), default=None,
                   help="onnx: the run folder's `captioner export` on ONNX Runtime, no "
                   "TensorFlow; keras: its Keras weights (default: onnx when the folder "
                   "carries an export, else keras)")


def resolve_runtime(args: argparse.Namespace, models: list[Path]) -> str:
    """The runtime this command runs on; Keras is imported (quietly) only when it is keras."""
    from captioner.onnx_runtime import choose_runtime

    chosen = choose_runtime(models, "best", args.runtime)
    if chosen == "keras":
        from captioner.cli import _quiet_keras_import

        _quiet_keras_import()
    return chosen


def expand_images(args: list[str]) -> list[Path]:
    """Files, folders (their images) and globs, in the order given; unknown paths kept as-is
    so they fail with a per-image error."""
    from captioner.errors import CaptionerError
    from captioner.images import list_images

    paths: list[Path] = []
    for arg in args:
        try:
            found, _ = list_images(arg)
        except CaptionerError:
            found = [Path(arg)]
        paths.extend(found)
    return paths


def _emit(image: str, captions, error: str | None, as_json: bool, file: str | None = None) -> None:
    from captioner import records

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
    """Every option, before the model is loaded."""
    from captioner import checks
    from captioner.errors import CaptionerError

    checks.at_least("--batch-size", args.batch_size, 1)
    decoding_overrides(args)
    if args.attention_map:
        checks.output_file("--attention-map", args.attention_map, "attention.png")
        if args.features:
            raise CaptionerError("--attention-map draws over the photos, so it needs image "
                                 "files, not --features")


def run_caption(args: argparse.Namespace) -> int:
    """Handler of ``captioner caption``."""
    from captioner.errors import CaptionerError
    from captioner.loader import load_captioner
    from captioner.runs import DEFAULT_RUN

    _check(args)
    models = [Path(m) for m in args.model or [DEFAULT_RUN]]
    runtime = resolve_runtime(args, models)
    if args.out or args.engine == "ray":
        return _to_file(args, models, decoding_overrides(args), runtime)
    captioner = load_captioner(models, runtime=runtime)
    captioner.max_memory = args.max_memory
    decoding = model_decoding(captioner, **decoding_overrides(args))
    if args.attention_map and captioner.decoder.kind != "attention":
        raise CaptionerError("--attention-map needs an attention model (this run's decoder is "
                             f"'{captioner.decoder.kind}')")
    if args.features:
        results = _from_features(captioner, models[0], args.features, args.images, decoding)
    else:
        found = captioner.caption(expand_images(args.images), decoding,
                                  batch_size=args.batch_size, attention=bool(args.attention_map))
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


def _to_file(args: argparse.Namespace, models: list[Path], overrides: dict,
             runtime: str = "keras") -> int:
    """``--out FILE.jsonl`` (either engine, every --model): resumable JSON lines that record
    the model and decoding they were made with; a summary line on stdout."""
    from captioner.errors import CaptionerError

    if not args.out:
        raise CaptionerError("--engine ray writes its captions to a file: add --out FILE.jsonl")
    if args.features or args.attention_map:
        raise CaptionerError("--out captions images; it does not go with --features or --attention-map")
    paths = expand_images(args.images)
    from captioner.faults import check_writable

    check_writable(Path(args.out).parent, args.out)  # a read-only or full folder: before the work
    if args.engine == "ray":
        from captioner.engines.ray_caption import caption_ray

        summary = caption_ray(models, paths, Path(args.out), batch_size=args.batch_size,
                              address=args.ray_address, actors=args.actors,
                              gpus_per_actor=args.gpus_per_actor, overrides=overrides,
                              max_memory=args.max_memory)
    else:
        from captioner.caption_lines import caption_to_file
        from captioner.loader import load_captioner

        captioner = load_captioner(models, runtime=runtime)
        captioner.max_memory = args.max_memory
        decoding = model_decoding(captioner, **overrides)
        summary = caption_to_file(captioner, paths, Path(args.out), args.batch_size, decoding,
                                  models)
    print(summary.line())
    return 1 if summary.failed else 0


def _from_features(captioner, model_dir: Path, path: str, names: list[str], decoding):
    """(name, captions, error, file) per name: a missing or damaged row fails alone."""
    from captioner.evaluation import open_matching_cache

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
    from captioner.figures import save_attention_map

    for r in results:
        target = Path(out)
        if len(results) > 1:
            target = target.with_name(f"{target.stem}-{Path(r.image).stem}{target.suffix or '.png'}")
        target.parent.mkdir(parents=True, exist_ok=True)
        save_attention_map(target, r.image, r.words, r.attention, caption=r.text)
        print(f"attention map: {target}", file=sys.stderr)
