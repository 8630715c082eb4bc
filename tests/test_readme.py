"""The README's Python API example runs as written (in a scratch folder with data/ linked)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import re
import subprocess
import sys
import typing

import numpy as np
import pytest
from conftest import ROOT, needs_mobilenet
from PIL import Image

README = ROOT / "README.md"


def _api_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Python API", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the Python API section has no python block"
    return blocks[0]


def _captioner_names(tree: ast.Module) -> dict[str, object]:
    """What the example imports from captioner: {local name: module or object}."""
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "captioner":
                    assert not _private(alias.name), alias.name
                    module = importlib.import_module(alias.name)
                    names[alias.asname or alias.name.split(".")[0]] = (
                        module if alias.asname else importlib.import_module("captioner")
                    )
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "captioner":
            assert not _private(node.module), node.module
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert not _private(alias.name), f"{node.module}.{alias.name}"
                if not hasattr(module, alias.name):  # a submodule: from captioner import figures
                    importlib.import_module(f"{node.module}.{alias.name}")
                names[alias.asname or alias.name] = getattr(module, alias.name)
    return names


def _private(dotted: str) -> bool:
    return any(part.startswith("_") for part in dotted.split("."))


def _resolve(node: ast.expr, names: dict[str, object]):
    """The captioner object an expression such as ``figures.save_attention_map`` names, or None."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, names)
        if owner is not None:
            assert hasattr(owner, node.attr), f"{ast.unparse(node)} does not exist"
            return getattr(owner, node.attr)
    return None


def _keywords(function) -> set[str]:
    """The keyword arguments ``function`` takes; its ``**overrides`` (if any) are the single
    fields of its dataclass parameter (``Captioner.caption``: ``decoding``)."""
    params = inspect.signature(function).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        hints = typing.get_type_hints(function)
        hints.pop("return", None)
        types = [t for hint in hints.values() for t in (typing.get_args(hint) or (hint,))]
        fields = {
            f.name for t in types if dataclasses.is_dataclass(t) for f in dataclasses.fields(t)
        }
        assert fields, f"{function.__qualname__} takes **kwargs that the test cannot check"
        names |= fields
    return names


def test_readme_example_uses_only_the_public_api():
    """Imports and attributes of the example are public (no leading underscore, anywhere), every
    captioner name it uses exists, and each call into captioner passes keywords it accepts;
    ``model.caption(...)`` is checked against ``Captioner.caption``."""
    code = _api_example()
    tree = ast.parse(code)
    compile(code, "README.md", "exec")
    names = _captioner_names(tree)
    assert {"Captioner", "figures"} <= set(names)
    private = [
        ast.unparse(n)
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and n.attr.startswith("_")
    ]
    assert not private, private
    # the model object: ``model = Captioner.from_run(...)`` is a Captioner
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func) == "Captioner.from_run"
        ):
            names[node.targets[0].id] = names["Captioner"]
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    checked = []
    for call in calls:
        target = _resolve(call.func, names)
        if target is None or not callable(target):
            continue
        accepted = _keywords(target)
        for keyword in call.keywords:
            assert keyword.arg in accepted, f"{ast.unparse(call.func)}() takes no {keyword.arg}="
        checked.append(ast.unparse(call.func))
    assert {"Captioner.from_run", "model.caption", "figures.save_attention_map"} <= set(checked)


@pytest.mark.subprocess
@pytest.mark.shared
@needs_mobilenet
def test_readme_python_api_example_runs(tmp_path):
    (tmp_path / "data").symlink_to(ROOT / "data")
    (tmp_path / "example.py").write_text(_api_example())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("data/example.jpg: a man ")
    # the API decodes as the CLI does (the model's stored decoding): the README's first command
    quoted = re.search(r"It prints `data/example\.jpg: ([^`]+)`", README.read_text()).group(1)
    assert lines[0].split(": ", 1)[1].split(" (score")[0] == " ".join(quoted.split())
    assert lines[3].startswith("1: a man ")  # the array of the same photo: the same caption
    assert (
        lines[0].split(": ", 1)[1].split(" (score")[0]
        == lines[3].split(": ", 1)[1].split(" (score")[0]
    )
    assert any(line.startswith("missing.jpg: cannot caption it: missing file") for line in lines)
    assert lines[-1].startswith("['a', 'man'") and lines[-1].endswith(", 9, 9)")  # 9x9 grid
    heat = np.asarray(Image.open(tmp_path / "attention.png").convert("RGB"), dtype=float)
    assert heat.std() > 20  # drawn, not blank
