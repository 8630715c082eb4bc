"""``captioner serve`` as a real process under hostile load (loopback only, bounded): slow
clients, 500 malformed requests, a 5,000-request soak and SIGTERM in the middle of 8 clients'
load. The scenarios are benchmarks/serve_hostile.py's; here they run on the tiny test model."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
pytest.importorskip("psutil")
pytest.importorskip("prometheus_client")

sys.path.insert(0, str(ROOT / "benchmarks"))

import serve_hostile  # noqa: E402
from bench_serve import free_port, load_photos  # noqa: E402
from serve_fixtures import photo  # noqa: E402

TESTS = Path(__file__).parent
BODY_TIMEOUT, DRAIN_TIMEOUT = 2.0, 20.0


@pytest.fixture()
def server(tmp_path):
    key, port = secrets.token_urlsafe(24), free_port()
    (tmp_path / "keys.txt").write_text(key + "\n")
    command = [sys.executable, str(TESTS / "serve_server.py"), str(tmp_path), str(port),
               str(tmp_path / "keys.txt"), str(BODY_TIMEOUT), str(DRAIN_TIMEOUT)]
    running = serve_hostile.Server(command, key, port)
    running.ready(timeout=300)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def photos():
    return [(f"p{k}.png", photo(k)) for k in range(6)]


@pytest.mark.slow
def test_hostile_clients_then_a_soak_then_a_drain(server, photos):
    slow = serve_hostile.slow_clients(server, photos, clients=8, requests=48, slow=3,
                                      body_timeout=BODY_TIMEOUT)
    assert slow["baseline"]["errors"] == 0 and slow["with_slow"]["errors"] == 0
    assert len(slow["slow_answers"]) == 3 and all(" 408 " in a for a in slow["slow_answers"])
    # the slow clients cost the others next to nothing (a generous bound for a shared CPU)
    assert slow["with_slow"]["p50_ms"] <= 2 * slow["baseline"]["p50_ms"] + 50

    bad = serve_hostile.malformed_requests(server, 500, photo(1))
    assert bad["n_problems"] == 0, bad["problems"]
    assert bad["alive_after"] and len(bad["statuses"]) == 12

    soak = serve_hostile.soak(server, photos, clients=8, count=5000)
    assert soak["errors"] == 0
    assert soak["rss_growth_pct"] <= 5, soak

    drained = serve_hostile.drain(server, photos, clients=8)
    assert drained["exit_code"] == 0 and drained["exit_s"] <= DRAIN_TIMEOUT + 5
    assert drained["other"] == [], drained  # nothing but 200 and the drain's 503
    assert drained["ok"] >= 8 and drained["ok"] == drained["server_logged_200"], drained


def test_the_load_script_runs(tmp_path, monkeypatch):
    """The script's own entry point against a served tiny model (smoke counts)."""
    args = serve_hostile.parse_args(["--smoke"])
    assert (args.clients, args.malformed, args.soak) == (4, 40, 200)
    assert serve_hostile.parse_args([]).soak == 5000 and load_photos(tmp_path, 2)
