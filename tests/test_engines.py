"""The Ray engine is optional: importing it needs no Ray, and without Ray the commands say
how to install it (these tests run whether Ray is installed or not)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from captioner.cli import main
from captioner.engines.ray_runtime import import_ray
from captioner.errors import CaptionerError


@pytest.mark.subprocess
def test_engine_modules_import_without_ray():
    code = ("import sys; import captioner.engines.ray_extract, captioner.engines.ray_caption; "
            "assert 'ray' not in sys.modules, 'ray imported at import time'")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_missing_ray_is_a_one_line_install_hint(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(CaptionerError, match=r'pip install "captioner\[ray\]"'):
        import_ray()
    (tmp_path / "a.jpg").write_bytes(b"")
    argv = [
        "caption",
        str(tmp_path / "a.jpg"),
        "--engine",
        "ray",
        "--out",
        str(tmp_path / "c.jsonl"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the Ray engine needs Ray Data" in err and "the local engine" in err
