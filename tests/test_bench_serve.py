"""Smoke run of the ``captioner serve`` load test against the bundled model (a real server
process on localhost; the numbers are not checked, the zero errors and the RESULT keys are)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT, needs_mobilenet

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
pytest.importorskip("psutil")

sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_serve  # noqa: E402

KEYS = {"ratio", "sequential", "concurrent", "errors", "batches", "mean_batch", "largest_batch",
        "rejected_503", "rss_mb_before", "rss_mb_after", "rss_growth_mb"}


@pytest.mark.shared
@needs_mobilenet
def test_bench_serve_smoke(capsys, tmp_path):
    assert bench_serve.main(["--smoke", "--images-dir", str(tmp_path)]) == 0  # synthetic photos
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("RESULT ")
    result = json.loads(lines[-1][len("RESULT "):])
    assert KEYS <= set(result)
    assert result["errors"] == 0 and result["rejected_503"] == 0
    assert result["concurrent"]["requests"] == bench_serve.SMOKE["requests"]
    assert len(result["concurrent"]["rss_mb_by_quarter"]) == 4
    assert result["batches"] >= 1 and result["rss_mb_before"] > 0
