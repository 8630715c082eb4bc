"""CLI: ``captioner scst`` — self-critical fine-tuning of a trained run (CIDEr-D reward).

Formerly ``captioner train --scst`` (still accepted for one release, with a notice)."""

from __future__ import annotations

import argparse

EXAMPLE = """\
examples:
  captioner scst --init runs/attention --out runs/attention-scst
  captioner scst --init runs/attention --out runs/attention-scst --epochs 5 --sample-top-k 5
  captioner scst --init runs/attention --init-epoch 4 --out runs/attention-scst
  captioner scst --out runs/attention-scst --resume --epochs 8      # continue / extend

The caption file and feature caches default to the ones the --init run was trained on.
Start from an epoch that has not yet memorised its training captions (train with
--keep-checkpoints 8 and pass --init-epoch): a run whose training-split CIDEr-D is far above its
dev CIDEr-D gets its reward from captions it has learnt by heart, and SCST then gains little on
dev or falls apart (docs/RESULTS.md, issue #23).
"""

def register(sub: argparse._SubParsersAction) -> None:
    """Add ``captioner scst``."""
    from captioner.commands.options import add_check, add_output_options
    from captioner.train.scst_config import ScstConfig
    from captioner.train.training import SELECT_ON

    d = ScstConfig("", "")  # the defaults' one owner
    p = sub.add_parser(
        "scst",
        help="fine-tune a trained run with self-critical training (CIDEr-D reward)",
        description="Self-critical sequence training: sample captions from a trained run, "
        "reward each by its CIDEr-D against the references minus the mean reward of the "
        "other samples of its image, and fine-tune the decoder on that reward into a new run "
        "folder (best.weights.h5 chosen on dev, curve.csv, checkpoint for --resume).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_scst_options(p, d, SELECT_ON)
    add_output_options(p, out="run folder to create (or resume)", out_metavar="RUN_DIR",
                       required=True, quiet="no progress bar and no per-epoch lines")
    add_check(p, check_options)
    p.set_defaults(handler=run_scst)


def add_sampling_options(g, d) -> None:
    """How SCST samples and scores (shared with the deprecated ``train --scst``); defaults shown
    from ``d``, a default ScstConfig."""
    g.add_argument("--samples", type=int, default=d.samples,
                   help="captions sampled per image; each one's baseline is the mean reward of "
                   "the others (default %(default)s)")
    g.add_argument("--batch-images", type=int, default=d.batch_images,
                   help="images per step (default %(default)s)")
    g.add_argument("--sample-top-k", type=int, default=None, metavar="K",
                   help=f"sample each word from the model's K most likely words only (default "
                   f"{d.top_k}; 0: the whole vocabulary)")
    g.add_argument("--sample-temperature", type=float, default=None,
                   help=f"sampling temperature (default {d.temperature})")
    g.add_argument("--evals-per-epoch", type=int, default=None,
                   help="score the dev images this many times per epoch; reward and scores go "
                   f"to curve.csv in the run folder (default {d.evals_per_epoch})")


def add_scst_options(p: argparse.ArgumentParser, d, select_on: tuple[str, ...]) -> None:
    """The options of ``captioner scst`` (defaults shown from ``d``, a default ScstConfig)."""
    g = p.add_argument_group("self-critical fine-tuning")
    g.add_argument("--init", metavar="RUN_DIR",
                   help="cross-entropy run to start from (required unless --resume)")
    g.add_argument("--init-epoch", type=int, default=None, metavar="N",
                   help="start from the --init run's epoch N checkpoint (checkpoints/"
                   "epoch-NNN.weights.h5) instead of its best weights: a model that has not yet "
                   "memorised its training captions learns more from SCST's reward")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last finished epoch")
    g.add_argument("--captions", metavar="FILE", nargs="+",
                   help="caption file(s) (default: the --init run's)")
    g.add_argument("--train-features", metavar="H5", help="training cache (default: the --init run's)")
    g.add_argument("--val-features", metavar="H5", help="dev cache (default: the --init run's)")
    g.add_argument("--epochs", type=int, default=None, help=f"total epochs (default {d.epochs})")
    add_sampling_options(g, d)
    g.add_argument("--learning-rate", type=float, default=None,
                   help=f"Adam learning rate (default {d.learning_rate:g})")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear learning-rate warm-up from 0 over this many epochs (default "
                   f"{d.warmup_epochs:g}); Adam's first steps are sign-sized and knock a "
                   "converged model off its optimum without it")
    g.add_argument("--val-images", type=int, default=None,
                   help=f"dev images scored each time (default {d.val_images}; 0: none)")
    g.add_argument("--val-beam-size", type=int, default=None,
                   help="beam size of those dev captions (default: the run's stored decoding's)")
    g.add_argument("--select-on", choices=select_on, default=None,
                   help=f"dev score that selects best.weights.h5 (default {d.select_on})")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")
    g.add_argument("--max-train-images", type=int, default=None,
                   help="use only the first N training images")


def check_options(args: argparse.Namespace) -> None:
    """The options of an SCST run, each on its own, before anything loads."""
    from captioner import option_checks as checks
    from captioner.errors import CaptionerError

    if not args.resume and not args.init:
        raise CaptionerError("scst needs --init RUN_DIR (a cross-entropy run to fine-tune), "
                             "or --resume")
    checks.at_least("--samples", args.samples, 2, " (each sample's baseline is the others)")
    for option, minimum in (("epochs", 1), ("batch_images", 1), ("sample_top_k", 0),
                            ("evals_per_epoch", 1), ("val_images", 0), ("init_epoch", 1), ("val_beam_size", 1),
                            ("max_train_images", 1)):
        checks.at_least(option, getattr(args, option, None), minimum)  # train --scst: no --init-epoch
    if args.resume and getattr(args, "init_epoch", None) is not None:
        raise CaptionerError("--init-epoch chooses where a new run starts; --resume continues "
                             "from the run's own last epoch")
    checks.at_least("sample_temperature", args.sample_temperature, 1e-6)


def config_from(args: argparse.Namespace):
    """The ScstConfig of the command line: options given, else ScstConfig's defaults."""
    from captioner.train.scst_config import ScstConfig

    d = ScstConfig("", "")
    given = {"epochs": args.epochs, "learning_rate": args.learning_rate,
             "val_images": args.val_images, "val_beam_size": args.val_beam_size,
             "select_on": args.select_on, "top_k": args.sample_top_k,
             "temperature": args.sample_temperature, "evals_per_epoch": args.evals_per_epoch,
             "warmup_epochs": getattr(args, "warmup_epochs", None)}
    return ScstConfig(
        init=args.init or "", out=args.out, init_epoch=getattr(args, "init_epoch", None), captions=args.captions,
        train_features=args.train_features, val_features=args.val_features,
        samples=args.samples, batch_images=args.batch_images, seed=args.seed,
        max_train_images=args.max_train_images,
        **{k: (v if v is not None else getattr(d, k)) for k, v in given.items()},
    )


def run_scst(args: argparse.Namespace) -> int:
    """Handler of ``captioner scst`` (and of the deprecated ``train --scst``)."""
    from captioner.text.captions import caption_inputs
    from captioner.train.scst import train_scst

    if args.captions and isinstance(args.captions, list):  # several files: merged into one
        args.captions = caption_inputs(args.captions, args.out)[0]
    run = train_scst(config_from(args), resume=args.resume, verbose=not args.quiet)
    print(f"run folder: {run}")
    return 0
