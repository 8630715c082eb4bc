"""Decoding speed: the classic per-prefix ``model.predict`` loop vs ``Captioner``'s compiled step.

All variants decode with the SAME trained merge model (a quick one trained here with
``captioner.train.training.train`` on ``--train-images`` images for ``--epochs`` epochs, or a run
folder given with ``--model``), on the same pooled image features:

(a) classic: for each image, start from ``[<start>]``, right-pad the prefix to
    max_length-1, call ``model.predict`` on the whole padded prefix and take the logits at the
    last real position, append the best word, until ``<end>`` or max_length-1 words; one image
    at a time. This is the computation of the tutorial's loop (the full prefix is re-run for
    every word), on our sequence model;
(b) ours greedy, one image at a time: ``Captioner.caption_features(..., batch_size=1)``, the
    decoder-only milliseconds per caption of a single-image request;
(c) ours greedy, ``--batch`` images per call;
(d) ours beam search (``--beam``), batched and one image at a time.

Both greedy loops ban ``<pad>``, ``<start>`` and ``<unk>`` and stop at the same length, so (a) and (b)
must produce the same captions; the script counts how many agree. Every compiled function is
traced before timing (one untimed pass over a few images per variant), and each of our
variants is timed ``--repeats`` times (median reported). Times are decoder-only: features are
precomputed. The last line is ``RESULT {json}``.

Data: by default ../shared/flickr8k relative to the repository (captions, training split and
photos, from which the needed images are extracted with mobilenet_v2_0.5, layer pool, into a
temporary file); ``--features`` names an existing pooled cache of training images instead.
The quick model trains on the first ``--train-images`` images (sorted names) and decodes the
images after them; ``--decode-features`` (e.g. a test-split cache) supplies other images to
decode. With ``--model``, the first ``--n-ours`` images (sorted names) of ``--decode-features``,
else of ``--features``, are decoded (else the first of ``--split``, extracted now).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import (  # noqa: E402  (sibling benchmark script, not a package)
    add_data_args,
    choose_images,
    feature_file,
    feature_names,
    split_captions,
)

from captioner.inference import captioner as _inference  # noqa: E402
from captioner.text.tokenizer import PAD, START, UNK  # noqa: E402

# the ids Captioner.search never emits (<pad>, <start>, <unk>); the classic loop bans the same
BANNED = getattr(_inference, "BANNED_IDS", (PAD, START, UNK))
SMOKE = {"train_images": 6, "epochs": 1, "n": 2, "n_ours": 4, "batch": 2, "repeats": 1,
         "feature_dim": 16, "min_count": 1, "units": 8, "embed": 8}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_args(p)
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a trained run folder (captioner train --out), e.g. --model weights/default; "
        "its decoder must take the same features; default: train a quick merge model here",
    )
    p.add_argument(
        "--decode-features",
        type=Path,
        default=None,
        help="pooled cache whose first images (sorted names) are decoded, e.g. "
        "/work/cache/mnv2_pool_test.h5; default: images of --features after the training ones",
    )
    p.add_argument("--train-images", type=int, default=1000,
                   help="quick model: training images (default 1000)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=2, help="quick model: epochs (default 2)")
    p.add_argument("--embed", type=int, default=256, help="quick model: embedding (default 256)")
    p.add_argument("--units", type=int, default=256, help="quick model: units (default 256)")
    p.add_argument(
        "--n", type=int, default=30, help="images for the slow classic loop (default 30)"
    )
    p.add_argument("--n-ours", type=int, default=300, help="images for ours (default 300)")
    p.add_argument("--batch", type=int, default=100, help="images per batched call (default 100)")
    p.add_argument("--beam", type=int, default=3, help="beam size (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each of ours (default 3)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny end-to-end run (a 6-image, 8-unit model, random features; toy captions "
        "when ../shared is absent): checks the plumbing, the numbers mean nothing",
    )
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.synthetic_features = True
    args.n_ours = max(args.n_ours, args.n)
    return args


# --------------------------------------------------------------------------- model and data


def write_flickr_captions(path: Path, captions: dict[str, list[str]]) -> Path:
    lines = [
        f"{name}#{k}\t{text}" for name, caps in captions.items() for k, text in enumerate(caps)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def quick_run(args, captions_file: Path, features: Path, out: Path) -> Path:
    """Train a merge model with the project's own training code (no validation)."""
    from captioner.train.training import TrainConfig, train

    config = TrainConfig(captions=str(captions_file), train_features=str(features), out=str(out),
                         decoder="merge", epochs=args.epochs, embed_dim=args.embed,
                         units=args.units, min_count=args.min_count, val_bleu_images=0,
                         patience=0, max_train_images=args.train_images)  # fmt: skip
    t = time.perf_counter()
    run = train(config, verbose=0)
    print(f"trained a quick merge model on {args.train_images} images for {args.epochs} "
          f"epoch(s) in {time.perf_counter() - t:.1f} s (not timed)")  # fmt: skip
    return run


