"""Cost of the feature cache's row checks: verified reads against plain h5py reads.

Writes one synthetic cache (random rows of the bundled model's conv shape, 7x7x1280 float32,
so ~250 KB a row) with ``FeatureWriter``, then times, in the same process and on the same file
(already in the OS cache after a warm-up read):

- **(a) plain**: ``h5py`` reads of the ``features`` dataset, the rows only;
- **(b) verified**: ``FeatureReader.read`` (checksum of name + row, finite values, status);
- **(c) verify**: ``FeatureReader.verify()`` over the whole file (what ``extract --verify``
  and a resumed ``extract`` do).

Prints the numbers and ``RESULT {json}`` with (b)/(a) as ``ratio``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from captioner.features.cache import FeatureReader
from captioner.features.cache_writer import FeatureWriter


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64, help="rows per read call")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    shape = (7, 7, 1280)
    names = [f"img{i:06d}.jpg" for i in range(args.rows)]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        FeatureWriter.create(path, names, shape, "float32", {"encoder": "bench", "layer": "conv"})
        with FeatureWriter(path) as writer:
            for lo in range(0, args.rows, args.batch):
                rows = list(range(lo, min(args.rows, lo + args.batch)))
                writer.commit(rows, rng.random((len(rows), *shape), dtype=np.float32), {})
        chunks = [names[lo : lo + args.batch] for lo in range(0, args.rows, args.batch)]

        def plain() -> None:
            with h5py.File(path, "r", locking=False) as f:
                for lo in range(0, args.rows, args.batch):
                    f["features"][lo : lo + args.batch]

        def verified() -> None:
            with FeatureReader(path) as reader:
                for chunk in chunks:
                    reader.read(chunk)

        def verify() -> None:
            with FeatureReader(path) as reader:
                assert reader.verify().ok

        plain()  # warm the OS cache
        a, b, c = (_best(fn, args.repeat) for fn in (plain, verified, verify))
    mb = args.rows * np.prod(shape) * 4 / 1e6
    print(f"{args.rows} rows of {shape} float32 ({mb:.0f} MB), {args.batch} rows per read")
    print(f"(a) plain h5py reads : {a:.3f} s  ({mb / a:.0f} MB/s)")
    print(f"(b) verified reads   : {b:.3f} s  ({mb / b:.0f} MB/s)  {b / a:.2f}x (a)")
    print(f"(c) verify, whole file: {c:.3f} s  ({mb / c:.0f} MB/s)")
    result = {"ratio": round(b / a, 3), "plain_s": round(a, 4), "verified_s": round(b, 4),
              "verify_s": round(c, 4), "rows": args.rows, "mb": round(mb, 1)}  # fmt: skip
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
