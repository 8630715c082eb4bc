"""The README's Python API example runs as written (in a scratch folder with data/ linked)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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


def test_readme_example_uses_only_the_public_api():
    code = _api_example()
    assert "Captioner.from_run()" in code and "attention=True" in code
    compile(code, "README.md", "exec")


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
