"""The architecture map of docs/DESIGN.md, checked against the code: every import of a
``captioner`` module (at the top or inside a function) points to its own layer or one below,
so there are no cycles between layers; and every module stays under 400 lines."""

from __future__ import annotations

import ast

import pytest
from conftest import ROOT

PACKAGE = ROOT / "captioner"
# Bottom to top, as in docs/DESIGN.md.
LAYERS = [
    ("errors", "files", "temp_files", "faults", "progress", "records", "checks", "decoding_config", "quiet", "__init__"),
    ("runs", "presets", "runcheck"),
    ("images", "encoders", "layers", "weight_files", "encoder_weights", "efficientnet",
     "torch_weights", "grounding"),
    ("cache", "cache_writer", "integrity"),
    ("extraction", "extract_plan"),
    ("captions", "caption_file", "cleaning", "tokenizer", "coco", "karpathy"),
    ("data",),
    ("decoders",),
    ("checkpoints",),
    ("decoding", "compiled", "inference", "caption_lines", "sampling", "ensemble",
     "image_captions", "onnx_runtime", "loader", "onnx_export", "per_image", "memory"),
    ("figures",),
    ("metrics", "evaluation", "meteor"),
    ("report",),
    ("training", "monitor", "distributed", "scst", "scst_config"),
    ("fit", "fit_checks"),
    ("engines",),
    ("serve",),
    ("cli", "commands", "__main__"),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 400


def _module(path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return "commands" if parts[0] == "commands" else parts[0]


def _imports(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "captioner" and len(parts) > 1 and parts[1] in LAYER:
                found.add(parts[1])
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_on_the_map():
    assert {_module(p) for p in SOURCES} <= set(LAYER)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_down_and_modules_stay_small(path):
    here = LAYER[_module(path)]
    upward = {m for m in _imports(path) if LAYER[m] > here}
    assert not upward, f"{path.name} imports {sorted(upward)} from a layer above its own"
    assert len(path.read_text().splitlines()) < MAX_LINES
