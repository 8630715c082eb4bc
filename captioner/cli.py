"""The ``captioner`` command line.

Each pipeline stage registers its subcommands from ``captioner.commands.<stage>``; those modules
import Keras lazily, inside their handlers, so ``captioner --help`` is fast and works without
TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from captioner import __version__
from captioner.errors import CaptionerError, MachineFaultError, OptionError
from captioner.quiet import quiet_keras_import as _quiet_keras_import  # shared with the API

# Stage modules, in pipeline order; each defines ``register(subparsers)``.
COMMAND_MODULES = (
    "encoders",
    "extract",
    "captions",
    "train",
    "scst",
    "caption",
    "evaluate",
    "serve",
    "fit",
    "export",
    "neighbours",
)

DESCRIPTION = """\
Image captioning with Keras 3, stage by stage:

  encoders / encoder   list, inspect and export the CNN encoders (EfficientNet-Lite0/1/2, the
                       bundled model's; VGG16, VGG19, ResNet50, MobileNetV2)
  extract              run an encoder over images into a resumable HDF5 feature cache
  captions             inspect caption files (vocabulary, lengths)
  train                train an LSTM decoder (merge, inject, attention) on cached features
  scst                 fine-tune a trained run with self-critical training (CIDEr-D reward)
  caption              caption images with a trained run folder (default: the bundled model)
  evaluate             BLEU-1..4, CIDEr-D, ROUGE-L reports on a test split
  serve                web service: JSON API and a page to caption photos (the serve extra)
  fit                  photos + captions -> trained, evaluated run folder in one command
  export               a run folder as ONNX: captions on ONNX Runtime, without TensorFlow
  neighbours           give a run folder the training-image index of --consensus reranking

Run `captioner COMMAND --help` for the options of each command. Options mean the same in
every command: --model run folders, --checkpoint best|last, --weights encoder weights, --out
the command's output, --json JSON lines, --quiet no progress bars, --strict exit 1 when any
input failed. Exit 2: a usage, input or model error, in one line.
"""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every stage's subcommands."""
    parser = argparse.ArgumentParser(
        prog="captioner",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"captioner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"captioner.commands.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``captioner`` console script; returns the exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        from captioner.commands.options import run_checks

        run_checks(args)  # every option group's checks: before any model loads
        if args.command not in ("encoders", "captions") and not getattr(args, "lazy_keras", False):
            _quiet_keras_import()
        return int(args.handler(args) or 0)
    except CaptionerError as exc:
        fault = fault_hint(args) if isinstance(exc, MachineFaultError) else ""
        fault = "" if getattr(exc, "before_work", False) else fault
        message = exc.flag_line() if isinstance(exc, OptionError) else str(exc)
        print(f"captioner {args.command}: error: {message}{fault}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)
    except (OSError, RuntimeError, ValueError) as exc:  # a machine fault no write site named
        from captioner.storage.faults import fault_message

        if (message := fault_message(exc)) is None:
            raise
        print(f"captioner {args.command}: error: {message}{fault_hint(args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"captioner {args.command}: interrupted{resume_hint(args)}", file=sys.stderr)
        return 130


def fault_hint(args: argparse.Namespace) -> str:
    """What a machine fault left behind and how to go on once it is fixed."""
    if args.command == "extract" and getattr(args, "out", None):
        return "; the finished batches are kept: run the same command again to resume"
    if args.command in ("train", "scst") and getattr(args, "out", None):
        command = "scst" if args.command == "scst" or getattr(args, "scst", False) else "train"
        epochs = f" --epochs {args.epochs}" if getattr(args, "epochs", None) else ""
        return (
            f"; finished epochs are kept: `captioner {command} --out {args.out} "
            f"--resume{epochs}` continues"
        )
    if args.command == "caption" and getattr(args, "out", None):
        return "; the captions written are kept: run the same command again for the rest"
    return ""


def resume_hint(args: argparse.Namespace) -> str:
    """How to pick up an interrupted command where it stopped."""
    if args.command == "extract":
        return (f"; the finished batches are saved in {args.out}: run the same command again "
                "to resume")
    if args.command in ("train", "scst"):
        command = "scst" if args.command == "scst" or getattr(args, "scst", False) else "train"
        epochs = f" --epochs {args.epochs}" if getattr(args, "epochs", None) else ""
        return (f"; finished epochs are saved in {args.out}: `captioner {command} --out "
                f"{args.out} --resume{epochs}` continues the run")
    return ""


if __name__ == "__main__":
    sys.exit(main())
