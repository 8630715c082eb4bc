"""The training monitor: one Keras callback that keeps a run folder up to date each epoch.

Per epoch it measures validation BLEU-4 and CIDEr-D on a fixed sample (and, when asked, the same
scores on a fixed sample of training images: their gap shows memorising), saves best/last/
per-epoch weights, appends to history.csv, applies the learning-rate plateau rule and early
stopping, then writes the resumable checkpoint, so all of their state is saved together.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import keras

from captioner.formats.run_folder import (
    BEST_WEIGHTS,
    CHECKPOINT,
    CHECKPOINTS_DIR,
    CURVES,
    HISTORY,
    LAST_WEIGHTS,
    XENT,
    read_history,
    write_history,
)
from captioner.model.checkpoints import WeightsExporter, save_checkpoint


def sample_scores(captioner, sample, decoding=None) -> tuple[float | None, float | None]:
    """(BLEU-4, CIDEr-D) of ``captioner``'s captions of the ``sample`` (features,
    references) decoded with ``decoding`` (a DecodingConfig; None: the captioner's);
    (None, None) without a sample."""
    from captioner.evaluation.metrics import cider_d, corpus_bleu_scores

    if sample is None:
        return None, None
    feats, refs = sample
    caps = captioner.caption_features(feats, decoding=decoding)
    hyps = {name: c[0].text for name, c in zip(refs, caps, strict=True)}
    return corpus_bleu_scores(refs, hyps)["BLEU-4"], cider_d(refs, hyps)[0]


def selection_score(select_on: str, bleu: float | None, cider: float | None) -> float | None:
    """The dev score that picks the best epoch (None without dev captions)."""
    if bleu is None or cider is None:
        return None
    return {"bleu4": bleu, "cider": cider, "bleu4+cider": bleu + cider}[select_on]


class RunMonitor(keras.callbacks.Callback):
    """Validation BLEU-4, best/last weights, history, LR plateau, early stop and checkpoint.

    ``settings``: the run's TrainConfig (schedule, plateau and patience options,
    keep_checkpoints); ``val_sample``: (features, {name: references}) or None; ``state``: the
    monitor state of a resumed run; ``decoding``: how the dev captions are decoded (the run's
    stored decoding at the dev beam size); ``train_sample``: like ``val_sample``, training
    images scored the same way, or None.
    """

    def __init__(
        self,
        settings: Any,
        run: Path,
        val_sample,
        tokenizer,
        state: dict,
        exporter: WeightsExporter,
        decoding=None,
        train_sample=None,
    ):
        super().__init__()
        self.settings, self.run, self.val_sample = settings, run, val_sample
        self.train_sample = train_sample
        self.tokenizer, self.exporter, self.decoding = tokenizer, exporter, decoding
        self.state = {
            "best_bleu": -1.0,
            "best_val_loss": math.inf,
            "wait": 0,
            "plateau_wait": 0,
            "plateau_best": math.inf,
            **state,
        }
        self.rows = read_history(run / HISTORY)
        self.started = time.time()
        self._captioner = None

    def _get_captioner(self):
        self._captioner = live_captioner(self._captioner, self.model, self.tokenizer)
        return self._captioner

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        scores = {}
        for split, sample in (("val", self.val_sample), ("train", self.train_sample)):
            bleu, cider = sample_scores(self._get_captioner(), sample, self.decoding)
            scores |= {f"{split}_bleu4": bleu, f"{split}_cider": cider}
        logs.update({k: v for k, v in scores.items() if v is not None})
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row = {
            "epoch": epoch + 1,
            "loss": logs.get("loss"),
            "val_loss": logs.get("val_loss"),
            "xent": logs.get(XENT),
            "val_xent": logs.get(f"val_{XENT}"),
            **scores,
            "learning_rate": lr,
            "seconds": round(time.time() - self.started, 2),
        }
        self.rows = [r for r in self.rows if r["epoch"] < epoch + 1] + [row]
        select_on = getattr(self.settings, "select_on", "bleu4")
        self._select_best(epoch, logs, selection_score(select_on, scores["val_bleu4"],
                                                       scores["val_cider"]))
        self._plateau(logs)
        self._early_stop(logs)
        self._save(epoch)

    def _select_best(self, epoch, logs, bleu):
        score = bleu if bleu is not None else -float(logs.get("loss", math.inf))
        if score > self.state["best_bleu"]:
            self.state["best_bleu"] = score
            self.state["best_epoch"] = epoch + 1
            self.exporter.save(self.model, self.run / BEST_WEIGHTS)

    def _plateau(self, logs):
        cfg = self.settings
        if cfg.schedule != "plateau" or "val_loss" not in logs:
            return
        if logs["val_loss"] < self.state["plateau_best"] - 1e-4:
            self.state["plateau_best"], self.state["plateau_wait"] = logs["val_loss"], 0
            return
        self.state["plateau_wait"] += 1
        if self.state["plateau_wait"] >= cfg.plateau_patience:
            opt = self.model.optimizer
            new = max(float(opt.learning_rate) * cfg.plateau_factor, cfg.min_learning_rate)
            opt.learning_rate.assign(new)
            self.state["plateau_wait"] = 0

    def _early_stop(self, logs):
        if self.settings.patience <= 0 or "val_loss" not in logs:
            return
        if logs["val_loss"] < self.state["best_val_loss"] - 1e-4:
            self.state["best_val_loss"], self.state["wait"] = logs["val_loss"], 0
        else:
            self.state["wait"] += 1
            if self.state["wait"] >= self.settings.patience:
                self.state["stopped_early"] = True
                self.model.stop_training = True

    def _save(self, epoch):
        self.exporter.save(self.model, self.run / LAST_WEIGHTS)
        keep = self.run / CHECKPOINTS_DIR
        keep.mkdir(exist_ok=True)
        self.exporter.save(self.model, keep / f"epoch-{epoch + 1:03d}.weights.h5")
        for old in sorted(keep.glob("epoch-*.weights.h5"))[
            : -max(self.settings.keep_checkpoints, 1)
        ]:
            old.unlink()
        write_history(self.run / HISTORY, self.rows)
        save_checkpoint(self.run / CHECKPOINT, self.model, epoch + 1, self.state)
        try:
            from captioner.evaluation.figures import save_training_curves

            save_training_curves(self.rows, self.run / CURVES)
        except OSError:
            pass


def live_captioner(current, model, tokenizer):
    """A Captioner over ``model``'s current weights: ``current`` when there is one, except on
    JAX, whose jitted step bakes the variable values in, so it is rebuilt after updates
    (tf.function and eager torch read the live variables)."""
    from captioner.inference.captioner import Captioner

    if current is None or keras.backend.backend() == "jax":
        return Captioner(model, tokenizer)
    return current
