"""Peak memory and images/s of `captioner caption` by batch size, before and after the search
kept its per-image state once per image (issue #28), on both runtimes, in one run.

    python benchmarks/bench_memory.py memory --images ../shared/imagenet-sample
    python benchmarks/bench_memory.py equality --images ../shared/flickr8k/Flicker8k_Dataset \\
        --split ../shared/flickr8k/Flickr8k_text/Flickr_8k.testImages.txt --limit 100

``memory``: one whole ``captioner caption DIR --batch-size B --json --runtime R`` process per
(version, runtime, batch size): wall seconds, images/s (photos / wall, model loading included)
and peak resident memory (``os.wait4`` of the child). "before" is the code of ``--baseline``
(default: the commit this change started from, unpacked with ``git archive`` into a temporary
folder and put first on PYTHONPATH), "after" this checkout; both caption with this checkout's
bundled model (its export's step graph takes the per-image inputs once per image, which the old
code feeds with one row per beam: the same arithmetic). Also counts the captions of each run that
differ from the same runtime's "after" captions at batch 16. ``equality``: in one process per
runtime, the captions and scores of the first ``--limit`` photos of a split at batch sizes
1, 16 and 256. Each mode prints a table and ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "3fa14c2"  # the last commit before the per-image search state
RUNTIMES = ("keras", "onnx")
MODEL = ROOT / "weights" / "default"


def unpack(commit: str, folder: Path) -> Path:
    """``captioner/`` of ``commit`` under ``folder`` (git archive), for PYTHONPATH."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "captioner"], check=True, capture_output=True
    ).stdout
    folder.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def caption_run(code: Path, images: Path, runtime: str, batch: int, extra: list[str]) -> dict:
    """One ``captioner caption`` process: wall seconds, peak MiB and its captions."""
    env = {**os.environ, "PYTHONPATH": str(code), "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [
        sys.executable,
        "-m",
        "captioner.cli",
        "caption",
        str(images.resolve()),
        "--json",
        "--batch-size",
        str(batch),
        "--runtime",
        runtime,
        "--model",
        str(MODEL),
        *extra,
    ]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        # cwd: the code's own folder (``python -m`` puts the cwd first on sys.path)
        proc = subprocess.Popen(cmd, env=env, cwd=code, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        lines = [json.loads(line) for line in out.read().decode().splitlines() if line.strip()]
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    captions = {str(r["image"]): r.get("caption") for r in lines}
    return {
        "wall_s": round(wall, 1),
        "images_per_s": round(len(lines) / wall, 2),
        "peak_mib": round(usage.ru_maxrss / 1024),
        "images": len(lines),
        "captions": captions,
    }


def memory(args: argparse.Namespace) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"before": unpack(args.baseline, Path(tmp) / "before"), "after": ROOT}
        if args.snapshot:  # this checkout's code as it is now: edits during the run do not count
            versions["after"] = Path(tmp) / "after"
            shutil.copytree(ROOT / "captioner", versions["after"] / "captioner")
        for runtime in args.runtimes:
            for batch in args.batches:
                for version in ("after", "before"):
                    if version == "before" and args.no_baseline:
                        continue
                    found = caption_run(versions[version], args.images, runtime, batch, [])
                    found.update(version=version, runtime=runtime, batch=batch)
                    rows.append(found)
                    print(
                        f"{version:6} {runtime:5} batch {batch:4}: {found['wall_s']:7.1f} s "
                        f"{found['images_per_s']:6.2f} img/s {found['peak_mib']:6} MiB",
                        flush=True,
                    )
    for row in rows:
        ref = next(
            (
                r
                for r in rows
                if r["version"] == "after"
                and r["runtime"] == row["runtime"]
                and r["batch"] == min(args.batches, key=lambda b: abs(b - 16))
            ),
            None,
        )
        row["differ_from_after_16"] = (
            sum(row["captions"][k] != ref["captions"].get(k) for k in row["captions"])
            if ref
            else None
        )
    return {
        "images": str(args.images),
        "baseline": args.baseline,
        "runs": [{k: v for k, v in r.items() if k != "captions"} for r in rows],
    }


def equality(args: argparse.Namespace) -> dict:
    """Captions and scores of the first ``--limit`` split photos at every batch size."""
    sys.path.insert(0, str(ROOT))
    from captioner.inference.loader import load_captioner

    names = Path(args.split).read_text().split()[: args.limit]
    paths = [Path(args.images) / n for n in names]
    result = {}
    for runtime in args.runtimes:
        captioner = load_captioner(None, runtime=runtime)
        found = {b: captioner.caption(paths, batch_size=b) for b in args.batches}
        ref = found[args.batches[0]]
        result[runtime] = {
            str(b): {
                "same_captions": sum(x.text == y.text for x, y in zip(ref, got, strict=True)),
                "max_score_diff": max(
                    abs(x.score - y.score) for x, y in zip(ref, got, strict=True)
                ),
            }
            for b, got in found.items()
        }
        print(runtime, json.dumps(result[runtime]), flush=True)
    return {"photos": len(paths), "batches": args.batches, "runtimes": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "imagenet-sample")
    m.add_argument("--batches", type=int, nargs="+", default=[256, 64, 16, 1])
    m.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    m.add_argument("--baseline", default=BASELINE, help="commit of the 'before' code")
    m.add_argument("--no-baseline", action="store_true", help="measure this checkout only")
    m.add_argument(
        "--snapshot",
        action="store_true",
        help="copy this checkout's captioner/ first (edits during the run do not count)",
    )
    e = sub.add_parser("equality")
    e.add_argument("--images", type=Path, required=True)
    e.add_argument("--split", type=Path, required=True)
    e.add_argument("--limit", type=int, default=100)
    e.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    e.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    args = parser.parse_args(argv)
    result = memory(args) if args.mode == "memory" else equality(args)
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
