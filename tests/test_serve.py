"""``captioner serve`` in-process: the JSON API, bad requests, batching across requests."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tempfile
import threading
import time
import types

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("multipart")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from serve_fixtures import FakeEncoder, photo, tiny_engine  # noqa: E402

from captioner.cli import build_parser, main  # noqa: E402
from captioner.encoders.images import load_image  # noqa: E402
from captioner.evaluation.figures import attention_figure  # noqa: E402
from captioner.formats.decoding_config import MAX_BEAM_SIZE, DecodingConfig  # noqa: E402
from captioner.inference.captioner import Captioner  # noqa: E402
from captioner.serve.app import Settings, create_app, render_page  # noqa: E402
from captioner.serve.engine import Engine, Item, Options, bucket, read_test_scores  # noqa: E402
from captioner.serve.heatmap import heatmap_image  # noqa: E402
from captioner.serve.uploads import Limits  # noqa: E402

CLI_KEYS = {"image", "caption", "score", "finished", "captions"}


@pytest.fixture(scope="module")
def tiny(tiny_serve_run):
    return tiny_serve_run


@pytest.fixture(scope="module")
def engine(tiny):
    run, table, _ = tiny
    return tiny_engine(run, table)


def _client(engine, **settings) -> TestClient:
    return TestClient(create_app(engine, Settings(**settings)), raise_server_exceptions=False)


@pytest.fixture()
def client(engine):
    with _client(engine) as c:
        yield c


def _post(client, *files, **fields):
    """POST /v1/captions with ``files`` = (name, bytes[, content type]) tuples."""
    parts = [("images", (f[0], f[1], f[2] if len(f) > 2 else "image/png")) for f in files]
    return client.post("/v1/captions", files=parts, data={k: str(v) for k, v in fields.items()})


def _one_error_line(response, status: int, *phrases: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) <= {"error", "results"}, body
    message = body["error"]
    assert isinstance(message, str) and "\n" not in message and message
    for phrase in phrases:
        assert phrase in message, message
    return message


# --------------------------------------------------------------------------- captions


def test_one_image_gets_its_caption(client, tiny):
    _, _, expected = tiny
    response = _post(client, ("p2.png", photo(2)))
    assert response.status_code == 200, response.text
    [record] = response.json()["results"]
    assert set(record) == CLI_KEYS
    assert record["image"] == "p2.png" and record["caption"] == expected[2]
    assert record["captions"] == [{"caption": expected[2], "score": record["score"]}]
    assert record["score"] < 0 and isinstance(record["finished"], bool)


def test_records_match_captioner_caption_json(client, tiny, tmp_path, monkeypatch, capsys):
    run, table, _ = tiny
    path = tmp_path / "p4.png"
    path.write_bytes(photo(4))
    monkeypatch.setattr(Captioner, "encoder", lambda self: FakeEncoder(table))
    argv = ["caption", str(path), "--model", str(run), "--json", "--n-best", "2"]
    assert main(argv) == 0
    cli = json.loads(capsys.readouterr().out)
    [api] = _post(client, ("p4.png", photo(4)), n_best=2).json()["results"]
    # the CLI's first image is searched eagerly, the warm service's compiled: scores may round
    # apart in the last printed digit
    assert api.pop("score") == pytest.approx(cli.pop("score"), abs=1e-5)
    assert [c.pop("score") for c in api["captions"]] == pytest.approx(
        [c.pop("score") for c in cli["captions"]], abs=1e-5)
    assert api == cli | {"image": "p4.png"}


def _stored(run, folder, **decoding):
    """A copy of ``run`` whose config.json stores ``decoding``."""
    copy = folder / "stored"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"decoding": decoding}))
    return copy


@pytest.mark.parametrize("form", [{}, {"beam_size": 1}, {"n_best": 2, "alpha": 0}])
def test_service_decodes_as_the_cli_with_the_stored_decoding(tiny, tmp_path, monkeypatch, capsys,
                                                             form):
    """Default form fields give `caption --json`'s captions and scores (the model's stored
    decoding, here beam 3, alpha 2, no repeated word); a field overrides as the flag does."""
    run, table, _ = tiny
    stored = _stored(run, tmp_path, beam_size=3, alpha=2.0, block_ngram=1)
    monkeypatch.setattr(Captioner, "encoder", lambda self: FakeEncoder(table))
    paths = [tmp_path / f"p{k}.png" for k in range(len(table))]
    for k, path in enumerate(paths):
        path.write_bytes(photo(k))
    flags = [x for k, v in form.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert main(["caption", *map(str, paths), "--model", str(stored), "--json", *flags]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with _client(tiny_engine(stored, table)) as c:
        api = _post(c, *[(p.name, p.read_bytes()) for p in paths], **form).json()["results"]
        assert c.get("/v1/model").json()["decoding"]["alpha"] == 2.0
    assert api == [r | {"image": p.name} for r, p in zip(cli, paths, strict=True)]
    plain = Captioner.from_run(run, weights="last").caption(table, **form)  # alpha 0, no blocking
    if not form:  # the stored decoding made a difference the service had to follow
        assert [r.text for r in plain] != [r["caption"] for r in api]


def test_n_best_and_beam_size_reach_the_search(client, engine, tiny):
    _, table, _ = tiny
    want = engine.captioner.search(table[[1]], beam_size=4, n_best=3)[0]
    [record] = _post(client, ("a.png", photo(1)), beam_size=4, n_best=3).json()["results"]
    assert [c["caption"] for c in record["captions"]] == [engine.captioner.tokenizer.decode(h.tokens)
                                                          for h in want]
    scores = [c["score"] for c in record["captions"]]
    assert scores == sorted(scores, reverse=True) and scores == pytest.approx([h.score for h in want],
                                                                              abs=1e-5)


def test_attention_grids_per_word(client, engine, tiny):
    _, table, expected = tiny
    [record] = _post(client, ("a.png", photo(3)), attention="true").json()["results"]
    att = record["attention"]
    assert att["grid"] == [2, 2] and att["words"] == expected[3].split() + ["<end>"]
    weights = np.array(att["weights"])
    assert weights.shape == (len(att["words"]), 2, 2)
    np.testing.assert_allclose(weights.sum(axis=(1, 2)), 1.0, atol=1e-3)  # softmax per word
    tokens = engine.captioner.search(table[[3]], beam_size=3)[0][0].tokens
    direct = engine.captioner.attention(table[[3]], [tokens])[0]  # (T, 2, 2)
    np.testing.assert_allclose(weights, direct, atol=1e-4)
    [plain] = _post(client, ("a.png", photo(3))).json()["results"]
    assert "attention" not in plain


def test_heatmap_is_the_cli_figure_of_the_encoder_input_at_the_photos_aspect(client, engine,
                                                                             tiny, tmp_path):
    _, table, expected = tiny
    [record] = _post(client, ("a.png", photo(3)), heatmap="true").json()["results"]
    assert "attention" not in record  # grids only when asked
    head, payload = record["heatmap"].split(",", 1)
    assert head == "data:image/jpeg;base64"
    strip = Image.open(io.BytesIO(base64.b64decode(payload)))
    words = expected[3].split() + ["<end>"]
    # photo(3) is 40 x 30: the panels keep that 4:3 shape (the encoder's input is square)
    figure = attention_figure(np.zeros((30, 40, 3), np.uint8), words, np.ones((len(words), 2, 2)))
    assert strip.format == "JPEG" and strip.size == figure.canvas.get_width_height()  # photo + words
    path = tmp_path / "a.png"
    path.write_bytes(photo(3))
    pixels = load_image(path, engine.input_size, engine.resample)
    [both] = _post(client, ("a.png", photo(3)), heatmap="true", attention="true").json()["results"]
    att = both["attention"]
    assert att["words"] == words
    tokens = engine.captioner.search(table[[3]], beam_size=3)[0][0].tokens
    weights = engine.captioner.attention(table[[3]], [tokens])[0]  # unrounded, as the service
    np.testing.assert_allclose(np.array(att["weights"]), weights, atol=1e-4)
    want = heatmap_image(pixels, words, weights.reshape(len(words), 4), (2, 2), aspect=40 / 30)
    assert base64.b64decode(payload) == want[0] and both["heatmap"] == record["heatmap"]
    _one_error_line(_post(client, ("a.png", photo(3)), heatmap="yes please"), 400, "heatmap must be")


def test_one_bad_image_fails_alone(client, tiny):
    _, _, expected = tiny
    truncated = photo(1, "JPEG", (64, 64))[:300]
    response = _post(client, ("p0.png", photo(0)), ("cut.jpg", truncated, "image/jpeg"),
                     ("notes.txt", b"hello", "text/plain"), ("empty.png", b""),
                     ("p5.jpg", photo(5, "JPEG"), "image/jpeg"), ("junk.png", b"\x89PNG not really"))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["image"] for r in results] == ["p0.png", "cut.jpg", "notes.txt", "empty.png",
                                             "p5.jpg", "junk.png"]
    assert results[0]["caption"] == expected[0] and "error" not in results[0]
    assert results[4]["caption"] == expected[5]
    errors = {r["image"]: r["error"] for r in results if "error" in r}
    assert "truncated image" in errors["cut.jpg"]
    assert "content type text/plain" in errors["notes.txt"]
    assert "empty file" in errors["empty.png"]
    assert "not an image" in errors["junk.png"]
    assert all(r["caption"] is None and r["score"] is None for r in results if "error" in r)


def test_non_finite_features_fail_only_their_image(tiny):
    run, table, expected = tiny
    broken = table.copy()
    broken[3, 0, 0, 0] = np.nan  # photo 3's "encoder output" is damaged
    with _client(tiny_engine(run, broken)) as c:
        response = _post(c, ("p1.png", photo(1)), ("p3.png", photo(3)), ("p2.png", photo(2)),
                         attention="true")
    assert response.status_code == 200, response.text
    first, bad, last = response.json()["results"]
    assert first["caption"] == expected[1] and last["caption"] == expected[2]
    assert "attention" in first and "attention" not in bad
    assert bad["image"] == "p3.png" and bad["caption"] is None and bad["score"] is None
    assert "not finite" in bad["error"], bad


# --------------------------------------------------------------------------- bad requests


def test_single_bad_images_answer_4xx(engine):
    with _client(engine, limits=Limits(max_bytes=20_000, max_pixels=100_000)) as client:
        big = np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(big).save(out, "PNG")  # ~43 KB of noise, over 20 KB
        _one_error_line(_post(client, ("big.png", out.getvalue())), 413, "big.png", "too large")
        wide = photo(1, "PNG", (1000, 200))  # 200,000 pixels, a small file
        _one_error_line(_post(client, ("wide.png", wide)), 413, "wide.png", "too large", "pixels")
        _one_error_line(_post(client, ("a.txt", b"hi", "text/plain")), 415, "a.txt", "content type")
        r = _post(client, ("cut.png", photo(1, "PNG", (64, 64))[:60]))
        _one_error_line(r, 422, "cut.png")
        assert r.json()["results"][0]["error"]


def test_decompression_bomb_is_refused_before_decoding(client):
    bomb = io.BytesIO()
    Image.new("1", (14_000, 14_000)).save(bomb, "PNG")  # 196 million pixels in a tiny file
    assert len(bomb.getvalue()) < 100_000
    _one_error_line(_post(client, ("bomb.png", bomb.getvalue())), 413, "bomb.png", "too large")


@pytest.mark.parametrize("fields, phrase", [
    ({"beam_size": 0}, f"beam_size must be from 1 to {MAX_BEAM_SIZE}"),
    ({"beam_size": MAX_BEAM_SIZE + 1}, f"beam_size must be from 1 to {MAX_BEAM_SIZE}"),
    ({"alpha": -1}, "alpha must be a decimal number"),
    ({"alpha": 11}, "alpha must be from 0 to 10"),
    ({"grounding": "-2"}, "grounding must be a decimal number"),
    ({"grounding": 11}, "grounding must be from 0 to 10"),
    ({"block_ngram": "x"}, "block_ngram must be a whole number"),
    ({"max_length": 0}, "max_length must be from 1 to"),
    ({"beam_size": "three"}, "beam_size must be a whole number"),
    ({"beam_size": 2, "n_best": 3}, "n_best must be from 1 to 2"),
    ({"n_best": -1}, "n_best must be a whole number"),
    ({"attention": "maybe"}, "attention must be true or false"),
    ({"colour": "red"}, "unknown field 'colour'"),
])
def test_bad_options_answer_400(client, fields, phrase):
    _one_error_line(_post(client, ("a.png", photo(1)), **fields), 400, phrase)


def test_bad_request_shapes(client, engine):
    _one_error_line(client.post("/v1/captions", json={"images": []}), 415, "multipart/form-data")
    _one_error_line(client.post("/v1/captions", content=photo(1),
                                headers={"content-type": "image/png"}), 415, "multipart/form-data")
    _one_error_line(client.post("/v1/captions", files={"beam_size": (None, "3")}), 400, "no images")
    _one_error_line(client.post("/v1/captions", data={"images": "photo.jpg"},
                                files=[("x", ("a", b"", "text/plain"))]), 400)
    r = client.post("/v1/captions", files=[("images", ("a.png", photo(1), "image/png")),
                                           ("beam_size", ("b.png", photo(1), "image/png"))])
    _one_error_line(r, 400, "'beam_size' must be text")
    _one_error_line(client.post("/v1/captions", files=[("images", ("a.png", photo(1)))],
                                data={"beam_size": ["1", "2"]}), 400, "given 2 times")
    _one_error_line(client.get("/v1/nothing"), 404, "not found")
    _one_error_line(client.get("/v1/captions"), 405)


def test_too_many_images_and_too_large_body(engine):
    with _client(engine, limits=Limits(max_images=2, max_bytes=4096)) as client:
        files = [(f"p{k}.png", photo(k)) for k in range(3)]
        _one_error_line(_post(client, *files), 400, "Too many files")
        body = b"x" * (Limits(max_images=2, max_bytes=4096).max_body + 1)
        r = client.post("/v1/captions", content=body,
                        headers={"content-type": "multipart/form-data; boundary=xyz"})
        _one_error_line(r, 413, "request too large")

        def chunks():  # no Content-Length: the limit holds while streaming
            for _ in range(40):
                yield b"y" * 4096

        r = client.post("/v1/captions", content=chunks(),
                        headers={"content-type": "multipart/form-data; boundary=xyz"})
        _one_error_line(r, 413, "request too large")
        assert client.get("/healthz").json()["status"] == "ok"


def test_attention_on_a_model_without_attention(client, engine, monkeypatch):
    monkeypatch.setattr(type(engine), "has_attention", property(lambda self: False))
    with _client(engine) as other:
        _one_error_line(_post(other, ("a.png", photo(1)), attention="true"), 400, "attention model")
        _one_error_line(_post(other, ("a.png", photo(1)), heatmap="1"), 400, "heatmap=true needs")


def test_uploads_live_only_in_a_temporary_folder(engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = create_app(engine)
    with TestClient(app) as client:
        folder = app.state.uploads
        assert folder.is_dir() and folder.is_relative_to(tempfile.gettempdir())
        assert _post(client, ("a.png", photo(1)), ("b.txt", b"x", "text/plain")).status_code == 200
        assert list(folder.iterdir()) == []  # each upload deleted once decoded
    assert not folder.exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- other routes


def test_model_healthz_and_page(client, tiny):
    model = client.get("/v1/model").json()
    assert model["encoder"]["name"] == "tiny" and model["decoder"]["kind"] == "attention"
    assert model["vocabulary_size"] == 16 and model["attention_grid"] == [2, 2]
    assert model["test_scores"] is None and model["limits"]["max_images"] == 16
    assert model["ensemble_size"] == 1
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["queued"] == 0
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="files"' in page.text and "attention decoder on tiny" in page.text
    script = client.get("/static/serve.js")
    assert script.status_code == 200 and "heatmap" in script.text


def test_test_scores_come_from_the_report_in_the_run_folder(tmp_path):
    assert read_test_scores(tmp_path) is None
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "report.json").write_text(json.dumps({"sections": [
        {"settings": {"label": "beam 3"}, "metrics": {"BLEU-4": 0.188}}]}))
    assert read_test_scores(tmp_path) == {"report": "test/report.json",
                                     "sections": {"beam 3": {"BLEU-4": 0.188}}}


def test_page_shows_test_scores_and_escapes_run_names(engine):
    model = engine.describe() | {
        "run": "<script>alert(1)</script>",
        "test_scores": {"report": "test/report.json",
                        "sections": {"beam 3": {"BLEU-4": 0.188, "CIDEr-D": 0.442}}}}
    page = render_page(model, Settings())
    assert "beam 3: BLEU-4 18.8, CIDEr-D 44.2" in page
    assert "attention decoder on tiny" in page
    assert "ensemble of 3 attention decoders on tiny" in render_page(model | {"ensemble_size": 3},
                                                                      Settings())
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# --------------------------------------------------------------------------- batching


def test_encoder_batches_are_padded_to_powers_of_two(engine, tiny, monkeypatch):
    _, table, expected = tiny
    seen, encode = [], engine.captioner.encode_images

    def spy(images):
        seen.append(len(images))
        return encode(images)

    monkeypatch.setattr(engine.captioner, "encode_images", spy)
    pixels = [np.full((32, 32, 3), (40 * k, 90, 160), np.uint8) for k in (3, 1, 4)]
    outputs = engine.run([Item(p, Options(DecodingConfig(beam_size=3))) for p in pixels])
    assert seen == [4] and [o.captions[0].text for o in outputs] == [expected[k] for k in (3, 1, 4)]
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]


def _gated(engine, monkeypatch):
    """engine.run waits for ``gate``; the sizes of the batches it got are in ``sizes``."""
    gate, sizes, original = threading.Event(), [], engine.run

    def run(self, items):
        sizes.append(len(items))
        assert gate.wait(30)
        return original(items)

    monkeypatch.setattr(engine, "run", types.MethodType(run, engine))
    return gate, sizes


def _wait_for(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_concurrent_requests_share_a_batch_and_get_their_own_answers(engine, tiny, monkeypatch):
    _, _, expected = tiny
    gate, sizes = _gated(engine, monkeypatch)
    with _client(engine, max_batch=8, max_wait_ms=2) as client:
        answers = {}

        def ask(k):
            answers[k] = _post(client, (f"p{k}.png", photo(k))).json()["results"][0]["caption"]

        first = threading.Thread(target=ask, args=(0,))
        first.start()
        _wait_for(lambda: sizes == [1])  # the model is busy with photo 0
        others = [threading.Thread(target=ask, args=(k,)) for k in (1, 2, 3, 4, 5)]
        for t in others:
            t.start()
        _wait_for(lambda: client.app.state.batcher.pending == 5)
        gate.set()
        for t in [first, *others]:
            t.join(30)
        assert sizes == [1, 5]  # the five waiting requests ran as one batch
        assert answers == {k: expected[k] for k in range(6)}


def test_full_queue_answers_503_with_retry_after(engine, tiny, monkeypatch):
    gate, sizes = _gated(engine, monkeypatch)
    with _client(engine, max_batch=1, max_queue=2) as client:
        statuses = []
        threads = [threading.Thread(target=lambda k=k: statuses.append(
            _post(client, (f"p{k}.png", photo(k))).status_code)) for k in range(3)]
        threads[0].start()
        _wait_for(lambda: sizes == [1])
        for t in threads[1:]:
            t.start()
        _wait_for(lambda: client.app.state.batcher.pending == 2)
        busy = _post(client, ("p5.png", photo(5)), ("p4.png", photo(4)))
        _one_error_line(busy, 503, "busy")
        assert int(busy.headers["retry-after"]) >= 1
        gate.set()
        for t in threads:
            t.join(30)
        assert sorted(statuses) == [200, 200, 200]
        assert client.get("/healthz").json()["rejected"] == 1


def test_model_failure_fails_only_its_batch(engine, monkeypatch):
    original, calls = engine.run, []

    def flaky(self, items):
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return original(items)

    monkeypatch.setattr(engine, "run", types.MethodType(flaky, engine))
    with _client(engine) as client:
        _one_error_line(_post(client, ("a.png", photo(1))), 500, "out of memory")
        assert _post(client, ("a.png", photo(1))).status_code == 200


# --------------------------------------------------------------------------- command line


def test_serve_command_checks_and_extra(monkeypatch, capsys):
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.max_batch, args.max_queue) == ("127.0.0.1", 8000, 16, 64)
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be from 0 to 65535" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)
    assert main(["serve"]) == 2
    assert 'pip install -e ".[serve]"' in capsys.readouterr().err


@pytest.mark.subprocess
def test_help_does_not_import_the_web_stack():
    import subprocess
    import sys

    code = ("import sys; from captioner.cli import main\n"
            "try: main(['serve', '--help'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'keras', 'numpy', 'PIL')\n"
            "             if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={**os.environ})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "127.0.0.1" in result.stdout and result.stdout.strip().endswith("[]")


@pytest.mark.slow
@pytest.mark.shared
def test_bundled_model_serves_what_caption_json_prints(tmp_path, capsys):
    """data/example.jpg and 8 Flickr8k test photos (when ../shared has them): the service's
    default answer is `captioner caption --json`'s caption and score, and beam_size=1 is
    `caption --beam-size 1`."""
    from conftest import FLICKR_IMAGES, FLICKR_TEXT, ROOT

    from captioner.formats.run_folder import DEFAULT_RUN

    paths = [ROOT / "data" / "example.jpg"]
    split = FLICKR_TEXT / "Flickr_8k.testImages.txt"
    if split.is_file():
        paths += [FLICKR_IMAGES / n for n in split.read_text().split()[:8]]
    engine = Engine.from_run(DEFAULT_RUN)
    with _client(engine) as client:
        for flags, fields in (([], {}), (["--beam-size", "1"], {"beam_size": 1})):
            assert main(["caption", *map(str, paths), "--json", *flags]) == 0
            cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            answer = _post(client, *[(p.name, p.read_bytes(), "image/jpeg") for p in paths],
                           **fields).json()["results"]
            assert [(a["caption"], a["score"]) for a in answer] == [
                (c["caption"], c["score"]) for c in cli], flags


def test_serve_takes_the_caption_decoding_options_and_several_models(capsys):
    args = build_parser().parse_args(["serve", "--model", "a", "b", "--alpha", "0.5",
                                      "--block-ngram", "0"])
    assert args.model == ["a", "b"] and (args.alpha, args.block_ngram, args.beam_size) == (
        0.5, 0, None)  # unset: the model's stored decoding
    assert main(["serve", "--beam-size", "0"]) == 2
    assert "--beam-size must be from 1 to" in capsys.readouterr().err


def test_glibc_is_told_to_return_freed_blocks():
    """ONNX serving sets a fixed 1 MiB mmap threshold (RSS 363 -> 211 MiB over 60 batches)."""
    import platform

    from captioner.serve.engine import return_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert return_freed_memory() is True