def decode_features(path: Path, names: list[str]) -> np.ndarray:
    from captioner.features.cache import open_features
    from captioner.train.batches import read_features

    with open_features(path) as reader:
        return read_features(reader, names)


def images_and_features(args, captions: dict[str, list[str]], tmp: Path):
    """(quick-model training images, images to decode, feature cache of the training images
    or, when there are none, of the decoded ones)."""
    if args.model and args.decode_features is None and args.features is not None:
        args.decode_features = args.features  # a trained model: decode the given cache
    if args.decode_features is not None:
        if not args.decode_features.is_file():
            sys.exit(f"feature cache {args.decode_features} not found (see --help)")
        decode_names = sorted(feature_names(args.decode_features))[: args.n_ours]
        if len(decode_names) < args.n_ours:
            sys.exit(
                f"need {args.n_ours} images in {args.decode_features}, found {len(decode_names)}"
            )
        if args.model:
            return [], decode_names, args.decode_features
        train_names = choose_images(args, captions, args.train_images)
        return train_names, decode_names, feature_file(args, train_names, tmp)
    count = args.n_ours + (0 if args.model else args.train_images)
    chosen = choose_images(args, captions, count)
    split = count - args.n_ours
    return chosen[:split], chosen[split:], feature_file(args, chosen, tmp)


# --------------------------------------------------------------------------- decoding loops


def classic_caption(model, features: np.ndarray, tokenizer) -> tuple[int, ...]:
    """Greedy decoding of one image by re-running the whole padded prefix for every word."""
    from captioner.text.tokenizer import END

    width = tokenizer.max_length - 1
    seq = [START]
    for _ in range(width):
        prefix = np.zeros((1, width), dtype=np.int32)
        prefix[0, : len(seq)] = seq
        logits = model.predict((features[None], prefix), verbose=0)[0, len(seq) - 1]
        logits = np.array(logits, dtype=np.float64)
        logits[list(BANNED)] = -np.inf
        word = int(np.argmax(logits))
        seq.append(word)
        if word == END:
            return tuple(seq[1:-1])
    return tuple(seq[1:])


def run_classic(model, feats: np.ndarray, tokenizer) -> list[tuple[int, ...]]:
    return [classic_caption(model, f, tokenizer) for f in feats]


def run_ours(captioner, feats: np.ndarray, batch: int, beam: int) -> list[tuple[int, ...]]:
    results = captioner.caption_features(feats, batch_size=batch, beam_size=beam)
    return [r[0].tokens for r in results]


