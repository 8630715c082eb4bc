"""Feature extraction: the classic one-image-at-a-time tutorial loop vs ``captioner.features.extraction.extract``.

Both run in one process, on the same N images, with the same encoder and weights:

(a) classic: ``keras.utils.load_img(target_size)`` (bilinear) + ``img_to_array`` + the encoder's numpy
    preprocessing + ``model.predict(one_image, verbose=0)``, one image at a time;
(b) ours: ``extract()`` into a temporary HDF5 cache (threaded decoding, prefetching, fixed-size
    batches through ``predict_on_batch``, preprocessing inside the model), file writes included.

Both models are built and warmed up first (one predict call for (a), one small extraction for
(b)), so building and graph compilation are not timed; the image files are read once before
timing so both loops find them in the OS cache. The last line is ``RESULT {json}``.

The default encoder, mobilenet_v2_0.5, works offline when ``$KERAS_HOME/models/`` holds
mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5 (e.g.
``KERAS_HOME=/work/keras_home``, or a folder holding ../shared/weights/ as ``models/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "flickr8k" / "Flicker8k_Dataset"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--images-dir",
        type=Path,
        default=DEFAULT_IMAGES,
        help="folder of JPEG images (default ../shared/flickr8k/Flicker8k_Dataset relative to "
        "the repository), e.g. --images-dir ~/data/Flicker8k_Dataset",
    )
    p.add_argument("--n", type=int, default=200, help="images to time (default 200), e.g. --n 500")
    p.add_argument(
        "--encoder",
        default="mobilenet_v2_0.5",
        help="encoder name (default mobilenet_v2_0.5: offline via $KERAS_HOME/models), "
        "e.g. --encoder vgg16",
    )
    p.add_argument(
        "--layer", default="pool", help="feature layer (default pool), e.g. --layer conv"
    )
    p.add_argument(
        "--weights", default="imagenet", help="imagenet or a weights file (default imagenet)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="our batch size (default 32)")
    p.add_argument("--workers", type=int, default=4, help="our decoding threads (default 4)")
    return p.parse_args(argv)


def device_name() -> str:
    """The accelerator Keras computes on, in words."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return f"{d.platform}:{getattr(d, 'device_kind', '')}"
    if backend == "torch":
        import torch

        return f"cuda:{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
    if backend == "tensorflow":
        import tensorflow as tf  # only when TensorFlow is the backend in use

        gpus = tf.config.list_physical_devices("GPU")
        return f"gpu:{gpus[0].name}" if gpus else "cpu"
    return backend


def classic_model(spec, layer: str, weights):
    """The backbone on *preprocessed* input, tapped at ``layer`` (the tutorial model)."""
    import keras

    feat = spec.layer(layer)
    backbone = spec.build(include_top=feat.needs_top, weights=weights)
    out = backbone.get_layer(feat.layer).output
    if feat.pool:
        out = keras.layers.GlobalAveragePooling2D()(out)
    return keras.Model(backbone.inputs, out)


def run_classic(model, spec, paths: list[Path]) -> np.ndarray:
    import keras

    rows = []
    for path in paths:
        # the resize filter extract() uses (bilinear), so both sides see the same pixels
        img = keras.utils.load_img(path, target_size=spec.input_size, interpolation="bilinear")
        x = spec.preprocess(keras.utils.img_to_array(img)[None])
        rows.append(model.predict(x, verbose=0)[0])
    return np.stack(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import keras

    from captioner.encoders.specs import get_spec
    from captioner.features.cache import FeatureReader
    from captioner.features.extraction import extract

    paths = sorted(args.images_dir.glob("*.jpg"))[: args.n]
    if len(paths) < args.n:
        sys.exit(f"need {args.n} .jpg images in {args.images_dir}, found {len(paths)}")
    for p in paths:
        p.read_bytes()  # into the OS cache for both loops
    spec = get_spec(args.encoder)
    identity = {"encoder": spec.name, "layer": args.layer, "weights": str(args.weights)}
    common = {"input_size": spec.input_size, "batch_size": args.batch_size,
              "workers": args.workers, "progress": False}  # fmt: skip

    t = time.perf_counter()
    classic = classic_model(spec, args.layer, args.weights)
    classic.predict(np.zeros((1, *spec.input_size, 3), np.float32), verbose=0)
    ours = spec.feature_model(args.layer, args.weights)
    print(f"built and warmed up both models in {time.perf_counter() - t:.1f} s (not timed)")

    with tempfile.TemporaryDirectory() as tmp:
        warm = paths[: args.batch_size]
        extract(warm, Path(tmp) / "warm.h5", model=ours, identity=identity, **common)

        t = time.perf_counter()
        classic_feats = run_classic(classic, spec, paths)
        classic_s = time.perf_counter() - t

        t = time.perf_counter()
        summary = extract(paths, Path(tmp) / "ours.h5", model=ours, identity=identity, **common)
        ours_s = time.perf_counter() - t
        with FeatureReader(Path(tmp) / "ours.h5") as reader:
            our_feats = reader.read([p.name for p in paths])
    assert summary.done == len(paths) and not summary.failed

    n = len(paths)
    classic_rate, our_rate = n / classic_s, n / ours_s
    diff = float(np.abs(classic_feats - our_feats).max())
    print(f"(a) classic loop: {n} images in {classic_s:.2f} s = {classic_rate:.1f} images/s")
    print(f"(b) extract():    {n} images in {ours_s:.2f} s = {our_rate:.1f} images/s "
          f"(batch {args.batch_size}, {args.workers} workers)")  # fmt: skip
    print(f"speed-up {our_rate / classic_rate:.2f}x; max |features (a) - (b)| = {diff:.2e}")
    result = {
        "ratio": round(our_rate / classic_rate, 2),
        "classic_img_s": round(classic_rate, 2),
        "ours_img_s": round(our_rate, 2),
        "n": n,
        "encoder": spec.name,
        "layer": args.layer,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "max_abs_diff": diff,
        "backend": keras.backend.backend(),
        "device": device_name(),
        "cpus": os.cpu_count(),
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
