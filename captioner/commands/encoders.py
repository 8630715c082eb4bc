"""CLI for stage 1: ``captioner encoders`` and ``captioner encoder summary|export``."""

from __future__ import annotations

import argparse
import json

from captioner.commands.options import add_renamed
from captioner.encoders.specs import SPECS, get_spec
from captioner.formats.presets import DEFAULT_PRESET, PRESETS

# the encoder of the default preset, the bundled model's (not encoders.DEFAULT_ENCODER, the
# Python API's historical default)
DEFAULT_ENCODER = PRESETS[DEFAULT_PRESET].encoder


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``encoders`` (list) and ``encoder`` (summary, export)."""
    p = sub.add_parser(
        "encoders",
        help="list the encoders, their feature layers and shapes",
        description="List every encoder spec with its input size, preprocessing and the "
        "feature layers it offers (the shapes are at the default input size).",
    )
    p.add_argument("--json", action="store_true",
                   help="JSON lines: one object per encoder (name, input_size, layers, ...)")
    p.set_defaults(handler=list_encoders)

    enc = sub.add_parser(
        "encoder",
        help="inspect or export one encoder",
        description="Inspect or export one encoder architecture.",
    )
    esub = enc.add_subparsers(dest="encoder_command", metavar="ACTION", required=True)
    s = esub.add_parser(
        "summary",
        help="print the architecture and the parameter count",
        description="Print the layer-by-layer architecture and the parameter count. "
        "Example: captioner encoder summary vgg16",
    )
    _common(s)
    s.set_defaults(handler=summary)
    e = esub.add_parser(
        "export",
        help="write the architecture as JSON (keras model_from_json format)",
        description="Write the architecture as JSON, to be rebuilt with "
        "keras.models.model_from_json plus a weights file. "
        "Example: captioner encoder export vgg16 --out vgg16.json",
    )
    _common(e)
    e.add_argument("--out", metavar="FILE", help="where to write the JSON (required)")
    add_renamed(e, "--json", "--out", "out")
    e.set_defaults(handler=export)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", default=DEFAULT_ENCODER, choices=list(SPECS),
                   metavar="NAME", help=f"encoder spec (default {DEFAULT_ENCODER}); "
                   "see `captioner encoders`")
    p.add_argument("--no-top", dest="include_top", action="store_false",
                   help="VGG only: leave out the classifier (flatten, fc1, fc2, predictions)")
    p.add_argument("--weights", default="none",
                   help="encoder weights: none (default: architecture only), imagenet, or a "
                   "weights .h5 path")


def _weights(value: str) -> str | None:
    return None if value.lower() == "none" else value


def _build(args: argparse.Namespace):
    spec = get_spec(args.name)
    include_top = args.include_top and spec.family in ("vgg16", "vgg19")
    return spec.build(include_top=include_top, weights=_weights(args.weights))


def list_encoders(args: argparse.Namespace) -> int:
    """Print every spec and its feature layers."""
    rows = []
    for spec in SPECS.values():
        layers = {
            name: {"shape": list(f.shape), "keras_layer": f.layer, "needs_top": f.needs_top,
                   "pooled": f.pool}
            for name, f in spec.layers.items()
        }
        rows.append({"name": spec.name, "input_size": list(spec.input_size),
                     "preprocessing": spec.preprocessing, "default_layer": spec.default_layer,
                     "layers": layers, "description": spec.description})
    if args.json:
        for row in rows:
            print(json.dumps({**row, "default": row["name"] == DEFAULT_ENCODER}))
        return 0
    for row in rows:
        default = (f" (default: preset '{DEFAULT_PRESET}', the bundled model's)"
                   if row["name"] == DEFAULT_ENCODER else "")
        print(f"{row['name']}{default}: {row['description']}")
        print(f"  input {row['input_size'][0]}x{row['input_size'][1]} RGB, "
              f"preprocessing '{row['preprocessing']}'")
        for name, info in row["layers"].items():
            shape = "x".join(str(d) for d in info["shape"])
            star = "*" if name == row["default_layer"] else " "
            how = "global average of " if info["pooled"] else ""
            print(f"  {star} {name:<5} {shape:<12} {how}{info['keras_layer']}")
    return 0


def summary(args: argparse.Namespace) -> int:
    """Print the architecture and the parameter count."""
    model = _build(args)
    model.summary(line_length=100)
    print(f"{model.name}: {model.count_params():,} parameters")
    return 0


def export(args: argparse.Namespace) -> int:
    """Write the architecture as JSON."""
    from captioner.encoders.weight_files import export_json
    from captioner.errors import CaptionerError

    if not args.out:
        raise CaptionerError("give --out FILE, the JSON file to write")
    model = _build(args)
    export_json(model, args.out)
    print(f"wrote {args.out} ({model.name}, {model.count_params():,} parameters)")
    return 0
