"""Training throughput: full-sequence teacher forcing vs the classic per-prefix tutorial.

Both sides use the same image features, the same vocabulary (``Tokenizer.build`` with
``--min-count`` over the cleaned captions of the WHOLE training split, so the vocabulary size
and the caption length are those of a real run) and the same merge model size:

(a) ours: ``MergeDecoder`` + ``MaskedSparseCrossEntropy`` trained with ``model.fit`` on an
    ``EpochStream`` over a ``CaptionDataset`` (batch ``--batch-size``, in-memory features,
    Adam with clipnorm 5), exactly as ``captioner.train.training.train`` sets it up;
(b) classic: the tutorial's functional merge model (photo (D,) and a pre-padded prefix of
    length max_length-1; Embedding(mask_zero=True) + LSTM; categorical cross-entropy on
    ONE-HOT targets; Adam) fed by ``progressive.ProgressiveLoader`` (benchmarks/progressive.py): one photo per step,
    every caption prefix its own sample, ``steps_per_epoch`` = number of photos.

Each side runs in its OWN child process (this script re-runs itself with ``--side``), so the
peak resident memory (``VmHWM`` on Linux, TensorFlow's own footprint included) is measured
separately for each. The parent starts both, lets them build and warm up, then alternates their
timed rounds (ours, classic, classic, ours, ...; ``--rounds``) so that a change in the machine's
load hits both sides alike; only one side computes at a time. Model build, ``compile`` and
graph tracing are not timed: ours is warmed up with one full epoch (this also traces the
smaller last batch), the classic model with ``--warmup-steps`` photo steps. In each round ours
makes ``--ours-epochs`` passes over the captions of the ``--images`` photos; the classic side
makes ONE pass over those photos in all, split over the rounds. Throughput is in captions per
second, a caption being one (image, caption) pair seen once (one classic photo step = that
photo's 5 captions). The per-epoch time of each side is extrapolated to the full 6,000-image /
30,000-caption Flickr8k training split.

Features: ``--features`` names a pooled feature cache (e.g. one written by
``captioner extract ... --layer pool``); without it the script extracts the ``--images``
photos itself with mobilenet_v2_0.5 (ImageNet weights, offline from ``$KERAS_HOME/models/``)
into a temporary file, reading ../shared/flickr8k relative to the repository by default.
The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "flickr8k"
DEFAULT_CAPTIONS = FLICKR / "Flickr8k_text" / "Flickr8k.token.txt"
DEFAULT_SPLIT = FLICKR / "Flickr8k_text" / "Flickr_8k.trainImages.txt"
DEFAULT_IMAGES = FLICKR / "Flicker8k_Dataset"
FULL_SPLIT_CAPTIONS = 30_000  # Flickr8k training split: 6,000 images x 5 captions
SMOKE = {"images": 6, "embed": 8, "units": 8, "ours_epochs": 1, "warmup_steps": 1, "rounds": 2,
         "batch_size": 8, "feature_dim": 16, "min_count": 1}  # fmt: skip
SIDES = ("ours", "classic")
TOY_WORDS = "a dog cat man woman child runs jumps sits on the in red blue grass water ball".split()


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Options naming the data (shared with bench_decode.py)."""
    p.add_argument(
        "--captions",
        type=Path,
        default=DEFAULT_CAPTIONS,
        help="caption file (default ../shared/flickr8k/Flickr8k_text/Flickr8k.token.txt "
        "relative to the repository)",
    )
    p.add_argument(
        "--split",
        type=Path,
        default=DEFAULT_SPLIT,
        help="training split, one image name a line (default "
        "../shared/flickr8k/Flickr8k_text/Flickr_8k.trainImages.txt)",
    )
    p.add_argument(
        "--images-dir",
        type=Path,
        default=DEFAULT_IMAGES,
        help="photos to extract features from when --features is not given (default "
        "../shared/flickr8k/Flicker8k_Dataset)",
    )
    p.add_argument(
        "--features",
        type=Path,
        default=None,
        help="pooled feature cache (HDF5) holding the training images, e.g. "
        "--features /work/cache/mnv2_pool_train.h5; default: extract them now with "
        "mobilenet_v2_0.5 (layer pool) into a temporary file",
    )
    p.add_argument(
        "--synthetic-features",
        action="store_true",
        help="use random features of --feature-dim instead of real ones (plumbing checks)",
    )
    p.add_argument("--feature-dim", type=int, default=1280, help=argparse.SUPPRESS)
    p.add_argument(
        "--min-count",
        type=int,
        default=5,
        help="vocabulary: words seen at least this often in the training split (default 5)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_args(p)
    p.add_argument(
        "--images",
        type=int,
        default=300,
        help="training images whose captions are timed (default 300, i.e. 1,500 captions; "
        "the classic side then takes about a minute), e.g. --images 600",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="timed rounds, alternating the two sides (default 6); the classic side makes ONE "
        "pass over the photos in all, split over the rounds",
    )
    p.add_argument(
        "--ours-epochs",
        type=int,
        default=1,
        help="passes of ours over the captions in each round (default 1)",
    )
    p.add_argument(
        "--warmup-steps", type=int, default=5, help="untimed classic photo steps (default 5)"
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per caption, <start> and <end> included (default: longest caption + 2, "
        "like `captioner train`; weights/default was trained with --max-length 25)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="our batch size (default 64)")
    p.add_argument("--embed", type=int, default=256, help="embedding size (default 256)")
    p.add_argument("--units", type=int, default=256, help="LSTM/Dense units (default 256)")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout rate (default 0.5)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny end-to-end run (6 images, 8 units, random features; toy captions when "
        "../shared is absent): checks the plumbing, the numbers mean nothing",
    )
    p.add_argument("--side", choices=("ours", "classic"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.synthetic_features = True
    return args


# --------------------------------------------------------------------------- data


def toy_captions(n_images: int, seed: int = 0) -> dict[str, list[str]]:
    """Cleaned random captions for ``n_images`` made-up images (when ../shared is absent)."""
    rng = np.random.default_rng(seed)
    return {
        f"toy{i:04d}.jpg": [" ".join(rng.choice(TOY_WORDS, rng.integers(4, 12))) for _ in range(5)]
        for i in range(n_images)
    }


def split_captions(args: argparse.Namespace, toy_images: int = 40) -> dict[str, list[str]]:
    """Cleaned captions of every image of the training split, in sorted name order (toy
    captions in --smoke mode when the caption file is missing)."""
    from captioner.text.captions import load_captions, load_split
    from captioner.text.cleaning import clean_captions

    if not args.captions.is_file():
        if getattr(args, "smoke", False):
            return toy_captions(toy_images)
        sys.exit(f"caption file {args.captions} not found; pass --captions (see --help)")
    captions = load_captions(args.captions)
    names = load_split(args.split) if args.split.is_file() else list(captions)
    kept = {n: captions[n] for n in sorted(names) if n in captions}
    if not kept:
        sys.exit(f"none of the images of {args.split} has a caption in {args.captions}")
    return clean_captions(kept)


def build_tokenizer(captions: dict[str, list[str]], min_count: int, max_length: int | None = None):
    from captioner.text.tokenizer import Tokenizer

    texts = [c for caps in captions.values() for c in caps]
    return Tokenizer.build(texts, min_count=min_count, max_length=max_length)


def feature_names(path: Path) -> set[str]:
    from captioner.features.cache import open_features

    with open_features(path) as reader:
        return set(reader.done_names)


def write_synthetic(path: Path, names: list[str], dim: int, seed: int = 0) -> Path:
    """A complete feature cache of random non-negative (ReLU-like) pooled features."""
    from captioner.features.cache_writer import FeatureWriter

    rng = np.random.default_rng(seed)
    feats = np.maximum(rng.normal(0.0, 1.0, (len(names), dim)), 0).astype(np.float32)
    attrs = {"encoder": "synthetic", "layer": "pool", "weights": "random",
             "input_size": [224, 224], "preprocessing": "none", "feature_shape": [dim],
             "dtype": "float32", "format_version": 1}  # fmt: skip
    FeatureWriter.create(path, names, (dim,), "float32", attrs)
    with FeatureWriter(path) as writer:
        writer.commit(list(range(len(names))), feats, {})
    return path


def feature_file(args: argparse.Namespace, names: list[str], tmp: Path) -> Path:
    """A feature cache holding ``names``: --features, synthetic, or extracted now."""
    if args.features is not None:
        return args.features
    out = tmp / "features.h5"
    if args.synthetic_features:
        return write_synthetic(out, names, args.feature_dim)
    from captioner.features.extraction import extract_with_spec

    paths = [args.images_dir / n for n in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"{missing[0]} not found; pass --images-dir or --features (see --help)")
    t = time.perf_counter()
    summary = extract_with_spec(paths, out, "mobilenet_v2_0.5", layer="pool", progress=False)
    print(f"extracted {summary.done} images with mobilenet_v2_0.5 in "
          f"{time.perf_counter() - t:.1f} s (not timed)")  # fmt: skip
    return out


def choose_images(
    args: argparse.Namespace, captions: dict[str, list[str]], count: int
) -> list[str]:
    """The first ``count`` images (sorted names) that have features (when --features is given)."""
    names = list(captions)
    if args.features is not None:
        if not args.features.is_file():
            sys.exit(f"feature cache {args.features} not found (see --help)")
        have = feature_names(args.features)
        names = [n for n in names if n in have]
    if len(names) < count:
        sys.exit(f"need {count} training images with captions and features, found {len(names)}")
    return names[:count]


class MemorySource:
    """Features of a few images held in a dict, like the tutorial's loaded feature file."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table
        self.feature_shape = next(iter(table.values())).shape

    def read(self, names):
        return np.stack([self.table[n] for n in names])

    def __contains__(self, name) -> bool:
        return name in self.table


def load_memory_source(path: Path, names: list[str]) -> MemorySource:
    from captioner.features.cache import open_features

    with open_features(path) as reader:
        rows = np.asarray(reader.read(names), dtype=np.float32)
    if rows.ndim != 2:
        sys.exit(f"{path} holds features of shape {rows.shape[1:]}; pass a pooled (D,) cache")
    return MemorySource(dict(zip(names, rows, strict=True)))


# --------------------------------------------------------------------------- models


def classic_model(vocab_size: int, max_length: int, feature_dim: int, embed: int, units: int,
                  dropout: float):  # fmt: skip
    """The tutorial's functional merge model: one next-word softmax per padded prefix."""
    import keras
    from keras import layers

    photo = keras.Input(shape=(feature_dim,), name="photo")
    image = layers.Dense(units, activation="relu")(layers.Dropout(dropout)(photo))
    prefix = keras.Input(shape=(max_length - 1,), name="prefix")
    words = layers.Embedding(vocab_size, embed, mask_zero=True)(prefix)
    words = layers.LSTM(units)(layers.Dropout(dropout)(words))
    hidden = layers.Dense(units, activation="relu")(layers.add([image, words]))
    probs = layers.Dense(vocab_size, activation="softmax")(hidden)
    model = keras.Model([photo, prefix], probs)
    model.compile(loss="categorical_crossentropy", optimizer="adam")
    return model


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process image alone
    (``ru_maxrss`` would start from the PARENT's peak: Linux carries it across fork + exec).
    Elsewhere ``ru_maxrss`` (run the children from a small parent there)."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def setup_side(args: argparse.Namespace):
    """Build and warm up one side in this (child) process.

    Returns ``(info, run_round)``; ``run_round(r)`` trains round ``r`` and returns
    ``(captions, steps, seconds)``."""
    import keras
    from progressive import ProgressiveLoader

    from captioner.model.decoders import MaskedSparseCrossEntropy, build_decoder
    from captioner.train.batches import CaptionDataset, EpochStream

    rss_start = peak_rss_mb()
    captions = split_captions(args)
    tokenizer = build_tokenizer(captions, args.min_count, args.max_length)
    names = choose_images(args, captions, args.images)
    source = load_memory_source(args.features, names)
    chosen = {n: captions[n] for n in names}
    dim = int(source.feature_shape[0])
    keras.utils.set_random_seed(0)
    info = {"side": args.side, "images": len(names), "vocab_size": tokenizer.vocab_size,
            "max_length": tokenizer.max_length, "feature_dim": dim, "rss_start_mb": rss_start}  # fmt: skip
    t = time.perf_counter()
    if args.side == "ours":
        dataset = CaptionDataset(source, chosen, tokenizer, batch_size=args.batch_size,
                                 shuffle=True, seed=0, in_memory=True)  # fmt: skip
        model = build_decoder("merge", vocab_size=tokenizer.vocab_size,
                              max_length=tokenizer.max_length, feature_shape=[dim],
                              embed_dim=args.embed, units=args.units, dropout=args.dropout)  # fmt: skip
        model.compile(optimizer=keras.optimizers.Adam(1e-3, clipnorm=5.0),
                      loss=MaskedSparseCrossEntropy())  # fmt: skip
        steps = len(dataset)
        model.fit(EpochStream(dataset), steps_per_epoch=steps, epochs=1, shuffle=False, verbose=0)
        info["warmup"] = f"1 full epoch ({steps} steps)"

        def run_round(r: int) -> tuple[int, int, float]:
            stream = EpochStream(dataset, start_epoch=1 + r * args.ours_epochs)
            t = time.perf_counter()
            model.fit(stream, steps_per_epoch=steps, epochs=args.ours_epochs, shuffle=False,
                      verbose=0)  # fmt: skip
            seconds = time.perf_counter() - t
            return dataset.num_samples * args.ours_epochs, steps * args.ours_epochs, seconds

    else:
        loader = ProgressiveLoader(source, chosen, tokenizer)
        model = classic_model(tokenizer.vocab_size, tokenizer.max_length, dim, args.embed,
                              args.units, args.dropout)  # fmt: skip
        model.fit(loader.generate(), steps_per_epoch=args.warmup_steps, epochs=1, verbose=0)
        info["warmup"] = f"{args.warmup_steps} photo steps"
        # one pass over the photos in total, split over the rounds
        bounds = np.linspace(0, len(loader.names), args.rounds + 1).round().astype(int)

        def run_round(r: int) -> tuple[int, int, float]:
            part = loader.names[bounds[r] : bounds[r + 1]]
            sub = ProgressiveLoader(source, {n: chosen[n] for n in part}, tokenizer)
            t = time.perf_counter()
            model.fit(sub.generate(), steps_per_epoch=len(part), epochs=1, verbose=0)
            seconds = time.perf_counter() - t
            return sum(len(chosen[n]) for n in part), len(part), seconds

    info["warmup_seconds"] = time.perf_counter() - t
    return info, run_round


def child_main(args: argparse.Namespace) -> int:
    """Child protocol on stdin/stdout: ``READY {json}`` after the warm-up, then one ``ROUND
    {json}`` per ``run R`` line read, and ``DONE {json}`` (peak RSS) on ``stop``."""
    info, run_round = setup_side(args)
    print("READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[:1] == ["run"]:
            captions, steps, seconds = run_round(int(command[1]))
            print("ROUND " + json.dumps({"captions": captions, "steps": steps, "seconds": seconds}),
                  flush=True)  # fmt: skip
        elif command[:1] == ["stop"]:
            break
    print("DONE " + json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)
    return 0


# --------------------------------------------------------------------------- parent


class Child:
    """One side's process, driven line by line (its stderr goes to a temporary file)."""

    def __init__(self, argv: list[str], side: str, features: Path, log: Path):
        self.side, self.log = side, log
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--side", side,
               "--features", str(features)]  # fmt: skip
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        self.stderr = open(log, "w")  # noqa: SIM115 (closed in finish)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=env)  # fmt: skip

    def expect(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1 :])
        self.proc.wait()
        self.stderr.close()
        sys.stderr.write(self.log.read_text()[-4000:])
        sys.exit(f"the {self.side} child failed (exit code {self.proc.returncode})")

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def finish(self) -> dict:
        self.send("stop")
        done = self.expect("DONE")
        self.proc.stdin.close()
        self.proc.wait()
        self.stderr.close()
        return done

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def measure(argv: list[str], features: Path, rounds: int, tmp: Path) -> dict[str, dict]:
    """Start both children (built and warmed up side by side, never timed), then alternate
    their timed rounds in the order ours, classic, classic, ours, ... so that a change in the
    machine's load hits both sides alike. Both stay alive, so their memory peaks stay apart."""
    children = {side: Child(argv, side, features, tmp / f"{side}.log") for side in SIDES}
    try:
        info = {side: child.expect("READY") for side, child in children.items()}
        for side in SIDES:
            info[side] |= {"captions": 0, "steps": 0, "seconds": 0.0, "rounds": []}
        for r in range(rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                children[side].send(f"run {r}")
                got = children[side].expect("ROUND")
                for key in ("captions", "steps", "seconds"):
                    info[side][key] += got[key]
                info[side]["rounds"].append(got["captions"] / got["seconds"])
        for side, child in children.items():
            info[side] |= child.finish()
    finally:
        for child in children.values():
            child.kill()
    for side in SIDES:
        info[side]["captions_s"] = info[side]["captions"] / info[side]["seconds"]
    return info


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.side:
        return child_main(args)
    import keras

    captions = split_captions(args)
    names = choose_images(args, captions, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        features = feature_file(args, names, Path(tmp))
        measured = measure(argv, features, args.rounds, Path(tmp))
    ours, classic = measured["ours"], measured["classic"]
    ratio = ours["captions_s"] / classic["captions_s"]
    per_round = [a / b for a, b in zip(ours["rounds"], classic["rounds"], strict=True)]
    print(f"data: {ours['images']} training images, vocabulary {ours['vocab_size']} "
          f"(min count {args.min_count} over the whole split), max_length {ours['max_length']}, "
          f"features ({ours['feature_dim']},), model embed {args.embed} / units {args.units} / "
          f"dropout {args.dropout}; {args.rounds} interleaved round(s)")  # fmt: skip
    for label, r in (("(a) ours   ", ours), ("(b) classic", classic)):
        per_epoch = FULL_SPLIT_CAPTIONS / r["captions_s"]
        print(f"{label}: {r['captions']} captions in {r['seconds']:.1f} s = "
              f"{r['captions_s']:.1f} captions/s ({r['steps']} steps; warm-up {r['warmup']}, "
              f"{r['warmup_seconds']:.1f} s, not timed); full split epoch ~ "
              f"{per_epoch / 60:.1f} min; peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(after start-up {r['rss_start_mb']:.0f} MB)")  # fmt: skip
    print(f"speed-up {ratio:.1f}x (captions/s, ours / classic); per round: "
          f"{', '.join(f'{x:.1f}x' for x in per_round)}")  # fmt: skip
    result = {
        "ratio": round(ratio, 2),
        "ours_captions_s": round(ours["captions_s"], 1),
        "classic_captions_s": round(classic["captions_s"], 1),
        "ours_peak_rss_mb": round(ours["peak_rss_mb"]),
        "classic_peak_rss_mb": round(classic["peak_rss_mb"]),
        "ours_epoch_s_full_split": round(FULL_SPLIT_CAPTIONS / ours["captions_s"], 1),
        "classic_epoch_s_full_split": round(FULL_SPLIT_CAPTIONS / classic["captions_s"], 1),
        "images": ours["images"],
        "ours_captions": ours["captions"],
        "classic_captions": classic["captions"],
        "ratio_per_round": [round(x, 2) for x in per_round],
        "vocab_size": ours["vocab_size"],
        "max_length": ours["max_length"],
        "batch_size": args.batch_size,
        "units": args.units,
        "backend": keras.backend.backend(),
        "cpus": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
