"""The CLI's one option vocabulary: the groups every command shares (model, decoding, input
images, output), what each flag means, and the checks that go with each group.

One meaning per flag, everywhere: ``--model`` run folders (several: one ensemble),
``--checkpoint best|last`` which weights of a run, ``--weights`` only encoder weights,
``--out`` the command's output file or folder, ``--json`` JSON lines on stdout, ``--quiet`` no
progress bars, ``--strict`` exit status :data:`STRICT_EXIT` when any input failed.

Each group registers its check with :func:`add_check`; ``captioner.cli.main`` runs them all
after parsing and before the handler, so a bad option or a missing input is reported before
any model loads. Renamed options keep their old spelling one release (:func:`add_renamed`), with
a one-line notice on stderr. Standard library only: ``captioner --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from captioner.formats.decoding_config import FIELDS as DECODING_FIELDS  # standard library only

STRICT_EXIT = 1  # --strict and an input failed: the same status in every command
Check = Callable[[argparse.Namespace], None]


def add_check(p: argparse.ArgumentParser, check: Check) -> None:
    """Run ``check(args)`` before the command's handler (each group's checks, in order)."""
    p.set_defaults(checks=[*(p.get_default("checks") or []), check])


def run_checks(args: argparse.Namespace) -> None:
    """Every check the parsed command registered; the first failure raises. The model folders
    (which read files) are checked after every option on its own."""
    checks = list(getattr(args, "checks", None) or ())
    for check in sorted(checks, key=lambda c: c is check_models):
        check(args)


def notice(old: str, new: str) -> None:
    """The one-line deprecation notice of a renamed option (or command)."""
    print(f"captioner: warning: {old} is deprecated and goes away in the next release; "
          f"use {new}", file=sys.stderr)


class _Renamed(argparse.Action):
    """An old spelling: stores into the new option's ``dest`` and prints :func:`notice`."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        notice(option_string or self.dest, self.new)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_renamed(p, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` (hidden from --help) as a deprecated spelling of ``new``."""
    p.add_argument(old, dest=dest, action=_Renamed, new=new, help=argparse.SUPPRESS,
                   default=argparse.SUPPRESS, **kwargs)


# model ------------------------------------------------------------------------------------

def add_model_options(p: argparse.ArgumentParser, what: str = "decode", *,
                      checkpoint: bool = False, runtime: bool = False) -> None:
    """``--model RUN_DIR...`` (and ``--checkpoint best|last``, ``--runtime keras|onnx``)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="RUN_DIR", default=None, nargs="+", action="extend",
                   help="run folder from `captioner train` (default: weights/default, the "
                   f"bundled Flickr8k model); several folders over the same encoder {what} as "
                   "one ensemble that averages their per-step log-probabilities")
    if checkpoint:
        g.add_argument("--checkpoint", choices=("best", "last"), default="best",
                       help="which weights of the run: best.weights.h5 (best dev score) or "
                       "last.weights.h5 (default %(default)s)")
        add_renamed(g, "--weights", "--checkpoint", "checkpoint", choices=("best", "last"))
    if runtime:
        g.add_argument("--runtime", choices=("keras", "onnx"), default=None,
                       help="onnx: the run folder's `captioner export` on ONNX Runtime, no "
                       "TensorFlow; keras: its Keras weights (default: onnx when the folder "
                       "carries an export, else keras)")
    add_check(p, check_models)


def check_models(args: argparse.Namespace) -> None:
    """Each ``--model`` folder is a run folder whose config.json reads (its stored decoding
    included), or an ONNX export: a model error comes before any per-image one."""
    from captioner.formats.run_folder import CONFIG_FILE, RunConfig

    for folder in args.model or ():
        if (Path(folder) / "manifest.json").is_file() and not (Path(folder) / CONFIG_FILE).exists():
            continue  # an ONNX export folder (checked when it loads)
        RunConfig.load(folder)


# decoding ---------------------------------------------------------------------------------



def add_memory_option(p: argparse.ArgumentParser) -> None:
    """``--max-memory`` of ``caption``, ``evaluate`` and ``serve`` (:mod:`captioner.inference.memory`)."""
    p.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                   help="most memory a batch may take beside the loaded model, e.g. 1.5G or "
                   "800M; a batch that would take more is encoded and searched in pieces "
                   "(default: 128M, or half of the available memory when that is less; "
                   "larger pieces buy little speed on a CPU)")


def memory_size(text: str) -> int:
    """argparse ``type`` of ``--max-memory``: bytes of a size such as 1.5G."""
    from captioner.inference.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_decoding_options(p: argparse.ArgumentParser, beam_nargs: str | None = None) -> None:
    """The decoding options of ``caption``, ``evaluate`` and ``serve``: each left unset takes
    the model's stored decoding (``"decoding"`` in its config.json)."""
    from captioner.formats.decoding_config import MAX_BEAM_SIZE, MAX_LENGTH

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
    g.add_argument("--grounding", type=float, default=None, metavar="G",
                   help="name an object (dog, cat, bus, ...) only when the encoder's ImageNet "
                   "head sees it: each such word scores + G * log(the head's probability of "
                   "its family) (0 = off; models without the head ignore it)")
    g.add_argument("--grounding-boost", type=float, default=None, metavar="B",
                   help="and + B * (2 * probability - 1) where the head is sure (> 0.5) of the "
                   "family (0 = off)")
    g.add_argument("--consensus", type=int, default=None, metavar="K",
                   help="rerank the beam's captions by how well they agree (CIDEr-D) with the "
                   "training captions of the K most similar training images (0 = off; models "
                   "without a neighbour index ignore it)")
    g.add_argument("--consensus-weight", type=float, default=None, metavar="W",
                   help="with --consensus: a caption's rank is its agreement + W * its search "
                   "score")
    add_check(p, check_decoding)


