"""``captioner serve`` for operators, in-process: API keys, metrics, access log, request IDs,
drain answers, slow bodies and the cap on uploads in progress."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serve_fixtures import photo, tiny_engine  # noqa: E402

from captioner.cli import main  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402
from captioner.serve.app import Settings, create_app  # noqa: E402
from captioner.serve.auth import ApiKeys, load_keys  # noqa: E402

KEY = "k" * 20 + "-first"
OTHER = "o" * 24


@pytest.fixture(scope="module")
def engine(tiny_serve_run):
    run, table, _ = tiny_serve_run
    return tiny_engine(run, table)


def _client(engine, **settings) -> TestClient:
    return TestClient(create_app(engine, Settings(**settings)), raise_server_exceptions=False)


def _post(client, k: int = 1, headers: dict | None = None):
    return client.post("/v1/captions", files=[("images", (f"p{k}.png", photo(k), "image/png"))],
                       headers=headers or {})


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------------------ keys


def test_keys_guard_every_route_but_health_and_the_page(engine):
    keys = ApiKeys([KEY, OTHER])
    with _client(engine, api_keys=keys) as client:
        for headers in ({}, _bearer("wrong-key-of-some-length"), {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}, _bearer(KEY[:-1])):
            answer = _post(client, headers=headers)
            assert answer.status_code == 401, headers
            assert answer.headers["www-authenticate"] == 'Bearer realm="captioner"'
            assert "API key" in answer.json()["error"] and "\n" not in answer.json()["error"]
            assert client.get("/v1/model", headers=headers).status_code == 401
            assert client.get("/metrics", headers=headers).status_code == 401
        assert _post(client, headers=_bearer(KEY)).status_code == 200
        assert _post(client, headers=_bearer(OTHER)).status_code == 200
        assert client.get("/v1/model", headers=_bearer(OTHER)).status_code == 200
        assert client.get("/healthz").status_code == 200
        page = client.get("/")
        assert page.status_code == 200 and 'id="api_key"' in page.text
        assert "decoder on" not in page.text  # the model's details need the key
        assert client.get("/static/serve.js").status_code == 200


def test_without_keys_everything_works_as_before(engine):
    with _client(engine) as client:
        assert _post(client).status_code == 200
        assert 'id="api_key"' not in client.get("/").text
        assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize(("text", "says"), [
    ("", "holds no key"),
    ("# only a comment\n\n", "holds no key"),
    ("short\n", ":1: a key must be 16 to 512"),
    (f"{KEY}\nhas a space in it, long enough\n", ":2: a key must be"),
])
def test_bad_key_files_are_one_line(tmp_path, text, says):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    with pytest.raises(CaptionerError, match=says) as err:
        load_keys(path)
    assert "\n" not in str(err.value) and "keys.txt" in str(err.value)
    with pytest.raises(CaptionerError, match="does not exist"):
        load_keys(tmp_path / "missing.txt")


def test_keys_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(f"# ops team\n{KEY}\n\n  {OTHER}  \n")
    keys = load_keys(path)
    assert len(keys) == 2 and keys.allows(f"Bearer {OTHER}".encode())
    assert not keys.allows(f"Bearer {KEY}x".encode()) and not keys.allows(None)


def test_a_public_address_without_keys_refuses_to_start_before_loading(monkeypatch, capsys,
                                                                       tmp_path):
    from captioner.serve import engine as engine_module

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(engine_module.Engine, "from_run", classmethod(no_load))
    monkeypatch.delenv("CAPTIONER_API_KEY_FILE", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without API keys" in err[0] and "--api-key-file" in err[0]
    assert "--insecure-no-auth" in err[0]
    path = tmp_path / "keys.txt"
    path.write_text("tiny\n")  # the key file is checked before the model loads too
    monkeypatch.setenv("CAPTIONER_API_KEY_FILE", str(path))
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "keys.txt:1: a key must be" in capsys.readouterr().err


# ----------------------------------------------------------------- metrics and logs


def _samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_requests_images_batches_and_refusals(engine):
    with _client(engine, api_keys=ApiKeys([KEY])) as client:
        auth = _bearer(KEY)
        for k in (1, 2):
            assert _post(client, k, headers=auth).status_code == 200
        assert _post(client).status_code == 401
        bad = client.post("/v1/captions", headers=auth,
                          files=[("images", ("x.png", b"not an image", "image/png"))])
        assert bad.status_code == 422
        answer = client.get("/metrics", headers=auth)
        assert answer.headers["content-type"].startswith("text/plain")
        m = _samples(answer.text)
    route = ("route", "/v1/captions")
    assert m[("captioner_requests_total", (route, ("status", "200")))] == 2
    assert m[("captioner_requests_total", (route, ("status", "401")))] == 1
    assert m[("captioner_requests_total", (route, ("status", "422")))] == 1
    assert m[("captioner_images_captioned_total", ())] == 2
    assert m[("captioner_batch_size_count", ())] == 2
    assert m[("captioner_model_seconds_count", ())] == 2
    assert m[("captioner_request_seconds_count", (route,))] == 4
    assert m[("captioner_rejected_total", (("reason", "unauthorized"),))] == 1
    assert m[("captioner_rejected_total", (("reason", "unreadable_image"),))] == 1
    assert m[("captioner_queue_depth", ())] == 0


def test_one_json_access_line_per_request_without_the_key(engine, capsys):
    with _client(engine, api_keys=ApiKeys([KEY]), log_format="json") as client:
        capsys.readouterr()
        assert _post(client, headers={**_bearer(KEY), "X-Request-ID": "abc-123"}).status_code == 200
        assert client.get("/nowhere", headers=_bearer(KEY)).status_code == 404
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert {"time", "route", "status", "images", "latency_ms", "client", "batch",
            "request_id"} <= set(first)
    assert (first["route"], first["status"], first["images"], first["batch"],
            first["request_id"]) == ("/v1/captions", 200, 1, 1, "abc-123")
    assert lines[1]["route"] == "other" and lines[1]["status"] == 404
    assert KEY not in json.dumps(lines)


def test_request_ids_are_echoed_or_made(engine):
    with _client(engine) as client:
        assert client.get("/healthz", headers={"X-Request-ID": "req.42"}).headers[
            "x-request-id"] == "req.42"
        made = client.get("/healthz", headers={"X-Request-ID": "bad id\twith tabs"})
        assert len(made.headers["x-request-id"]) == 32
        assert _post(client).headers["x-request-id"] != made.headers["x-request-id"]


# -------------------------------------------------------------------- drain and bodies


def test_draining_answers_503_with_retry_after_and_health_says_so(engine):
    with _client(engine) as client:
        client.app.state.service.draining = True
        answer = _post(client)
        assert answer.status_code == 503 and int(answer.headers["retry-after"]) > 0
        assert "shutting down" in answer.json()["error"]
        health = client.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert client.get("/metrics").status_code == 200


def _asgi_post(app, chunks, delay: float):
    """Drive ``app`` directly with a client that sends ``chunks`` ``delay`` s apart."""
    body = b"".join(chunks)
    boundary = b"x" * 8
    scope = {"type": "http", "method": "POST", "path": "/v1/captions", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=" + boundary),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "scheme": "http",
             "http_version": "1.1", "root_path": "", "raw_path": b"/v1/captions"}
    parts = list(chunks)
    sent = []

    async def receive():
        if not parts:
            await asyncio.sleep(3600)  # a client that never finishes
        await asyncio.sleep(delay)
        chunk = parts.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(parts)}

    async def send(message):
        sent.append(message)

    async def run():
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


def test_a_body_that_trickles_past_the_timeout_gets_408(engine):
    app = create_app(engine, Settings(body_timeout=0.3))
    chunks = [b"--xxxxxxxx\r\n", b"Content-Disposition: form-data; ", b'name="images"'] * 4
    status, body = _asgi_post(app, chunks, delay=0.1)
    assert status == 408 and "did not arrive within 0.3 s" in body["error"]
    assert app.state.service.in_flight == 0 and app.state.service.uploads == 0


def test_uploads_in_progress_are_capped(engine):
    with _client(engine, max_uploads=1) as client:
        client.app.state.service.uploads = 1  # one slow upload is being read
        answer = _post(client)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert "uploads in progress" in answer.json()["error"]
        client.app.state.service.uploads = 0
        assert _post(client).status_code == 200
