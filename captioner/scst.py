"""Self-critical sequence training (Rennie et al. 2017): fine-tune a cross-entropy run with the
CIDEr-D reward of its own sampled captions.

Each step samples ``samples`` captions for each of ``batch_images`` training images. A
caption's reward is its CIDEr-D against the image's references, with document frequencies
from all training references; its baseline is the mean reward of the other samples of the same
image, so no greedy pass is needed and the advantages of one image sum to zero. The loss
``-(reward - baseline) * log p(caption)`` is the teacher-forced cross-entropy of the sampled
tokens weighted by the advantage.

The result is an ordinary run folder (the decoder and tokenizer of ``--init``, the settings
under ``"scst"`` in ``config.json``), resumable per epoch like every run, with its own
``history.csv`` (mean reward, loss, dev BLEU-4 and CIDEr-D) and ``curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from captioner.errors import CaptionerError

SCST_HISTORY_FIELDS = ("epoch", "reward", "loss", "val_bleu4", "val_cider", "learning_rate",
                       "seconds")


@dataclass
class ScstConfig:
    """Every argument of a self-critical fine-tuning run; saved under "scst" in config.json."""

    init: str  # run folder of the cross-entropy model to start from
    out: str  # run folder to create (or resume)
    captions: str | None = None  # default: the caption file the init run was trained on
    train_features: str | None = None  # default: the init run's training cache
    val_features: str | None = None  # default: the init run's validation cache
    epochs: int = 3
    samples: int = 5  # captions sampled per image (the others' mean is each one's baseline)
    batch_images: int = 16  # images per step (batch_images * samples sequences)
    learning_rate: float = 2e-5
    clipnorm: float = 5.0
    val_images: int = 1000  # dev images captioned after every epoch (0: none)
    val_beam_size: int = 3
    select_on: str = "bleu4+cider"
    seed: int = 0
    max_train_images: int | None = None


def _prepare(config: ScstConfig, resume: bool) -> tuple[Path, dict]:
    """The run folder (created from --init unless resuming) and its config.json payload."""
    from captioner.inference import CONFIG_FILE, TOKENIZER_FILE, read_run_config

    run, init = Path(config.out), Path(config.init)
    if resume:
        return run, read_run_config(run)
    if config.samples < 2:
        raise CaptionerError("--samples must be at least 2 (each sample's baseline is the others)")
    if (run / CONFIG_FILE).exists():
        raise CaptionerError(f"{run} already holds a run; pass --resume or choose another --out")
    base = read_run_config(init)
    training = base.get("training", {})
    for key in ("captions", "train_features", "val_features"):
        value = getattr(config, key) or training.get(key)
        if key != "val_features" and (not value or not Path(value).is_file()):
            raise CaptionerError(
                f"no --{key.replace('_', '-')} given and the one {init} was trained on "
                f"({value}) is not here; pass --{key.replace('_', '-')}"
            )
        setattr(config, key, str(Path(value).resolve()) if value else None)
    run.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(init / TOKENIZER_FILE, run / TOKENIZER_FILE)
    payload = {**base, "scst": dataclasses.asdict(config),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = run / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, run / CONFIG_FILE)
    return run, payload


def _load_model(run: Path, init: Path, payload: dict, config: ScstConfig):
    import keras

    from captioner.decoders import MaskedSparseCrossEntropy, build_decoder
    from captioner.inference import BEST_WEIGHTS, LAST_WEIGHTS

    dec = payload["decoder"]
    model = build_decoder(dec["kind"], **dec["config"])
    start = init / BEST_WEIGHTS if (init / BEST_WEIGHTS).is_file() else init / LAST_WEIGHTS
    model.load_weights(start)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate, clipnorm=config.clipnorm),
        loss=MaskedSparseCrossEntropy(0.0, reduction="sum_over_batch_size"),
    )
    return model


def advantages(rewards: np.ndarray) -> np.ndarray:
    """Reward minus the mean reward of the image's other samples; ``rewards`` is (B, K)."""
    k = rewards.shape[1]
    baseline = (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)
    return rewards - baseline


def sequences(token_lists: list[tuple[int, ...]], finished: list[bool], width: int):
    """Teacher-forcing arrays for sampled captions: (tokens_in, tokens_out, mask), (N, T)."""
    from captioner.tokenizer import END, START

    rows = [[START, *t, *([END] if f else [])] for t, f in zip(token_lists, finished, strict=True)]
    steps = min(max(len(r) for r in rows) - 1, width)
    full = np.zeros((len(rows), steps + 1), dtype=np.int32)
    for i, r in enumerate(rows):
        full[i, : min(len(r), steps + 1)] = r[: steps + 1]
    tokens_in, tokens_out = full[:, :-1], full[:, 1:]
    return tokens_in, tokens_out, (tokens_out != 0).astype(np.float32)


