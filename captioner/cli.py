"""The ``captioner`` command line.

Each pipeline stage registers its subcommands from ``captioner.commands.<stage>``; those modules
import Keras lazily, inside their handlers, so ``captioner --help`` is fast and works without
TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from captioner import __version__
from captioner.errors import CaptionerError, MachineFaultError, OptionError

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


def _quiet_keras_import() -> None:
    """Import Keras with the C++ start-up chatter of TensorFlow (CUDA probes, oneDNN notes)
    kept off the terminal; ``CAPTIONER_VERBOSE=1`` shows it. Python errors still surface."""
    if "keras" in sys.modules:
        return
    check_backend()
    if os.environ.get("CAPTIONER_VERBOSE") == "1":
        return
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                import keras

                keras.ops.convert_to_numpy(keras.ops.zeros(1))  # device probing happens here
                # tf.function's retracing advice: an ensemble's members trace the same step
                # functions once each, which it reads as retracing in a loop
                logging.getLogger("tensorflow").setLevel(logging.ERROR)
            except ImportError:
                pass  # reported by the command that needs it
    finally:
        os.dup2(saved, 2)
        os.close(saved)


BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch",
                   "openvino": "openvino", "numpy": "numpy"}


def check_backend() -> None:
    """The Keras backend named by ``KERAS_BACKEND`` is installed (else one line, not Keras's
    40-line traceback); run where Keras is about to be imported, so ONNX Runtime needs none."""
    import importlib.util

    backend = os.environ.get("KERAS_BACKEND")
    if backend is None:
        return  # TensorFlow: a missing one is reported by the command that needs it
    module = BACKEND_MODULES.get(backend)
    if module is None:
        raise CaptionerError(f"KERAS_BACKEND={backend} is not a Keras backend; use one of "
                             f"{', '.join(BACKEND_MODULES)}")
    if importlib.util.find_spec(module) is None:
        raise CaptionerError(f"KERAS_BACKEND={backend} but {module} is not installed: install "
                             f"it (pip install {module}) or unset KERAS_BACKEND (TensorFlow)")


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
        from captioner.faults import fault_message

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
