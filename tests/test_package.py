"""Package-level checks: CLI wiring, the root shim, no TensorFlow at import time."""

from __future__ import annotations

import argparse
import os
import pkgutil
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

import captioner
from captioner.cli import COMMAND_MODULES, build_parser, main


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    table, _, listing = out.partition("positional arguments:")
    # the description's table: "  encoders / encoder   list, ..."; argparse's: "    caption   ..."
    described = {
        name
        for names in re.findall(r"^  (\S+(?: / \S+)*)\s{2,}\S", table, re.M)
        for name in names.split(" / ")
    }
    listed = set(re.findall(r"^    (\S+)\s{2,}\S", listing, re.M))
    registered = set(_subcommands(build_parser()))
    stages = {"encoders", "encoder", "extract", "captions", "train", "caption", "evaluate"}
    assert stages <= registered
    assert described == registered, described ^ registered
    assert listed == registered, listed ^ registered


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(action.choices)


HEAVY = ("numpy", "PIL", "nltk", "keras", "tensorflow", "h5py", "jinja2")


@pytest.mark.subprocess
@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["extract", "--help"],
                                  ["evaluate", "--help"], ["train", "--epochs", "x"],
                                  ["caption"], ["extract", "--preset", "nope", "x"]])
def test_help_and_argument_errors_import_no_heavy_library(argv):
    """`captioner --help` and argparse's own errors stay fast: no numpy, PIL, nltk or Keras."""
    code = textwrap.dedent(f"""
        import sys
        from captioner.cli import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        print("heavy:", ",".join(m for m in {HEAVY!r} if m in sys.modules))
    """)
    proc = _run("-c", code)
    assert proc.stdout.splitlines()[-1] == "heavy: ", proc.stdout[-300:] + proc.stderr[-300:]


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: captioner" in capsys.readouterr().out


@pytest.mark.subprocess
def test_root_shim_behaves_like_console_script():
    shim = _run("cli.py", "encoders", "--json")
    module = _run("-m", "captioner.cli", "encoders", "--json")
    assert shim.returncode == module.returncode == 0
    assert shim.stdout == module.stdout and '"vgg16"' in shim.stdout


@pytest.mark.subprocess
def test_user_errors_exit_2_without_traceback():
    result = _run("cli.py", "encoder", "summary", "vgg16", "--weights", "/nonexistent/w.h5")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.subprocess
def test_every_module_imports_without_tensorflow():
    """With TensorFlow made unimportable and a non-TF backend, every module still imports."""
    names = [m.name for m in pkgutil.walk_packages(captioner.__path__, "captioner.")]
    assert {f"captioner.commands.{c}" for c in COMMAND_MODULES} <= set(names)
    script = textwrap.dedent(f"""
        import importlib, sys
        sys.modules["tensorflow"] = None  # any 'import tensorflow' now raises ImportError
        for name in {names!r}:
            importlib.import_module(name)
        import keras
        assert keras.backend.backend() == "jax", keras.backend.backend()
        from captioner.cli import build_parser
        build_parser()
        print("ok", len({names!r}))
    """)
    result = _run("-c", script, env={"KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")


def _api_env(**extra: str) -> dict:
    """The environment of a user's script: TensorFlow backend, no log-level variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "CAPTIONER_VERBOSE", "KERAS_BACKEND")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.subprocess
def test_python_api_on_keras_is_as_quiet_as_the_cli():
    """A script captioning with the Keras runtime prints its caption and nothing on stderr
    (no oneDNN notes, no "failed call to cuInit"): captioner.quiet runs before Keras loads."""
    script = textwrap.dedent("""
        from captioner.inference.loader import load_captioner
        model = load_captioner(runtime="keras")
        print(model.caption(["data/example.jpg"])[0].text)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=_api_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    assert len(result.stdout.split()) >= 3


@pytest.mark.subprocess
def test_quiet_import_shows_the_chatter_with_captioner_verbose():
    """CAPTIONER_VERBOSE=1 keeps TensorFlow's start-up lines: the quiet test above would fail
    if Keras were imported without captioner.quiet."""
    script = ("from captioner.quiet import quiet_keras_import\nquiet_keras_import()\n"
              "import keras\nprint(keras.ops.convert_to_numpy(keras.ops.ones(2)).sum())")
    loud = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=_api_env(CAPTIONER_VERBOSE="1"))
    quiet = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=_api_env())
    assert loud.stdout.strip() == quiet.stdout.strip() == "2.0"
    assert "oneDNN" in loud.stderr or "cuda" in loud.stderr.lower()
    assert quiet.stderr == ""
