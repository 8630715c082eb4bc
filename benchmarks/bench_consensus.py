"""What consensus reranking costs per photo: the model's stored decoding against the same beam
without reranking and against the previous default (beam 3, no reranking), in one run on one
machine, on precomputed features (decoder and reranking only; the encoder is the same for all).

    python benchmarks/bench_consensus.py --features cache/lite2_conv_test.h5 [--model weights/default]
        [--n 200] [--batch-size 8] [--repeats 3] [--runtime onnx|keras]

Each variant is warmed up on one batch, then timed ``--repeats`` times over the first ``--n``
rows of the cache (median). Ends with one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # label -> decoding overrides of the model's stored decoding
    "stored": {},
    "same beam, no reranking": {"consensus": 0},
    "beam 3, no reranking": {"beam_size": 3, "consensus": 0},
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, required=True, help="feature cache of test photos")
    p.add_argument("--model", type=Path, default=ROOT / "weights" / "default")
    p.add_argument("--n", type=int, default=200, help="photos (first rows of the cache)")
    p.add_argument("--batch-size", type=int, default=8, help="photos per caption call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runtime", choices=("onnx", "keras"), default="onnx")
    args = p.parse_args(argv)

    from captioner.features.cache import open_features
    from captioner.inference.loader import load_captioner

    with open_features(args.features) as reader:
        names = list(reader.done_names)[: args.n]
        feats = np.asarray(reader.read(sorted(names)), dtype="float32")
    captioner = load_captioner(args.model, runtime=args.runtime)
    result = {"decoding": captioner.decoding.label, "runtime": args.runtime, "n": len(feats),
              "batch_size": args.batch_size, "load_avg_1min": round(os.getloadavg()[0], 2)}
    for label, overrides in VARIANTS.items():
        captioner.caption(feats[: args.batch_size], batch_size=args.batch_size, **overrides)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            captioner.caption(feats, batch_size=args.batch_size, **overrides)
            times.append((time.perf_counter() - start) / len(feats) * 1000)
        result[label] = round(statistics.median(times), 1)
        print(f"{label:26s} {result[label]:6.1f} ms a photo", flush=True)
    result["reranking_ms"] = round(result["stored"] - result["same beam, no reranking"], 1)
    result["ratio_vs_beam3"] = round(result["stored"] / result["beam 3, no reranking"], 2)
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