def timed(fn, repeats: int = 1):
    """(result of the last call, median seconds over ``repeats`` calls)."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import keras

    from captioner.inference.captioner import Captioner

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        captions = split_captions(args)
        train_names, decode_names, features = images_and_features(args, captions, tmp)
        if args.model:
            captioner = Captioner.from_run(args.model)
            model_desc = str(args.model)
        else:
            captions_file = args.captions
            if not captions_file.is_file():  # --smoke without ../shared: toy captions
                captions_file = write_flickr_captions(tmp / "captions.txt", captions)
            captioner = Captioner.from_run(quick_run(args, captions_file, features, tmp / "run"))
            model_desc = f"quick merge model ({args.train_images} images, {args.epochs} epochs)"
        feats = decode_features(args.decode_features or features, decode_names)
    model, tokenizer = captioner.decoder, captioner.tokenizer
    n, n_ours = args.n, args.n_ours

    t = time.perf_counter()
    run_classic(model, feats[:1], tokenizer)
    for batch, beam in ((1, 1), (args.batch, 1), (args.batch, args.beam), (1, args.beam)):
        run_ours(captioner, feats[: min(max(batch, 2), n_ours)], batch, beam)  # full-size calls
    print(f"traced and warmed up every variant in {time.perf_counter() - t:.1f} s (not timed)")

    classic, classic_s = timed(lambda: run_classic(model, feats[:n], tokenizer))
    greedy1, greedy1_s = timed(lambda: run_ours(captioner, feats, 1, 1), args.repeats)
    greedyb, greedyb_s = timed(lambda: run_ours(captioner, feats, args.batch, 1), args.repeats)
    beamb, beamb_s = timed(lambda: run_ours(captioner, feats, args.batch, args.beam), args.repeats)
    beam1, beam1_s = timed(lambda: run_ours(captioner, feats, 1, args.beam), args.repeats)

    ms = {
        "classic": 1000 * classic_s / n,
        "greedy1": 1000 * greedy1_s / n_ours,
        "greedyb": 1000 * greedyb_s / n_ours,
        "beamb": 1000 * beamb_s / n_ours,
        "beam1": 1000 * beam1_s / n_ours,
    }
    agree = sum(a == b for a, b in zip(classic, greedy1[:n], strict=True))
    agree_batched = sum(a == b for a, b in zip(greedy1, greedyb, strict=True))
    words = float(np.mean([len(c) for c in greedy1]))
    ratio = ms["classic"] / ms["greedy1"]
    print(f"model: {model_desc}; vocabulary {tokenizer.vocab_size}, max_length "
          f"{tokenizer.max_length}, features {feats.shape[1:]}; greedy captions average "
          f"{words:.1f} words")  # fmt: skip
    print(
        f"(a) classic predict loop, 1 image at a time: {ms['classic']:8.2f} ms/caption ({n} images)"
    )
    print(
        f"(b) ours greedy, 1 image at a time:          {ms['greedy1']:8.2f} ms/caption ({n_ours} images)"
    )
    print(f"(c) ours greedy, {args.batch} images per call:      {ms['greedyb']:8.2f} ms/caption")
    print(
        f"(d) ours beam {args.beam}, {args.batch} images per call:      {ms['beamb']:8.2f} ms/caption"
    )
    print(f"    ours beam {args.beam}, 1 image at a time:        {ms['beam1']:8.2f} ms/caption")
    print(f"greedy speed-up (a)/(b): {ratio:.1f}x; (a) and (b) agree on {agree}/{n} captions; "
          f"(b) and (c) agree on {agree_batched}/{n_ours}")  # fmt: skip
    for name, tokens in list(zip(decode_names, greedy1, strict=False))[:3]:
        print(f"  {name}: {tokenizer.decode(tokens)}")
    result = {
        "ratio": round(ratio, 2),
        "classic_ms_per_caption": round(ms["classic"], 2),
        "ours_greedy_ms_per_caption": round(ms["greedy1"], 2),
        "ours_greedy_batched_ms_per_caption": round(ms["greedyb"], 3),
        "ours_beam3_ms_per_caption": round(ms["beamb"], 3),
        "ours_beam3_single_ms_per_caption": round(ms["beam1"], 2),
        "agree": agree,
        "n_classic": n,
        "n_ours": n_ours,
        "agree_batched": agree_batched,
        "batch": args.batch,
        "beam": args.beam,
        "mean_words": round(words, 2),
        "vocab_size": tokenizer.vocab_size,
        "backend": keras.backend.backend(),
        "cpus": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
