"""CLI for stage 4: ``captioner train``."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = """\
example:
  captioner extract Flickr_8k.trainImages.txt --images-dir Flicker8k_Dataset \\
      --encoder mobilenet_v2_0.5 --layer pool --out train.h5
  captioner extract Flickr_8k.devImages.txt --images-dir Flicker8k_Dataset \\
      --encoder mobilenet_v2_0.5 --layer pool --out dev.h5
  captioner train --captions Flickr8k.token.txt --train-features train.h5 \\
      --val-features dev.h5 --decoder merge --epochs 20 --out runs/merge
  captioner train --out runs/merge --resume --epochs 30     # continue / extend a run
  KERAS_BACKEND=jax captioner train ... --batch-size 256 --distribute   # all local GPUs

Which images belong to a split is read from the feature files' image names.
"""


# the options `train --scst` (deprecated: `captioner scst`) reads; it refuses every other one
SCST_READS = ("out", "resume", "captions", "train_features", "val_features", "epochs",
              "learning_rate", "val_bleu_images", "val_beam_size", "select_on", "seed",
              "max_train_images", "quiet", "scst", "init", "samples", "batch_images",
              "sample_top_k", "sample_temperature", "evals_per_epoch", "warmup_epochs")
SCST_ONLY = ("init", "samples", "batch_images", "sample_top_k", "sample_temperature",
             "evals_per_epoch")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``captioner train``."""
    from captioner.commands.options import add_check
    from captioner.commands.scst import add_sampling_options
    from captioner.formats.presets import add_preset_option
    from captioner.train.scst_config import ScstConfig
    from captioner.train.training import SCHEDULES, SELECT_ON, TrainConfig

    d = TrainConfig("", "", "")
    p = sub.add_parser(
        "train",
        help="train an LSTM decoder on cached features",
        description="Train a caption decoder with teacher forcing on cached image features "
        "into a run folder (config.json, tokenizer.json, best/last weights, history.csv, "
        "curves.png, checkpoint for --resume).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to create (or resume)")
    add_preset_option(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last finished epoch (optimizer "
                   "state included); --epochs may extend it; other options come from the run")
    p.add_argument("--captions", metavar="FILE", nargs="+", help="caption file (Flickr8k token "
                   "file, Kaggle captions.txt, COCO JSON or Karpathy dataset_*.json); several "
                   "files are merged (e.g. COCO's train and val files); required unless --resume")
    p.add_argument("--train-features", metavar="H5", help="feature cache of the training images")
    p.add_argument("--val-features", metavar="H5",
                   help="feature cache of the validation images (val loss, BLEU-4, early stopping)")
    p.add_argument("--mirrored-features", metavar="H5",
                   help="feature cache of the training photos mirrored left-right (same names, "
                   "same encoder): each caption is trained on the mirrored view half of the time, "
                   "with 'left' and 'right' swapped. Make it with `captioner extract "
                   "--mirror ...`")
    p.add_argument("--decoder", metavar="KIND", default=None,
                   help="merge (classic tutorial), inject (Show and Tell) or attention (Show, "
                   "Attend and Tell; needs --layer conv features). Default: the preset's "
                   "(attention for 'default', merge for 'classic')")
    p.add_argument("--epochs", type=int, default=None,
                   help="total epochs (default: the preset's, 8 for 'default', 20 for 'classic')")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="captions per batch (default %(default)s)")
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help="word embedding size (default %(default)s)")
    p.add_argument("--units", type=int, default=d.units, help="LSTM units (default %(default)s)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout rate (default %(default)s)")
    p.add_argument("--attention-units", type=int, default=d.attention_units,
                   help="attention MLP size (attention decoder; default %(default)s)")
    p.add_argument("--attention-reg", type=float, default=d.attention_reg,
                   help="doubly stochastic attention regulariser weight (default %(default)s)")
    p.add_argument("--min-count", type=int, default=d.min_count,
                   help="words seen fewer times in training captions become <unk> (default %(default)s)")
    p.add_argument("--max-length", type=int, default=None,
                   help="cap on caption length in tokens incl. <start>/<end> (default: the "
                   "preset's, 22 for 'default'; else the longest training caption)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="Adam learning rate (default: the preset's, 2e-3 for 'default', 1e-3 "
                   "for 'classic'; 2e-5 with --scst)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="learning-rate schedule: constant, cosine (with --warmup-epochs), or "
                   "plateau (halve after --plateau-patience epochs without val-loss progress); "
                   "default: the preset's (cosine for 'default', constant for 'classic')")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"cosine warm-up (default: the preset's, else {d.warmup_epochs})")
    p.add_argument("--plateau-patience", type=int, default=d.plateau_patience, help="(default %(default)s)")
    p.add_argument("--clipnorm", type=float, default=d.clipnorm, help="gradient clipping norm (default %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=None,
                   help="label smoothing of the cross-entropy (default: the preset's, 0.1 for "
                   "'default', 0 for 'classic')")
    p.add_argument("--patience", type=int, default=None,
                   help="early stopping: epochs without val-loss progress (0 disables; default: "
                   "the preset's, 0 (off) for 'default', 5 for 'classic')")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="per-epoch weight files to keep (default %(default)s)")
    p.add_argument("--val-bleu-images", type=int, default=None,
                   help="validation images captioned each epoch for BLEU-4 and CIDEr-D; the best "
                   "epoch on them is saved as best.weights.h5 (default: the preset's, 1000 = "
                   f"the whole Flickr8k dev split for 'default'; else {d.val_bleu_images})")
    p.add_argument("--train-score-images", type=int, default=None,
                   help="training images captioned and scored the same way each epoch "
                   "(train_bleu4, train_cider in history.csv): training scores far above the dev "
                   "ones mean the decoder recites its training captions, and SCST should start "
                   "from an earlier epoch (default: the preset's, 500 for 'default'; else "
                   f"{d.train_score_images}: off)")
    p.add_argument("--val-beam-size", type=int, default=None,
                   help="beam size of those dev captions (1 = greedy; default: the preset's, 3 "
                   "for 'default', 1 for 'classic')")
    p.add_argument("--select-on", choices=SELECT_ON, default=None,
                   help="dev score that selects best.weights.h5 (default: the preset's, "
                   f"bleu4+cider for 'default'; else {d.select_on})")
    p.add_argument("--no-bucket", dest="bucket", action="store_false",
                   help="do not batch captions by length (bucketing skips the padding steps)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")
    p.add_argument("--mixed-precision", action="store_true", help="float16 compute (GPU)")
    p.add_argument("--no-in-memory", dest="in_memory", action="store_false",
                   help="read features from the HDF5 file per batch instead of loading them once")
    p.add_argument("--max-train-images", type=int, default=None, help="use only the first N training images")
    p.add_argument("--distribute", action="store_true",
                   help="data-parallel over all local devices (GPUs, else CPU devices) with "
                   "keras.distribution; needs KERAS_BACKEND=jax; --batch-size is the global batch")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress output")
    g = p.add_argument_group("self-critical fine-tuning: deprecated here, use `captioner scst`")
    g.add_argument("--scst", action="store_true",
                   help="(deprecated: `captioner scst`, same options) fine-tune the run given "
                   "by --init with self-critical sequence training")
    g.add_argument("--init", metavar="RUN_DIR", help="cross-entropy run to start from (with --scst)")
    add_sampling_options(g, ScstConfig("", ""))
    defaults = {a.dest: a.default for a in p._actions}
    add_check(p, lambda args: check_given(args, defaults))
    p.set_defaults(handler=run_train)