class _Step:
    """One SCST update: sample, score, weight the log-likelihood by the advantage."""

    def __init__(self, model, tokenizer, scorer, config: ScstConfig):
        self.model, self.tokenizer, self.scorer, self.config = model, tokenizer, scorer, config
        self.max_length = tokenizer.max_length - 1

    def __call__(self, names: list[str], feats: np.ndarray, rng: np.random.Generator):
        from captioner.decoding import sample_search
        from captioner.inference import Captioner
        from captioner.tokenizer import END, PAD, START, UNK

        k = self.config.samples
        rep = np.repeat(feats, k, axis=0)  # (B*K, *F), image i's samples are rows i*K..i*K+K-1
        state, step = Captioner(self.model, self.tokenizer).prepare(rep)
        hyps = sample_search(step, state, len(rep), START, END, self.max_length, rng,
                             banned_ids=(PAD, START, UNK))
        texts = [self.tokenizer.decode(h.tokens) for h in hyps]
        rewards = np.stack([self.scorer.score(n, texts[i * k:(i + 1) * k])
                            for i, n in enumerate(names)])  # (B, K)
        adv = advantages(rewards).reshape(-1)
        t_in, t_out, mask = sequences([h.tokens for h in hyps], [h.finished for h in hyps],
                                      self.max_length)
        loss = self.model.train_on_batch((rep, t_in), t_out, sample_weight=mask * adv[:, None])
        return float(rewards.mean()), float(np.asarray(loss).reshape(-1)[0])


def train_scst(config: ScstConfig, resume: bool = False, verbose: bool = True) -> Path:
    """Fine-tune ``config.init`` with self-critical training into ``config.out``."""
    from captioner.data import read_features
    from captioner.inference import BEST_WEIGHTS, LAST_WEIGHTS, TOKENIZER_FILE
    from captioner.metrics import CiderScorer
    from captioner.progress import progress
    from captioner.tokenizer import Tokenizer
    from captioner.training import (
        CHECKPOINT,
        _load_split,
        _val_sample,
        _write_history,
        dev_scores,
        load_checkpoint,
        read_history,
        save_checkpoint,
        save_decoder_weights,
        selection_score,
    )

    run, payload = _prepare(config, resume)
    config = ScstConfig(**{**payload["scst"], "epochs": config.epochs}) if resume else config
    tokenizer = Tokenizer.load(run / TOKENIZER_FILE)
    model = _load_model(run, Path(config.init), payload, config)
    epoch, state = 0, {"best": -1.0}
    if resume and (run / CHECKPOINT).is_file():
        epoch, state = load_checkpoint(run / CHECKPOINT, model)
    reader, caps = _load_split(config.captions, config.train_features, config.max_train_images)
    names = sorted(caps)
    table = read_features(reader, names)  # (N, *F) float32, all training images in memory
    scorer = CiderScorer(caps)
    step = _Step(model, tokenizer, scorer, config)
    view = SimpleNamespace(captions=config.captions, val_features=config.val_features,
                           val_bleu_images=config.val_images)
    val = _val_sample(view)[2]  # (features, references) of the dev images, or None
    rows = read_history(run / "history.csv")
    while epoch < config.epochs:
        started, rng = time.time(), np.random.default_rng((config.seed, epoch))
        order = rng.permutation(len(names))
        rewards, losses = [], []
        with progress(total=len(order), desc=f"scst epoch {epoch + 1}/{config.epochs}",
                      unit="img", enabled=verbose or None) as bar:
            for start in range(0, len(order), config.batch_images):
                idx = order[start:start + config.batch_images]
                reward, loss = step([names[i] for i in idx], table[idx], rng)
                rewards.append(reward)
                losses.append(loss)
                bar.update(len(idx))
                bar.set_postfix(reward=f"{np.mean(rewards[-20:]):.3f}")
        bleu, cider = dev_scores(model, tokenizer, val, config.val_beam_size)
        epoch += 1
        rows = [r for r in rows if r["epoch"] < epoch] + [{
            "epoch": epoch, "reward": float(np.mean(rewards)), "loss": float(np.mean(losses)),
            "val_bleu4": bleu, "val_cider": cider, "learning_rate": config.learning_rate,
            "seconds": round(time.time() - started, 2)}]
        score = selection_score(config.select_on, bleu, cider)
        score = score if score is not None else float(np.mean(rewards))
        if score > state["best"]:
            state = {"best": score, "best_epoch": epoch}
            save_decoder_weights(model, run / BEST_WEIGHTS)
        save_decoder_weights(model, run / LAST_WEIGHTS)
        _write_history(run / "history.csv", rows, SCST_HISTORY_FIELDS)
        save_checkpoint(run / CHECKPOINT, model, epoch, state)
        if verbose:
            print(f"scst epoch {epoch}: reward {rows[-1]['reward']:.4f}, dev BLEU-4 "
                  f"{_pct(bleu)}, CIDEr-D {_pct(cider)}", flush=True)
    return run


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"

