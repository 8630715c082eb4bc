"""Time ``captioner caption IMAGE`` as a whole process (the first caption a user waits for)
against a baseline checkout, in turn (A B A B ...), and report median wall time, CPU time and
peak memory (the process's own maximum resident set, from ``os.wait4``).

    git worktree add /tmp/baseline <ref>      # or: git archive <ref> | tar -x -C /tmp/baseline
    python benchmarks/bench_first_caption.py --baseline /tmp/baseline --runs 7

Ends with one line ``RESULT {json}``.
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


def run_once(checkout: Path, image: Path) -> dict[str, float]:
    """One whole ``captioner caption`` process from ``checkout``: wall, cpu seconds, peak MiB."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    cmd = [sys.executable, "-m", "captioner.cli", "caption", str(image)]
    start = time.perf_counter()
    # cwd=checkout: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
    proc = subprocess.Popen(cmd, env=env, cwd=checkout, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} (from {checkout}) failed with status {status}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_mib": usage.ru_maxrss / 1024,
    }  # ru_maxrss is KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, required=True, help="checkout to compare with")
    parser.add_argument("--image", type=Path, default=ROOT / "data" / "example.jpg")
    parser.add_argument("--runs", type=int, default=5, help="counted runs of each (default 5)")
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the uncounted first run of each (smoke tests)",
    )
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "baseline": []}
    for checkout in (ROOT, args.baseline) if args.warmup else ():  # file cache, bytecode
        run_once(checkout, args.image)
    for _ in range(args.runs):
        runs["ours"].append(run_once(ROOT, args.image))
        runs["baseline"].append(run_once(args.baseline, args.image))
    result: dict[str, float] = {"runs": args.runs}
    for name, rows in runs.items():
        for key in ("wall_s", "cpu_s", "peak_mib"):
            result[f"{name}_{key}"] = round(statistics.median(r[key] for r in rows), 3)
    for key in ("wall_s", "cpu_s", "peak_mib"):
        ratios = [a[key] / b[key] for a, b in zip(runs["ours"], runs["baseline"], strict=True)]
        result[f"ratio_{key}"] = round(statistics.median(ratios), 3)
    for key in ("wall_s", "cpu_s", "peak_mib"):
        print(
            f"{key:9s} ours {result[f'ours_{key}']:8.2f}  baseline "
            f"{result[f'baseline_{key}']:8.2f}  ratio (median of pairs) {result[f'ratio_{key}']:.3f}"
        )
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
