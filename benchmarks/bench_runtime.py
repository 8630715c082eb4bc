"""The two runtimes of one model side by side: ONNX Runtime (the run's ``captioner export``)
against Keras, in one run on one machine.

    python benchmarks/bench_runtime.py cold --runs 5            # whole `captioner caption` processes
    python benchmarks/bench_runtime.py cold --baseline ../base  # + the ONNX runtime of another checkout
    python benchmarks/bench_runtime.py throughput --images DIR  # captions/s, batches 1, 16, 128
    python benchmarks/bench_runtime.py equality --images DIR --split SPLIT --captions TOKENS --limit 1000

``cold``: wall time and peak resident memory (``os.wait4``) of ``captioner caption
data/example.jpg --runtime R``, runtimes alternated (``--baseline DIR``: also ``onnx`` of the
source tree DIR, e.g. a ``git worktree`` of an older commit, as ``onnx@baseline``). ``throughput``: captions/s from image files
(decode, encoder, default beam search) after one warm-up batch. ``equality``: both runtimes
caption the same photos from their files; share of identical captions and BLEU-1..4 / CIDEr-D of
each. Each mode ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("onnx", "keras")


def cold_once(runtime: str, image: Path, model: str | None, root: Path = ROOT) -> dict[str, float]:
    """One whole ``captioner caption`` process of the source tree ``root``: wall seconds and
    peak MiB."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "captioner.cli", "caption", str(image), "--runtime", runtime]
    cmd += ["--model", model] if model else []
    start = time.perf_counter()
    # cwd=root: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_mib": usage.ru_maxrss / 1024,
        "caption": out.strip(),
    }


def cold(args: argparse.Namespace) -> dict:
    import compileall

    trees = {r: (r, ROOT) for r in RUNTIMES}
    if args.baseline:
        trees["onnx@baseline"] = ("onnx", args.baseline.resolve())
    for _, root in trees.values():
        compileall.compile_dir(root / "captioner", quiet=1)  # as `pip install` leaves it
    runs: dict[str, list[dict]] = {r: [] for r in trees}
    for _ in range(args.runs):
        for label, (runtime, root) in trees.items():
            runs[label].append(cold_once(runtime, args.image, args.model, root))
    result = {}
    for runtime, found in runs.items():
        result[runtime] = {
            "wall_s_median": round(statistics.median(r["wall_s"] for r in found), 3),
            "cpu_s_median": round(statistics.median(r["cpu_s"] for r in found), 3),
            "peak_mib_median": round(statistics.median(r["peak_mib"] for r in found), 1),
            "caption": found[0]["caption"],
        }
        print(
            f"{runtime:13s} wall {result[runtime]['wall_s_median']:.2f} s  peak "
            f"{result[runtime]['peak_mib_median']:.0f} MiB  {found[0]['caption']}"
        )
    result["load_average"] = os.getloadavg()[0]
    result["speedup"] = round(result["keras"]["wall_s_median"] / result["onnx"]["wall_s_median"], 2)
    result["same_caption"] = result["onnx"]["caption"] == result["keras"]["caption"]
    if args.baseline:
        base = result["onnx@baseline"]
        result["vs_baseline"] = round(base["wall_s_median"] / result["onnx"]["wall_s_median"], 2)
    return result


def _images(args: argparse.Namespace) -> list[str]:
    folder = Path(args.images)
    if args.split:
        names = [n for n in Path(args.split).read_text().split() if (folder / n).is_file()]
    else:
        names = sorted(p.name for p in folder.glob("*.jpg"))
    return [str(folder / n) for n in names[: args.limit]]


def throughput(args: argparse.Namespace) -> dict:
    from captioner.inference.loader import load_captioner

    paths = _images(args)
    result = {}
    for runtime in RUNTIMES:
        captioner = load_captioner(args.model, runtime=runtime)
        result[runtime] = {}
        for batch in (1, 16, 128):
            captioner.caption(paths[:batch], batch_size=batch)  # warm-up (compiles on Keras)
            n = min(len(paths), max(16, args.per_batch * batch))
            start = time.perf_counter()
            captioner.caption(paths[:n], batch_size=batch)
            rate = n / (time.perf_counter() - start)
            result[runtime][f"batch_{batch}"] = round(rate, 2)
            print(f"{runtime:6s} batch {batch:3d}: {rate:.2f} captions/s ({n} images)", flush=True)
    return result


def _scores(refs: dict, hyps: dict) -> dict[str, float]:
    from captioner.evaluation.metrics import cider_d, corpus_bleu_scores

    scores = corpus_bleu_scores(refs, hyps)
    scores["cider_d"] = cider_d(refs, hyps)[0]
    return {k: round(float(v), 4) for k, v in scores.items()}


def equality(args: argparse.Namespace) -> dict:
    from captioner.inference.loader import load_captioner
    from captioner.text.captions import load_captions
    from captioner.text.cleaning import clean_captions

    paths = _images(args)
    texts = {}
    for runtime in RUNTIMES:
        captioner = load_captioner(args.model, runtime=runtime)
        start = time.perf_counter()
        found = captioner.caption(paths, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        texts[runtime] = {Path(r.image).name: r.text for r in found}
        print(f"{runtime}: {len(paths)} photos in {seconds:.0f} s", flush=True)
    names = list(texts["onnx"])
    same = sum(texts["onnx"][n] == texts["keras"][n] for n in names)
    result = {
        "photos": len(names),
        "identical": same,
        "identical_pct": round(100 * same / len(names), 2),
        "differing": [
            (n, texts["onnx"][n], texts["keras"][n])
            for n in names
            if texts["onnx"][n] != texts["keras"][n]
        ][:10],
    }
    if args.captions:
        refs = clean_captions(load_captions(args.captions))
        refs = {n: refs[n] for n in names if n in refs}
        for runtime in RUNTIMES:
            result[runtime] = _scores(refs, {n: texts[runtime][n] for n in refs})
        result["delta"] = {
            k: round(result["onnx"][k] - result["keras"][k], 4) for k in result["onnx"]
        }
    print(f"identical: {same}/{len(names)} ({result['identical_pct']}%)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("cold", "throughput", "equality"))
    parser.add_argument(
        "--model", default=None, help="run folder carrying an export (default: the bundled model)"
    )
    parser.add_argument("--image", type=Path, default=ROOT / "data" / "example.jpg")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="cold: also time this source tree's onnx")
    parser.add_argument("--images", help="folder of photos (throughput, equality)")
    parser.add_argument("--split", help="file of photo names to use, one a line")
    parser.add_argument(
        "--captions", help="reference captions (Flickr8k.token.txt) for BLEU/CIDEr-D"
    )
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--per-batch", type=int, default=2, help="batches timed per batch size")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    result = {"cold": cold, "throughput": throughput, "equality": equality}[args.mode](args)
    print("RESULT " + json.dumps({"mode": args.mode, **result}))


if __name__ == "__main__":
    main()
