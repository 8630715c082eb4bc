"""The settings of a self-critical fine-tuning run (standard library only: the CLI shows its
defaults without importing numpy or Keras)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ScstConfig:
    """Every argument of a self-critical fine-tuning run; saved under "scst" in config.json."""

    init: str  # run folder of the cross-entropy model to start from
    out: str  # run folder to create (or resume)
    init_epoch: int | None = None  # start from the init run's checkpoints/epoch-NNN weights
    # (None: its best.weights.h5); an earlier, less memorised epoch is SCST's better start
    captions: str | None = None  # default: the caption file the init run was trained on
    train_features: str | None = None  # default: the init run's training cache
    val_features: str | None = None  # default: the init run's validation cache
    epochs: int = 3
    samples: int = 5  # captions sampled per image (the others' mean is each one's baseline)
    top_k: int = 0  # sample from each step's top_k words only (0: the whole vocabulary)
    temperature: float = 1.0  # sampling temperature
    evals_per_epoch: int = 1  # dev scores this many times per epoch (the curve in curve.csv)
    batch_images: int = 16  # images per step (batch_images * samples sequences)
    learning_rate: float = 2e-5
    warmup_epochs: float = 0.0  # linear warm-up of the learning rate from 0 (Adam's first
    # steps are sign-sized: without it they knock a converged model off its optimum)
    clipnorm: float = 5.0
    val_images: int = 1000  # dev images captioned after every epoch (0: none)
    val_beam_size: int | None = None  # None: the run's stored decoding's beam size
    select_on: str = "bleu4+cider"
    seed: int = 0
    max_train_images: int | None = None