def check_decoding(args: argparse.Namespace) -> None:
    """Each decoding option given, on its own (several beam sizes: each one)."""
    decoding_overrides(args)
    for k in args.beam_size if isinstance(args.beam_size, list) else ():
        decoding_overrides(argparse.Namespace(beam_size=k))


def decoding_overrides(args: argparse.Namespace) -> dict:
    """The decoding fields given on the command line (None: the model's)."""
    from captioner.formats.decoding_config import check_overrides

    overrides = {k: getattr(args, k) for k in DECODING_FIELDS if hasattr(args, k)}
    check_overrides(**{k: v for k, v in overrides.items() if not isinstance(v, list)})
    return overrides


def model_decoding(captioner, **overrides):
    """The model's stored decoding with the command line's overrides."""
    return captioner.decoding_for(**overrides)


# input images -----------------------------------------------------------------------------

def add_image_inputs(p: argparse.ArgumentParser, features_names: bool = False) -> None:
    """``IMAGE...``: files, folders or quoted globs, resolved (into ``args.image_paths``)
    before any model loads."""
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders (their images) or quoted globs"
                   + ("; with --features, image names in the cache" if features_names else ""))
    add_check(p, check_images)


def check_images(args: argparse.Namespace) -> None:
    """A folder without images or a glob matching nothing is one error line; a missing file
    stays in the list (it fails on its own, the others go on). With ``--features`` the
    arguments are names in the cache, left as they are."""
    if getattr(args, "features", None):
        args.image_paths = None
        return
    args.image_paths = expand_images(args.images)


def expand_images(args: list[str]) -> list[Path]:
    """Files, folders (their images) and globs, in the order given; a path that does not
    exist is kept as it is, to fail with a per-image error."""
    from captioner.encoders.images import GLOB_CHARS, list_images
    from captioner.errors import CaptionerError

    paths: list[Path] = []
    for arg in args:
        if GLOB_CHARS & set(arg) or Path(arg).is_dir():
            paths.extend(list_images(arg)[0])  # none found: one error line, exit 2
            continue
        try:
            paths.extend(list_images(arg)[0])  # an image, or a list file of image names
        except CaptionerError:
            paths.append(Path(arg))  # fails on its own ("missing file"), the others go on
    return paths


# output -----------------------------------------------------------------------------------

def add_output_options(p: argparse.ArgumentParser, *, out: str | None = None,
                       out_metavar: str = "FILE", required: bool = False,
                       json: str | None = None, quiet: str | None = None,
                       strict: str | None = None) -> argparse._ArgumentGroup:
    """``--out`` (the command's output), ``--json`` (JSON lines on stdout), ``--quiet`` (no
    progress bars), ``--strict`` (exit :data:`STRICT_EXIT` when any input failed); each
    only when its help text is given."""
    g = p.add_argument_group("output")
    if out:
        g.add_argument("--out", metavar=out_metavar, required=required, help=out)
    if json:
        g.add_argument("--json", action="store_true", help="JSON lines on stdout: " + json)
    if quiet:
        g.add_argument("--quiet", action="store_true", help=quiet)
    if strict:
        g.add_argument("--strict", action="store_true", help=strict_help(strict))
    return g


def strict_help(text: str) -> str:
    """The help of ``--strict``: what fails, and the one exit status."""
    return f"{text} (exit status {STRICT_EXIT}, as in every command)"


# ports ------------------------------------------------------------------------------------

def check_port(args: argparse.Namespace) -> None:
    """``--host``/``--port`` can be bound (checked before the model loads)."""
    from captioner.errors import CaptionerError, OptionError

    if not 0 <= args.port <= 65535:
        raise OptionError("port", f"must be from 0 to 65535, not {args.port}")
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((args.host, args.port))
    except OSError as exc:
        why = "is in use (another server?)" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise CaptionerError(f"port {args.port} on {args.host} {why}; stop it or choose "
                             "another --port") from None
