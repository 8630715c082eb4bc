"""CLI: ``captioner export`` — a run folder as a self-contained ONNX folder."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = """\
examples:
  captioner export runs/attention                      # -> runs/attention/onnx/
  captioner export weights/default --out /tmp/model-onnx

A run folder carrying onnx/ captions on ONNX Runtime (no TensorFlow) by default; `captioner
caption --runtime keras` still runs its Keras weights. Needs the export extra:
pip install "captioner[export]".
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export``."""
    p = sub.add_parser(
        "export",
        help="export a run folder to ONNX (captions without TensorFlow)",
        description="Export a run folder (encoder, decoder init and step of every ensemble "
        "member, tokenizer, decoding, sha256 manifest) to a self-contained ONNX folder.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run",
        nargs="?",
        default=None,
        metavar="RUN",
        help="run folder (default: the bundled model)",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="new folder for the export (default: RUN/onnx)"
    )
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``captioner export``."""
    import importlib.util

    from captioner.errors import CaptionerError
    from captioner.formats.run_folder import DEFAULT_RUN

    missing = [m for m in ("onnx", "tf2onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise CaptionerError(
            f'export needs {" and ".join(missing)}: pip install "captioner[export]"'
        )
    from captioner.inference.onnx_export import export_run

    run = Path(args.run) if args.run else DEFAULT_RUN
    out = Path(args.out) if args.out else run / "onnx"
    manifest = export_run(run, out)
    total = sum(f["size"] for f in manifest["files"].values())
    print(
        f"exported {run} -> {out}: {len(manifest['files'])} files, {total / 1e6:.1f} MB, "
        f"{manifest['decoder']['members']} decoder member(s), opset "
        f"{manifest['versions']['opset'].get('ai.onnx')}, {manifest['seconds']} s"
    )
    return 0
