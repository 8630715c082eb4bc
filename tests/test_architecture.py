"""The architecture map of docs/DESIGN.md, checked against the code: ``captioner/`` is a stack
of layers, one folder each (the base modules at the root, the CLI on top). Every import of a
``captioner`` module (at the top of a file or inside a function) points into its own layer or
one below, and no modules import each other in a circle."""

from __future__ import annotations

import ast

import pytest
from conftest import ROOT

PACKAGE = ROOT / "captioner"
# Bottom to top, as in docs/DESIGN.md: a root module's name or a subpackage's folder.
LAYERS = [
    ('errors', 'progress', 'option_checks', 'quiet'),
    ('storage',),
    ('formats',),
    ('encoders',),
    ('features',),
    ('text',),
    ('model',),
    ('inference',),
    ('evaluation',),
    ('train',),
    ('fit',),
    ('engines',),
    ('serve',),
    ('cli', '__main__', 'commands', '__init__'),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _layer(path) -> str:
    """A file's layer name: its folder under captioner/, or its own name at the root."""
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _name(path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(("captioner",) + parts)


MODULES = {_name(p) for p in SOURCES}


def _imports(path) -> set[str]:
    """The captioner modules ``path`` imports (``from captioner.a import b``: ``captioner.a.b``
    when that is a module, else ``captioner.a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n if n in MODULES else node.module for n in names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {n for n in found if n.startswith("captioner.")}


def test_every_folder_and_module_is_on_the_map():
    assert {_layer(p) for p in SOURCES} <= set(LAYER)


def test_every_subpackage_says_what_it_holds():
    for init in PACKAGE.glob("*/__init__.py"):
        assert (ast.get_docstring(ast.parse(init.read_text())) or "").strip(), init


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_down(path):
    here = LAYER[_layer(path)]
    missing = {m for m in _imports(path) if m not in MODULES}
    assert not missing, f"{path.name} imports modules that do not exist: {sorted(missing)}"
    upward = {m for m in _imports(path) if LAYER[m.split(".")[1]] > here}
    assert not upward, f"{path.name} imports {sorted(upward)} from a layer above its own"


def test_the_public_api_resolves():
    """The README's names: lazy re-exports of the package (``import captioner`` stays light)."""
    import captioner
    import captioner.inference

    for name, target in captioner._PUBLIC.items():
        module, _, attribute = target.partition(":")
        assert getattr(captioner, name).__name__ == (attribute or module)
    assert captioner.inference.Captioner is captioner.Captioner
    with pytest.raises(AttributeError):
        captioner.no_such_name  # noqa: B018


def test_no_import_cycles():
    graph = {_name(p): _imports(p) - {_name(p)} for p in SOURCES}
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(node):] + [node]))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
