"""Load test of ``captioner serve`` on localhost: one-at-a-time vs concurrent clients.

Starts ``captioner serve`` (``--model``, default weights/default) as a subprocess on a free
localhost port, waits for ``GET /healthz``, sends a few untimed warm-up requests, then:

(a) **one at a time**: one client sends ``--sequential`` requests, each waiting for the last
    (one image per request) — what a caller gets without concurrency;
(b) **concurrent**: ``--clients`` threads share ``--requests`` requests (one image each, the
    photos taken round-robin), so the service batches images of different requests. An
    untimed concurrent round of ``--warmup`` × ``--clients`` requests comes first, so every
    batch size has been compiled before the memory is measured.

Reported: p50/p95/p99 latency per request, images/s of (a) and (b) and their ratio, the
errors (any answer but 200, or no answer; must be 0), the batches the server formed (from
``/healthz``), and the server's resident memory (psutil) before (b) and after each quarter of
it (``--requests 1000`` by default). The last line is
``RESULT {json}``.

Several runtimes in one run (``--runtime keras onnx``, and ``--baseline DIR``: also the ONNX
runtime of the source tree DIR, e.g. an older commit, as ``onnx@baseline``): the servers run one
after the other, each measured as above, and the RESULT holds ``runs`` (label -> result) and
``vs_keras`` (each run's (b) images/s over Keras's).

Photos: the first ``--n-images`` JPEGs (sorted) of ``--images-dir`` (default
../shared/flickr8k/Flicker8k_Dataset), else synthetic 320×240 pictures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "flickr8k" / "Flicker8k_Dataset"
SMOKE = {"clients": 2, "requests": 8, "sequential": 4, "n_images": 4, "warmup": 2}


def served_model_parser(doc: str) -> argparse.ArgumentParser:
    """The options every serving benchmark shares: the model to serve and the photos to send."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "weights" / "default",
                   help="run folder to serve (default: weights/default)")
    p.add_argument("--images-dir", type=Path, default=IMAGES, help="photos to send")
    p.add_argument("--smoke", action="store_true", help="small counts (a check that it runs)")
    return p


