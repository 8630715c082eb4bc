"""Operator checks of ``captioner serve`` on localhost, bounded in count and time: a graceful
drain under load, slow clients beside normal ones, a burst of malformed requests and a soak.

Starts ``captioner serve`` (``--model``, default weights/default) on a free loopback port with a
fresh API key, runs the scenarios and prints one ``RESULT {json}`` line. Every scenario stops by
itself; nothing listens beyond 127.0.0.1.

(a) **slow**: ``--slow`` raw connections declare a 1 MB upload and trickle one byte every 0.2 s
    while ``--clients`` normal clients send ``--requests`` requests; the normal latencies are
    compared with the same load without slow clients (the slow ones end with 408).
(b) **malformed**: ``--malformed`` requests cycling through bad multipart, wrong content types,
    text where files belong, unknown fields, bad numbers, zero-byte and truncated images, huge
    headers, missing and wrong keys: each must be a 4xx answer with a one-line JSON error, and
    the service must answer normally afterwards.
(c) **soak**: ``--soak`` one-image requests from ``--clients`` clients; resident memory after
    the first tenth (warm-up) and at the end (growth must stay within 5%).
(d) **drain**: ``--clients`` clients send requests in a loop; SIGTERM after one second; every
    request the service accepted must be answered 200, the others 503 (or refused once the
    socket is closed), and the service must exit 0 within its drain timeout.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import (  # noqa: E402
    ROOT,
    free_port,
    load_photos,
    parsed,
    rss_mb,
    run_requests,
    served_model_parser,
    wait_ready,
)

SMOKE = {"clients": 4, "requests": 16, "slow": 2, "malformed": 40, "soak": 200}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = served_model_parser(__doc__)
    p.add_argument("--clients", type=int, default=8, help="normal clients (default %(default)s)")
    p.add_argument("--requests", type=int, default=64, help="requests in (a) (default %(default)s)")
    p.add_argument("--slow", type=int, default=3, help="slow clients in (a) (default %(default)s)")
    p.add_argument("--malformed", type=int, default=500, help="requests in (b) (default %(default)s)")
    p.add_argument("--soak", type=int, default=5000, help="requests in (c) (default %(default)s)")
    p.add_argument("--body-timeout", type=float, default=5.0,
                   help="the server's --body-timeout (default %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=20.0,
                   help="the server's --drain-timeout (default %(default)s)")
    return parsed(p, argv, SMOKE)


class Server:
    """``captioner serve`` (or any command line) on a free loopback port, with an API key."""

    def __init__(self, command: list[str], key: str, port: int):
        self.key, self.port = key, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile("w+")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                        stderr=self.log, text=True)

    @classmethod
    def captioner(cls, model: Path, body_timeout: float, drain_timeout: float,
                  folder: Path) -> Server:
        key, port = secrets.token_urlsafe(24), free_port()
        keys = folder / "keys.txt"
        keys.write_text(key + "\n")
        command = [sys.executable, "-m", "captioner.cli", "serve", "--model", str(model),
                   "--port", str(port), "--log-level", "warning", "--api-key-file", str(keys),
                   "--body-timeout", str(body_timeout), "--drain-timeout", str(drain_timeout)]
        return cls(command, key, port)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def ready(self, timeout: float = 600) -> float:
        import httpx

        self.process.log = self.log  # what wait_ready shows if the server dies
        with httpx.Client(timeout=10) as client:
            return wait_ready(client, self.url, self.process, timeout)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def slow_clients(server: Server, photos: list, clients: int, requests: int, slow: int,
                 body_timeout: float) -> dict:
    """(a): normal latency without and with ``slow`` trickling connections."""
    baseline = run_requests(server.url, photos, requests, clients, 3, headers=server.auth)
    stop = threading.Event()
    answers: list[str] = []

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=body_timeout + 30) as s:
            head = (f"POST /v1/captions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.key}"
                    "\r\nContent-Type: multipart/form-data; boundary=zz\r\nContent-Length: "
                    f"{2**20}\r\n\r\n--zz\r\nContent-Disposition: form-data; name=\"images\"; "
                    "filename=\"slow.png\"\r\nContent-Type: image/png\r\n\r\n")
            s.sendall(head.encode())  # a valid start, then the file's bytes one by one
            s.settimeout(0.2)
            while not stop.is_set():
                try:
                    s.sendall(b"z")
                    data = s.recv(4096)  # the service's answer, once it gives up on us
                    if data:
                        answers.append(data.split(b"\r\n", 1)[0].decode())
                        return
                except TimeoutError:
                    continue
                except OSError:
                    return

    threads = [threading.Thread(target=trickle) for _ in range(slow)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    loaded = run_requests(server.url, photos, requests, clients, 3, headers=server.auth)
    deadline = time.monotonic() + body_timeout + 10
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    return {"baseline": baseline, "with_slow": loaded, "slow_answers": answers,
            "p50_ratio": round(loaded["p50_ms"] / baseline["p50_ms"], 2)}


def malformed_requests(server: Server, count: int, photo: bytes) -> dict:
    """(b): ``count`` bad requests, each a 4xx with a one-line JSON error; then a good one."""
    import httpx

    url, auth = server.url + "/v1/captions", server.auth
    kinds = {
        "bad multipart": dict(content=b"--nope\r\n\r\n", headers={
            **auth, "Content-Type": "multipart/form-data; boundary=zz"}),
        "no boundary": dict(content=b"x", headers={**auth, "Content-Type": "multipart/form-data"}),
        "json body": dict(json={"images": "x"}, headers=auth),
        "text image": dict(data={"images": "not a file"}, headers=auth),
        "unknown field": dict(files=[("images", ("a.png", photo, "image/png"))],
                              data={"colour": "red"}, headers=auth),
        "bad beam": dict(files=[("images", ("a.png", photo, "image/png"))],
                         data={"beam_size": "many"}, headers=auth),
        "zero bytes": dict(files=[("images", ("a.png", b"", "image/png"))], headers=auth),
        "truncated": dict(files=[("images", ("a.png", photo[: len(photo) // 2], "image/png"))],
                          headers=auth),
        "not an image type": dict(files=[("images", ("a.txt", b"hello", "text/plain"))],
                                  headers=auth),
        "huge header": dict(files=[("images", ("a.png", photo, "image/png"))],
                            headers={**auth, "X-Filler": "y" * 20_000}),
        "no key": dict(files=[("images", ("a.png", photo, "image/png"))]),
        "wrong key": dict(files=[("images", ("a.png", photo, "image/png"))],
                          headers={"Authorization": "Bearer " + "w" * 32}),
    }
    names = list(kinds)
    statuses: dict[str, set[int]] = {}
    problems: list[str] = []
    with httpx.Client(timeout=60) as http:
        for k in range(count):
            name = names[k % len(names)]
            answer = http.post(url, **kinds[name])
            statuses.setdefault(name, set()).add(answer.status_code)
            try:
                error = answer.json()["error"]
                one_line = isinstance(error, str) and "\n" not in error
            except (ValueError, KeyError, TypeError):
                one_line = False
            if not 400 <= answer.status_code < 500 or not one_line:
                problems.append(f"{name}: {answer.status_code} {answer.text[:120]!r}")
        alive = http.post(url, files=[("images", ("a.png", photo, "image/png"))],
                          headers=auth).status_code
    return {"requests": count, "statuses": {k: sorted(v) for k, v in statuses.items()},
            "problems": problems[:5], "n_problems": len(problems), "alive_after": alive == 200}


def soak(server: Server, photos: list, clients: int, count: int) -> dict:
    """(c): RSS after a tenth of ``count`` requests (warm-up) and after all of them."""
    pid = server.process.pid
    warm = run_requests(server.url, photos, max(1, count // 10), clients, 3, headers=server.auth)
    before = rss_mb(pid)
    rest = run_requests(server.url, photos, count - count // 10, clients, 3, pid=pid,
                        headers=server.auth)
    after = rss_mb(pid)
    return {"requests": count, "errors": warm["errors"] + rest["errors"],
            "images_per_s": rest["images_per_s"], "p50_ms": rest["p50_ms"],
            "p95_ms": rest.get("p95_ms"), "p99_ms": rest.get("p99_ms"),
            "rss_mb_warm": before, "rss_mb_end": after,
            "rss_mb_by_quarter": rest["rss_mb_by_quarter"],
            "rss_growth_pct": round(100 * (after - before) / before, 2)}


def drain(server: Server, photos: list, clients: int) -> dict:
    """(d): SIGTERM in the middle of ``clients`` clients' load."""
    import httpx

    statuses: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(timeout=120, headers=server.auth) as http:
            while not stop.is_set():
                name, data = photos[k % len(photos)]
                try:
                    answer = http.post(server.url + "/v1/captions",
                                       files=[("images", (name, data, "image/jpeg"))])
                except httpx.TransportError as exc:  # the socket closed after the drain
                    with lock:
                        failures.append(type(exc).__name__)
                    return
                with lock:
                    statuses.append(answer.status_code)
                if answer.status_code != 200:
                    return

    logged_before = _logged_200(server.stderr())
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(timeout=300)
    exit_s = time.monotonic() - sent
    stop.set()
    for t in threads:
        t.join()
    answered_200 = _logged_200(server.stderr()) - logged_before
    return {"exit_code": code, "exit_s": round(exit_s, 2), "answered": len(statuses),
            "ok": statuses.count(200), "draining_503": statuses.count(503),
            "other": sorted({s for s in statuses if s not in (200, 503)}),
            "transport_errors": len(failures), "server_logged_200": answered_200}


def _logged_200(log: str) -> int:
    """Captioning requests the server's access log says it answered 200."""
    return sum(1 for line in log.splitlines() if " POST /v1/captions 200 " in line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    photos = load_photos(args.images_dir, 8)
    with tempfile.TemporaryDirectory() as folder:
        server = Server.captioner(args.model, args.body_timeout, args.drain_timeout, Path(folder))
        try:
            server.ready()
            result = run_all(server, photos, args)
        finally:
            server.stop()
    print("RESULT " + json.dumps(result))
    return 0


def run_all(server: Server, photos: list, args: argparse.Namespace) -> dict:
    """Scenarios (a), (b), (c) on a running ``server``, then (d), which stops it."""
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (48, 32), (120, 90, 160)).save(png, "PNG")
    result = {
        "slow": slow_clients(server, photos, args.clients, args.requests, args.slow,
                             args.body_timeout),
        "malformed": malformed_requests(server, args.malformed, png.getvalue()),
        "soak": soak(server, photos, args.clients, args.soak),
    }
    result["drain"] = drain(server, photos, args.clients)
    return result


if __name__ == "__main__":
    sys.exit(main())