def check_given(args: argparse.Namespace, defaults: dict) -> None:
    """``train --scst`` refuses, in one line, every option it would ignore (and plain
    ``train`` the SCST-only ones)."""
    from captioner.errors import CaptionerError

    given = [k for k, v in vars(args).items()
             if k in defaults and v != defaults[k] and k != "preset"]
    if args.scst:
        ignored = [k for k in given if k not in SCST_READS]
        if ignored:
            flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
            raise CaptionerError(f"--scst ignores {flags}: leave {'it' if len(ignored) == 1 else 'them'} "
                                 "out (`captioner scst --help` lists what SCST takes)")
        return
    scst_only = [k for k in given if k in SCST_ONLY]
    if scst_only:
        flags = ", ".join("--" + k.replace("_", "-") for k in scst_only)
        raise CaptionerError(f"{flags} belong{'s' if len(scst_only) == 1 else ''} to "
                             "self-critical fine-tuning: use `captioner scst`")


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``captioner train``."""
    from captioner.errors import CaptionerError
    from captioner.text.captions import caption_inputs
    from captioner.train.training import train

    if args.scst:
        from captioner.commands.options import notice

        notice("train --scst", "captioner scst (same options; --val-images for "
               "--val-bleu-images)")
        return _run_scst(args)
    from captioner.formats.run_folder import CHECKPOINT, CONFIG_FILE

    if not args.resume and not (args.captions and args.train_features):
        raise CaptionerError("--captions and --train-features are required (unless --resume)")
    done = Path(args.out)
    if not args.resume and (done / CONFIG_FILE).exists() and (done / CHECKPOINT).exists():
        raise CaptionerError(f"{done} already holds a run; pass --resume to continue it or "
                             "choose another --out")
    if args.captions:  # several files: merged into one file in the run folder
        args.captions = caption_inputs(args.captions, args.out)[0]
    config = config_from_args(args)
    run = train(config, resume=args.resume, verbose=0 if args.quiet else 1)
    print(f"run folder: {run}")
    return 0


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of the command line: options given, else the preset's, else the
    TrainConfig defaults (with --resume, the run's own settings win later)."""
    from captioner.formats.presets import get_preset
    from captioner.train.training import TrainConfig

    preset = get_preset(args.preset)
    fields = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    for key, value in {"decoder": preset.decoder, **preset.training}.items():
        if getattr(args, key, None) is None and not (args.resume and key == "epochs"):
            values[key] = value  # resuming: the run's own epochs unless --epochs is given
    if args.resume and args.epochs is None:
        values["epochs"] = None  # the run's own schedule
    for required in ("captions", "train_features"):  # taken from the run when resuming
        values[required] = values.get(required) or ""
    return TrainConfig(**values)


def _run_scst(args: argparse.Namespace) -> int:
    """``train --scst``: ``captioner scst`` with train's spelling of the dev-images option."""
    from captioner.commands.scst import check_options, run_scst

    args.val_images = args.val_bleu_images
    check_options(args)
    return run_scst(args)
