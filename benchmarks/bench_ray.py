"""Feature extraction, local engine vs Ray engine, on the same images and encoder.

Each engine fills its own fresh cache from the same N photos (both from a cold start: the
model is built inside the timed region, as a user's command would). Every batch commit to the
cache is timestamped, which splits each run into

- **startup**: from the call until the first batch is in the file (local: building the
  model; Ray: ``ray.init``, starting the actor pool, building the model in each actor);
- **steady state**: images/s between the first and the last commit.

The two caches are then compared byte for byte (``identical``). The Ray run starts its own
local Ray with ``--ray-cpus`` CPUs and shuts it down. The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "flickr8k" / "Flicker8k_Dataset"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--images-dir",
        type=Path,
        default=DEFAULT_IMAGES,
        help="folder of JPEG images (default ../shared/flickr8k/Flicker8k_Dataset)",
    )
    p.add_argument("--n", type=int, default=96, help="images (default 96), e.g. --n 2000")
    p.add_argument(
        "--encoder",
        default="mobilenet_v2_0.5",
        help="encoder (default mobilenet_v2_0.5, offline via $KERAS_HOME/models)",
    )
    p.add_argument("--layer", default="pool", help="feature layer (default pool)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    p.add_argument("--workers", type=int, default=2, help="local decoding threads (default 2)")
    p.add_argument("--actors", type=int, default=1, help="Ray model actors (default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default 0)")
    p.add_argument(
        "--ray-cpus",
        type=int,
        default=None,
        help="CPUs of the local Ray (default: all of this machine's)",
    )
    p.add_argument(
        "--mixed-precision",
        default=None,
        choices=("float16", "bfloat16"),
        help="compute dtype of both engines (GPU), e.g. --mixed-precision float16",
    )
    return p.parse_args(argv)


@contextmanager
def _commit_times() -> Iterator[list[tuple[float, int]]]:
    """Within: every cache commit is timestamped (time, rows done) into the yielded list."""
    from captioner.features.cache_writer import FeatureWriter

    stamps: list[tuple[float, int]] = []
    original = FeatureWriter.commit

    def commit(self, rows, features, failed):
        refused = original(self, rows, features, failed)
        stamps.append((time.perf_counter(), len(rows)))
        return refused

    FeatureWriter.commit = commit
    try:
        yield stamps
    finally:
        FeatureWriter.commit = original


def _split(start: float, stamps: list[tuple[float, int]]) -> dict[str, float]:
    """Startup seconds (to the first commit) and steady images/s (first to last commit)."""
    first, last = stamps[0][0], stamps[-1][0]
    later = sum(n for _, n in stamps[1:])
    steady = later / (last - first) if last > first else float("nan")
    return {"startup_s": round(first - start, 2), "steady_img_s": round(steady, 1),
            "total_s": round(last - start, 2)}  # fmt: skip


def _same(a: Path, b: Path) -> bool:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        return all(np.array_equal(fa[k][()], fb[k][()]) for k in ("features", "names", "status"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from captioner.encoders.images import list_images
    from captioner.engines.ray_extract import extract_ray_with_spec
    from captioner.features.extraction import extract_with_spec

    paths = list_images(str(args.images_dir))[0][: args.n]
    for p in paths:  # both engines find the files in the OS cache
        p.read_bytes()
    common = dict(encoder=args.encoder, layer=args.layer, mixed_precision=args.mixed_precision,
                  batch_size=args.batch_size, progress=False)  # fmt: skip
    result: dict = {"n": len(paths), "encoder": args.encoder, "layer": args.layer,
                    "batch_size": args.batch_size, "cpus": os.cpu_count()}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, _commit_times() as stamps:
        start = time.perf_counter()
        extract_with_spec(paths, Path(tmp) / "local.h5", workers=args.workers, **common)
        result["local"] = _split(start, stamps)
        stamps.clear()
        start = time.perf_counter()  # ray.init is part of the Ray engine's startup
        if args.ray_cpus:
            import ray

            ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
                     logging_level="warning", _temp_dir=str(Path(tmp) / "ray"))  # fmt: skip
        try:
            extract_ray_with_spec(paths, Path(tmp) / "ray.h5", actors=args.actors,
                                  gpus_per_actor=args.gpus_per_actor, **common)  # fmt: skip
        finally:
            if args.ray_cpus:
                ray.shutdown()
        result["ray"] = _split(start, stamps)
        result["identical"] = _same(Path(tmp) / "local.h5", Path(tmp) / "ray.h5")
    result["steady_ratio_ray_over_local"] = round(
        result["ray"]["steady_img_s"] / result["local"]["steady_img_s"], 2
    )
    for engine in ("local", "ray"):
        r = result[engine]
        print(f"{engine:5s}: startup {r['startup_s']:6.2f} s, steady {r['steady_img_s']:7.1f} "
              f"images/s, total {r['total_s']:6.2f} s")  # fmt: skip
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