def parsed(p: argparse.ArgumentParser, argv: list[str] | None, smoke: dict) -> argparse.Namespace:
    """``p``'s arguments, with the ``smoke`` counts when ``--smoke`` is given."""
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in smoke.items():
            setattr(args, key, value)
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = served_model_parser(__doc__)
    p.add_argument("--n-images", type=int, default=20, help="distinct photos (default %(default)s)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients in (b) (default %(default)s)")
    p.add_argument("--requests", type=int, default=1000, help="requests in (b) (default %(default)s)")
    p.add_argument("--sequential", type=int, default=50, help="requests in (a) (default %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="untimed requests first (default %(default)s)")
    p.add_argument("--beam-size", type=int, default=3, help="beam_size of every request (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue (default %(default)s)")
    p.add_argument("--runtime", choices=("keras", "onnx"), nargs="+", default=[None],
                   help="the server's --runtime; several: one server after the other (default: "
                   "onnx when the model carries an export)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="also serve the ONNX runtime of this source tree (onnx@baseline)")
    return parsed(p, argv, SMOKE)


def load_photos(folder: Path, n: int) -> list[tuple[str, bytes]]:
    """(name, JPEG bytes) of the first ``n`` photos of ``folder``, else synthetic ones."""
    if folder.is_dir():
        paths = sorted(folder.glob("*.jpg"))[:n]
        if paths:
            return [(p.name, p.read_bytes()) for p in paths]
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = []
    for k in range(n):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(out, "JPEG")
        photos.append((f"synthetic{k}.jpg", out.getvalue()))
    return photos


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, runtime: str | None = None,
                 root: Path = ROOT) -> subprocess.Popen:
    """``captioner serve`` of the source tree ``root`` (its bundled model when ``--model`` is
    the default) on ``runtime``."""
    model = args.model
    if root != ROOT and model == ROOT / "weights" / "default":
        model = root / "weights" / "default"
    command = [sys.executable, "-m", "captioner.cli", "serve", "--model", str(model),
               "--port", str(port), "--log-level", "warning", "--beam-size", str(args.beam_size),
               "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
    command += ["--runtime", runtime] if runtime else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    log = tempfile.TemporaryFile("w+")  # the server's stderr, shown if it dies
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    server.log = log
    return server


def wait_ready(client, url: str, server: subprocess.Popen, timeout: float = 600) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            server.log.seek(0)
            raise SystemExit(f"the server exited ({server.returncode}): {server.log.read()[-2000:]}")
        try:
            if client.get(url + "/healthz").status_code == 200:
                return time.perf_counter() - start
        except Exception:  # not listening yet
            pass
        time.sleep(0.25)
    raise SystemExit("the server did not answer /healthz in time")


def run_requests(url: str, photos: list, count: int, clients: int, beam: int,
                 pid: int | None = None, headers: dict | None = None) -> dict:
    """``count`` one-image requests from ``clients`` threads; latencies and errors, and with
    ``pid`` the server's RSS after each quarter of the requests."""
    import httpx

    marks = {round(count * q / 4) for q in (1, 2, 3, 4)} if pid else set()
    rss_track: list[float] = []
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(count))

    def worker() -> None:
        with httpx.Client(timeout=120, headers=headers) as http:
            while True:
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                name, data = photos[k % len(photos)]
                start = time.perf_counter()
                try:
                    r = http.post(url + "/v1/captions", files=[("images", (name, data, "image/jpeg"))],
                                  data={"beam_size": str(beam)})
                    ok = r.status_code == 200 and "error" not in r.json()["results"][0]
                    why = None if ok else f"{r.status_code} {r.text[:200]}"
                except Exception as exc:
                    why = f"{type(exc).__name__}: {exc}"
                with lock:
                    latencies.append(time.perf_counter() - start)
                    if why:
                        errors.append(why)
                    if len(latencies) in marks:
                        rss_track.append(rss_mb(pid))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"requests": count, "clients": clients, "wall_s": round(wall, 3),
            "images_per_s": round(count / wall, 2), "errors": len(errors),
            "first_errors": errors[:3], **percentiles(latencies),
            **({"rss_mb_by_quarter": rss_track} if pid else {})}


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 and mean latency in milliseconds."""
    if len(values) < 2:
        return {"p50_ms": round(1000 * values[0], 1) if values else None}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50_ms": round(1000 * cuts[49], 1), "p95_ms": round(1000 * cuts[94], 1),
            "p99_ms": round(1000 * cuts[98], 1), "mean_ms": round(1000 * statistics.fmean(values), 1)}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def rss_mb(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    photos = load_photos(args.images_dir, args.n_images)
    servers = [(runtime or "default", runtime, ROOT) for runtime in args.runtime]
    if args.baseline:
        servers.append(("onnx@baseline", "onnx", args.baseline.resolve()))
    runs = {}
    for label, runtime, root in servers:
        print(f"--- {label}")
        runs[label] = bench_server(args, photos, runtime, root)
    if len(runs) == 1:
        result = next(iter(runs.values()))
    else:
        keras = runs.get("keras", {}).get("concurrent", {}).get("images_per_s")
        result = {"runs": runs, "load_average": round(os.getloadavg()[0], 2)}
        if keras:
            result["vs_keras"] = {label: round(r["concurrent"]["images_per_s"] / keras, 2)
                                  for label, r in runs.items()}
            per_cpu = runs["keras"]["concurrent"]["images_per_cpu_s"]
            result["per_cpu_vs_keras"] = {
                label: round(r["concurrent"]["images_per_cpu_s"] / per_cpu, 2)
                for label, r in runs.items()}
            print(f"(b) images/s over keras's: {result['vs_keras']}; images per server CPU "
                  f"second over keras's: {result['per_cpu_vs_keras']}")
    print("RESULT " + json.dumps(result))
    return 0 if all(r["errors"] == 0 for r in runs.values()) else 1


def bench_server(args: argparse.Namespace, photos: list, runtime: str | None, root: Path) -> dict:
    """(a) and (b) against one server of the source tree ``root`` on ``runtime``."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, port, runtime, root)
    try:
        with httpx.Client(timeout=60) as http:
            ready_s = wait_ready(http, url, server)
            print(f"server ready after {ready_s:.1f} s (load + warm-up); {len(photos)} photos")
            run_requests(url, photos, args.warmup, 1, args.beam_size)
            one = run_requests(url, photos, args.sequential, 1, args.beam_size)
            print(f"(a) one at a time: {one}")
            # untimed: every batch size the clients can form is traced before RSS is taken
            run_requests(url, photos, args.warmup * args.clients, args.clients, args.beam_size)
            before, cpu0 = rss_mb(server.pid), cpu_s(server.pid)
            health0 = http.get(url + "/healthz").json()
            many = run_requests(url, photos, args.requests, args.clients, args.beam_size, server.pid)
            after, cpu1 = rss_mb(server.pid), cpu_s(server.pid)
            # the server's own CPU seconds per image: steadier than images/s on a shared machine
            many["server_cpu_s"] = round(cpu1 - cpu0, 1)
            many["images_per_cpu_s"] = round(args.requests / max(cpu1 - cpu0, 1e-9), 2)
            health = http.get(url + "/healthz").json()
            model = http.get(url + "/v1/model").json()
        print(f"(b) {args.clients} concurrent clients: {many}")
        batches = health["batches"] - health0["batches"]
        images = health["images"] - health0["images"]
        result = {
            "ratio": round(many["images_per_s"] / one["images_per_s"], 2),
            "sequential": one, "concurrent": many,
            "errors": one["errors"] + many["errors"],
            "batches": batches, "mean_batch": round(images / max(batches, 1), 2),
            "largest_batch": health["largest_batch"], "rejected_503": health["rejected"],
            "rss_mb_before": before, "rss_mb_after": after,
            "rss_growth_mb": round(after - before, 1),
            "model": model["run"], "encoder": model["encoder"]["name"],
            "decoder": model["decoder"]["kind"], "beam_size": args.beam_size,
            "ready_s": round(ready_s, 1), "cpus": os.cpu_count(),
        }
        print(f"server RSS {before} MB before (b), {after} MB after {args.requests} requests")
        return result
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
