"""Attention-decoder training speed: length-bucketed batches against padded batches.

Both sides train the same ``AttentionDecoder`` (same initial weights, Adam, the project's
masked cross-entropy) with ``model.fit`` on a ``CaptionDataset`` over the same captions: the
real cleaned Flickr8k captions of the first ``--images`` training photos (so the length
distribution is the real one), and random features of the bundled model's shape
(``--feature-shape``, default EfficientNet-Lite2's 9x9x1280). (a) pads every batch to the
longest caption of the data set (``bucket=False``); (b) groups captions of similar length and
trims each batch (``bucket=True``). Each side is warmed up with one epoch (graph tracing not
timed), then the sides alternate ``--rounds`` timed epochs so that machine load hits both
alike. The result is captions per second and the full 30,000-caption epoch extrapolated.
The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "flickr8k" / "Flickr8k_text"


class RandomFeatures:
    """In-memory random features for the given image names."""

    def __init__(self, names: list[str], shape: tuple[int, ...], seed: int = 0) -> None:
        self.feature_shape = shape
        rng = np.random.default_rng(seed)
        self.table = {n: rng.random(shape, dtype=np.float32) for n in names}

    def read(self, names):
        return np.stack([self.table[n] for n in names])

    def __contains__(self, name: str) -> bool:
        return name in self.table


def load(args: argparse.Namespace):
    from captioner.text.captions import load_captions, load_split
    from captioner.text.cleaning import clean_captions
    from captioner.text.tokenizer import Tokenizer

    captions = load_captions(TEXT / "Flickr8k.token.txt")
    train = [n for n in load_split(TEXT / "Flickr_8k.trainImages.txt") if n in captions]
    all_caps = clean_captions({n: captions[n] for n in train})
    tokenizer = Tokenizer.build([c for cs in all_caps.values() for c in cs], min_count=5,
                                max_length=22)
    names = train[: args.images]
    return {n: all_caps[n] for n in names}, tokenizer


def make_model(tokenizer, shape, seed: int):
    import keras

    from captioner.model.decoders import MaskedSparseCrossEntropy, build_decoder

    keras.utils.set_random_seed(seed)
    model = build_decoder("attention", vocab_size=tokenizer.vocab_size,
                          max_length=tokenizer.max_length, feature_shape=shape)
    model.compile(optimizer=keras.optimizers.Adam(1e-3, clipnorm=5.0),
                  loss=MaskedSparseCrossEntropy(0.1))
    return model


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300, help="training photos (x5 captions)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="timed epochs per side")
    p.add_argument("--feature-shape", default="9,9,1280")
    args = p.parse_args(argv)

    from captioner.train.batches import CaptionDataset, EpochStream

    shape = tuple(int(s) for s in args.feature_shape.split(","))
    captions, tokenizer = load(args)
    source = RandomFeatures(list(captions), shape)
    sides = {}
    for name, bucket in (("padded", False), ("bucketed", True)):
        ds = CaptionDataset(source, captions, tokenizer, batch_size=args.batch_size, seed=0,
                            in_memory=True, bucket=bucket)
        model = make_model(tokenizer, shape, seed=0)
        model.fit(EpochStream(ds), steps_per_epoch=len(ds), epochs=1, verbose=0)  # warm-up
        steps = sum(ds[i][0][1].shape[1] for i in range(len(ds)))
        sides[name] = {"ds": ds, "model": model, "times": [], "decoder_steps": steps}
    for _ in range(args.rounds):
        for name in ("padded", "bucketed", "bucketed", "padded")[: 4 if args.rounds > 1 else 2]:
            side = sides[name]
            start = time.perf_counter()
            side["model"].fit(EpochStream(side["ds"]), steps_per_epoch=len(side["ds"]),
                              epochs=1, verbose=0)
            side["times"].append(time.perf_counter() - start)
    n = sides["padded"]["ds"].num_samples
    from bench_extract import device_name

    result = {"captions": n, "batch_size": args.batch_size, "feature_shape": list(shape),
              "device": device_name()}
    for name, side in sides.items():
        best = float(np.median(side["times"]))
        result[name] = {"epoch_s": round(best, 2), "captions_s": round(n / best, 1),
                        "full_epoch_min": round(30000 / (n / best) / 60, 1),
                        "decoder_steps": side["decoder_steps"]}
    result["speedup"] = round(result["bucketed"]["captions_s"] / result["padded"]["captions_s"], 2)
    print(f"padded:   {result['padded']['captions_s']} captions/s "
          f"(~{result['padded']['full_epoch_min']} min per 30k-caption epoch)")
    print(f"bucketed: {result['bucketed']['captions_s']} captions/s "
          f"(~{result['bucketed']['full_epoch_min']} min per 30k-caption epoch)")
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
