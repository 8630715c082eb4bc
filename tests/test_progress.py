"""Progress bars: a disabled bar is a NoBar (no tqdm import on a cold caption), an enabled one
tqdm's; the ONNX caption path imports neither tqdm nor asyncio."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from captioner.progress import NoBar, progress


def test_a_disabled_bar_iterates_counts_nothing_and_takes_any_tqdm_call():
    bar = progress(iter([1, 2, 3]), total=3, desc="x", enabled=False)
    assert isinstance(bar, NoBar) and list(bar) == [1, 2, 3]
    with progress(total=5, enabled=False) as pbar:
        assert pbar.update(2) is None and pbar.set_postfix_str("loss 1.0", refresh=False) is None
        pbar.close()
    assert list(progress(enabled=False)) == []


def test_an_enabled_bar_is_tqdm_on_stderr(capsys, monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal (bars never go to pipes)
    with progress(total=2, desc="caption", unit="img", enabled=True) as bar:
        assert isinstance(bar, tqdm)
        bar.update(2)
    assert "caption" in capsys.readouterr().err


@pytest.mark.subprocess
def test_cold_onnx_caption_imports_no_tqdm_or_asyncio():
    script = (
        "import sys\nfrom captioner.cli import main\nassert main(['caption', "
        "'data/example.jpg', '--runtime', 'onnx']) == 0\n"
        "print(sorted(m for m in ('tqdm', 'asyncio') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "[]"
    assert "data/example.jpg: " in done.stdout


def test_the_epoch_line_shows_dev_and_training_cider():
    from captioner.progress import epoch_line

    line = epoch_line(4, 8, {"loss": 2.5, "val_bleu4": 0.2012, "val_cider": 0.4713,
                             "train_cider": 0.778, "learning_rate": 1e-3}, 65.0)
    assert "val BLEU-4 20.1" in line and "val CIDEr-D 47.1" in line
    assert "train CIDEr-D 77.8" in line and line.startswith("epoch 4/8:")
    assert "train CIDEr-D" not in epoch_line(1, 8, {"loss": 2.5}, 1.0)
