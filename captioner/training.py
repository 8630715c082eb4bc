"""Stage 4: train a decoder with teacher forcing into a self-contained, resumable run folder.

A run folder holds everything needed to rebuild the model and to continue training:

- ``config.json``: every training argument, the decoder config, the encoder spec and feature
  layer (read from the feature cache), cleaning rules, seed and library versions;
- ``tokenizer.json``; ``best.weights.h5`` (best validation BLEU-4) and ``last.weights.h5``;
- ``checkpoint.h5``: all model variables (dropout RNG state included), the optimizer's
  variables and the monitor's state after the last finished epoch, written atomically, so a
  run killed at any moment loses at most the epoch in flight;
- ``checkpoints/epoch-NNN.weights.h5`` (the last ``keep_checkpoints``), ``history.csv``,
  ``curves.png`` and, with the TensorFlow backend, TensorBoard logs in ``logs/``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner import __version__, checks
from captioner.errors import CaptionerError
from captioner.inference import (
    BEST_WEIGHTS,
    CONFIG_FILE,
    LAST_WEIGHTS,
    RUN_FORMAT,
    TOKENIZER_FILE,
    read_run_config,
)

CHECKPOINT = "checkpoint.h5"
HISTORY = "history.csv"
HISTORY_FIELDS = ("epoch", "loss", "val_loss", "xent", "val_xent", "val_bleu4", "learning_rate",
                  "seconds")
XENT = "xent"  # masked cross-entropy per real word, without regularisers: same on both splits
SCHEDULES = ("constant", "cosine", "plateau")
DECODERS = ("merge", "inject", "attention")


@dataclass
class TrainConfig:
    """Every argument of a training run; saved in ``config.json``."""

    captions: str
    train_features: str
    out: str
    val_features: str | None = None
    decoder: str = "merge"
    epochs: int = 20
    batch_size: int = 64
    embed_dim: int = 256
    units: int = 256
    dropout: float = 0.5
    attention_units: int = 256
    attention_reg: float = 1.0
    min_count: int = 5
    max_length: int | None = None
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_epochs: float = 1.0
    min_learning_rate: float = 1e-5
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    clipnorm: float = 5.0
    label_smoothing: float = 0.0
    patience: int = 5
    keep_checkpoints: int = 2
    val_bleu_images: int = 200
    seed: int = 0
    mixed_precision: bool = False
    in_memory: bool = True
    max_train_images: int | None = None

    def decoder_config(self, vocab_size: int, max_length: int, feature_shape: tuple[int, ...]) -> dict:
        """Constructor arguments of the decoder (its Keras config)."""
        config = {"vocab_size": vocab_size, "max_length": max_length,
                  "feature_shape": list(feature_shape), "embed_dim": self.embed_dim,
                  "units": self.units, "dropout": self.dropout}
        if self.decoder == "attention":
            config |= {"attention_units": self.attention_units,
                       "attention_reg": self.attention_reg}
        return config


# --------------------------------------------------------------------------- data


def _load_split(captions_path: str, features_path: str, limit: int | None = None):
    """(reader, cleaned captions of the images that have features) for one split."""
    from captioner.captions import clean_captions, load_captions
    from captioner.features import open_features

    reader = open_features(features_path)
    captions = load_captions(captions_path)
    names = [n for n in reader.done_names if n in captions]
    if not names:
        raise CaptionerError(
            f"none of the {len(reader.done_names)} images in {features_path} has a caption in "
            f"{captions_path}; are they from the same data set?"
        )
    names = sorted(names)[:limit] if limit else sorted(names)
    return reader, clean_captions({n: captions[n] for n in names})


def encoder_from_cache(attrs: dict[str, Any]) -> dict[str, Any]:
    """The encoder description a run records, from a feature cache's attributes."""
    weights = str(attrs.get("weights", "imagenet"))
    return {
        "name": attrs.get("encoder"),
        "layer": attrs.get("layer"),
        "weights": "imagenet" if weights.startswith("imagenet") else weights,
        "weights_identity": weights,
        "input_size": list(np.atleast_1d(attrs.get("input_size", [224, 224])).tolist()),
        "preprocessing": attrs.get("preprocessing"),
        "feature_shape": list(np.atleast_1d(attrs.get("feature_shape", [])).tolist()),
    }


def versions() -> dict[str, str | None]:
    """Versions of the libraries that produce a run's or a report's numbers."""
    import importlib.metadata
    import platform

    import h5py
    import keras
    import nltk
    import PIL

    try:
        pycoco = importlib.metadata.version("pycocoevalcap")
    except importlib.metadata.PackageNotFoundError:
        pycoco = None
    return {"captioner": __version__, "python": platform.python_version(),
            "keras": keras.__version__, "backend": keras.backend.backend(),
            "numpy": np.__version__, "h5py": h5py.__version__, "nltk": nltk.__version__,
            "pillow": PIL.__version__, "pycocoevalcap": pycoco}


# --------------------------------------------------------------------------- checkpoints


def _atomic_h5(path: Path, write) -> None:
    import h5py

    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        write(h5)
    os.replace(tmp, path)


def save_checkpoint(path: Path, model, epoch: int, monitor_state: dict) -> None:
    """All model and optimizer variables plus the monitor's state, written atomically."""

    def write(h5):
        for group, variables in (("model", model.variables), ("optimizer", model.optimizer.variables)):
            g = h5.create_group(group)
            for i, v in enumerate(variables):
                g.create_dataset(f"{i:05d}", data=np.asarray(v.numpy()))
        h5.attrs["epoch"] = epoch
        h5.attrs["monitor"] = json.dumps(monitor_state)

    _atomic_h5(path, write)


def load_checkpoint(path: Path, model) -> tuple[int, dict]:
    """Restore what :func:`save_checkpoint` wrote; returns (epochs done, monitor state)."""
    import h5py

    with h5py.File(path, "r") as h5:
        model.optimizer.build(model.trainable_variables)
        for group, variables in (("model", model.variables), ("optimizer", model.optimizer.variables)):
            stored = h5[group]
            if len(stored) != len(variables):
                raise CaptionerError(f"{path} does not match this model ({group} variables differ)")
            for i, v in enumerate(variables):
                v.assign(stored[f"{i:05d}"][()])
        return int(h5.attrs["epoch"]), json.loads(h5.attrs["monitor"])


def save_decoder_weights(model, path: Path) -> None:
    """``model.save_weights`` without the optimizer's slots (a third of the size with Adam).

    Keras 3 writes a compiled model's optimizer into ``.weights.h5`` too; inference needs only
    the model, and ``checkpoint.h5`` keeps the optimizer for resuming.
    """
    try:
        from keras.src.saving import saving_lib

        saving_lib.save_weights_only(model, str(path), objects_to_skip=[model.optimizer])
    except (ImportError, TypeError, AttributeError):  # another Keras 3 layout: keep everything
        model.save_weights(path)


# --------------------------------------------------------------------------- monitor


def read_history(path: Path) -> list[dict[str, float | None]]:
    """Rows of a run's history.csv (epoch as int, empty cells as None); [] when absent."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                for row in csv.DictReader(fh)]
    for row in rows:
        row["epoch"] = int(row["epoch"])
    return rows


def _write_history(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_FIELDS})
    os.replace(tmp, path)


def _make_monitor(config: TrainConfig, run: Path, val_sample, tokenizer, state: dict):
    import keras

    from captioner.inference import Captioner
    from captioner.metrics import corpus_bleu_scores

    class RunMonitor(keras.callbacks.Callback):
        """Per-epoch validation BLEU-4, best/last weights, history, LR plateau, early stop,
        and the resumable checkpoint, all in one place so their state is saved together."""

        def __init__(self):
            super().__init__()
            self.state = {"best_bleu": -1.0, "best_val_loss": math.inf, "wait": 0,
                          "plateau_wait": 0, "plateau_best": math.inf, **state}
            self.rows = read_history(run / HISTORY)
            self.started = time.time()
            self._captioner = None

        def _get_captioner(self) -> Captioner:
            # JAX bakes variable values into a jitted step, so it is rebuilt every epoch there;
            # tf.function and eager torch read the live variables.
            if self._captioner is None or keras.backend.backend() == "jax":
                self._captioner = Captioner(self.model, tokenizer)
            return self._captioner

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.time()

        def _val_bleu(self) -> float | None:
            if val_sample is None:
                return None
            feats, refs = val_sample
            caps = self._get_captioner().caption_features(feats)
            hyps = {name: c[0].text for name, c in zip(refs, caps, strict=True)}
            return corpus_bleu_scores(refs, hyps)["BLEU-4"]

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            bleu = self._val_bleu()
            if bleu is not None:
                logs["val_bleu4"] = bleu
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            row = {"epoch": epoch + 1, "loss": logs.get("loss"), "val_loss": logs.get("val_loss"),
                   "xent": logs.get(XENT), "val_xent": logs.get(f"val_{XENT}"), "val_bleu4": bleu, "learning_rate": lr, "seconds": round(time.time() - self.started, 2)}
            self.rows = [r for r in self.rows if r["epoch"] < epoch + 1] + [row]
            self._select_best(epoch, logs, bleu)
            self._plateau(logs)
            self._early_stop(logs)
            self._save(epoch)

        def _select_best(self, epoch, logs, bleu):
            score = bleu if bleu is not None else -float(logs.get("loss", math.inf))
            if score > self.state["best_bleu"]:
                self.state["best_bleu"] = score
                self.state["best_epoch"] = epoch + 1
                save_decoder_weights(self.model, run / BEST_WEIGHTS)

        def _plateau(self, logs):
            if config.schedule != "plateau" or "val_loss" not in logs:
                return
            if logs["val_loss"] < self.state["plateau_best"] - 1e-4:
                self.state["plateau_best"], self.state["plateau_wait"] = logs["val_loss"], 0
                return
            self.state["plateau_wait"] += 1
            if self.state["plateau_wait"] >= config.plateau_patience:
                opt = self.model.optimizer
                new = max(float(opt.learning_rate) * config.plateau_factor, config.min_learning_rate)
                opt.learning_rate.assign(new)
                self.state["plateau_wait"] = 0

        def _early_stop(self, logs):
            if config.patience <= 0 or "val_loss" not in logs:
                return
            if logs["val_loss"] < self.state["best_val_loss"] - 1e-4:
                self.state["best_val_loss"], self.state["wait"] = logs["val_loss"], 0
            else:
                self.state["wait"] += 1
                if self.state["wait"] >= config.patience:
                    self.state["stopped_early"] = True
                    self.model.stop_training = True

        def _save(self, epoch):
            save_decoder_weights(self.model, run / LAST_WEIGHTS)
            keep = run / "checkpoints"
            keep.mkdir(exist_ok=True)
            save_decoder_weights(self.model, keep / f"epoch-{epoch + 1:03d}.weights.h5")
            for old in sorted(keep.glob("epoch-*.weights.h5"))[:-max(config.keep_checkpoints, 1)]:
                old.unlink()
            _write_history(run / HISTORY, self.rows)
            save_checkpoint(run / CHECKPOINT, self.model, epoch + 1, self.state)
            try:
                from captioner.figures import save_training_curves

                save_training_curves(self.rows, run / "curves.png")
            except OSError:
                pass

    return RunMonitor()


# --------------------------------------------------------------------------- schedule


def learning_rate(config: TrainConfig, steps_per_epoch: int):
    """A float (constant, plateau) or a warm-up + cosine schedule."""
    import keras

    if config.schedule not in SCHEDULES:
        raise CaptionerError(f"unknown schedule '{config.schedule}'; choose one of {SCHEDULES}")
    if config.schedule != "cosine":
        return config.learning_rate
    total = max(config.epochs * steps_per_epoch, 1)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else config.learning_rate,
        decay_steps=max(total - warmup, 1),
        alpha=config.min_learning_rate / config.learning_rate,
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


# --------------------------------------------------------------------------- train


def _resolve_config(config: TrainConfig, resume: bool) -> tuple[TrainConfig, dict | None]:
    """The config to run (a resumed run's own, with the new --epochs) and the saved one."""
    run = Path(config.out)
    if resume:
        saved = read_run_config(run)
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        merged = TrainConfig(**{k: v for k, v in saved["training"].items() if k in fields})
        merged.epochs = config.epochs  # resuming may extend the run
        return merged, saved
    for key in ("captions", "train_features", "val_features"):
        if getattr(config, key):
            setattr(config, key, str(Path(getattr(config, key)).resolve()))
    if run.exists() and not run.is_dir():
        raise CaptionerError(f"--out {run} is a file; give a folder for the run")
    if (run / CONFIG_FILE).exists() and (run / CHECKPOINT).exists():
        raise CaptionerError(
            f"{run} already holds a run; pass --resume to continue it or choose another --out"
        )
    return config, None


def _create_run(run: Path, saved: dict | None) -> None:
    """Make the run folder (only once every check passed). A folder left by an attempt that
    never finished an epoch (config but no checkpoint) is started again, not refused."""
    if saved is None and (run / CONFIG_FILE).exists():
        print(f"note: {run} holds no finished epoch; starting it again", file=sys.stderr)
        for name in (CONFIG_FILE, TOKENIZER_FILE, HISTORY):
            (run / name).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)


def _val_sample(config: TrainConfig):
    """(reader, captions, (features, references) of the fixed BLEU sample) of the dev split."""
    if not config.val_features:
        return None, None, None
    reader, caps = _load_split(config.captions, config.val_features)
    if config.val_bleu_images <= 0:  # validation loss only
        return reader, caps, None
    sample = sorted(caps)[: config.val_bleu_images]
    from captioner.data import read_features

    feats = read_features(reader, sample)
    return reader, caps, (feats, {n: caps[n] for n in sample})


def train(config: TrainConfig, resume: bool = False, verbose: int = 1) -> Path:
    """Train (or resume) a run; returns the run folder. ``verbose``: 0 silent, else a bar
    inside every epoch (on a terminal) and one line per epoch."""
    import keras

    from captioner.data import CaptionDataset, EpochStream
    from captioner.decoders import MaskedSparseCrossEntropy, build_decoder
    from captioner.tokenizer import Tokenizer

    config, saved = _resolve_config(config, resume)
    checks.train_config(config)
    run = Path(config.out)
    train_reader, train_caps = _load_split(config.captions, config.train_features,
                                           config.max_train_images)
    val_reader, val_caps, val_sample = _val_sample(config)
    checks.features_fit(config.decoder, train_reader, val_reader)
    _create_run(run, saved)
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        keras.config.set_dtype_policy("mixed_float16")
    if saved is None:
        texts = [c for caps in train_caps.values() for c in caps]
        tokenizer = Tokenizer.build(texts, min_count=config.min_count, max_length=config.max_length)
        tokenizer.save(run / TOKENIZER_FILE)
    else:
        tokenizer = Tokenizer.load(run / TOKENIZER_FILE)
    train_ds = CaptionDataset(train_reader, train_caps, tokenizer, batch_size=config.batch_size,
                              shuffle=True, seed=config.seed, in_memory=config.in_memory)
    val_ds = None
    if val_reader is not None:
        val_ds = CaptionDataset(val_reader, val_caps, tokenizer, batch_size=config.batch_size,
                                shuffle=False, in_memory=config.in_memory)
    dec_config = config.decoder_config(tokenizer.vocab_size, tokenizer.max_length,
                                       tuple(train_reader.feature_shape))
    model = build_decoder(config.decoder, **dec_config)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate(config, len(train_ds)), clipnorm=config.clipnorm),
        loss=MaskedSparseCrossEntropy(config.label_smoothing),
        weighted_metrics=[keras.metrics.SparseCategoricalCrossentropy(name=XENT, from_logits=True)],
    )
    if saved is None:
        _write_config(run, config, dec_config, train_reader.attrs, len(train_caps))
    initial_epoch, monitor_state = 0, {}
    if resume and (run / CHECKPOINT).is_file():
        initial_epoch, monitor_state = load_checkpoint(run / CHECKPOINT, model)
    if monitor_state.get("stopped_early") or initial_epoch >= config.epochs:
        return run
    stream = EpochStream(train_ds, start_epoch=initial_epoch)
    callbacks = [_make_monitor(config, run, val_sample, tokenizer, monitor_state)]
    callbacks += _tensorboard(run)
    if verbose:
        from captioner.progress import epoch_progress

        callbacks.append(epoch_progress(config.epochs, len(train_ds)))
    model.fit(stream, steps_per_epoch=len(train_ds), shuffle=False, validation_data=val_ds,
              epochs=config.epochs, initial_epoch=initial_epoch, callbacks=callbacks, verbose=0)
    return run


def _tensorboard(run: Path) -> list:
    import importlib.util

    import keras

    if keras.backend.backend() != "tensorflow" or not importlib.util.find_spec("tensorboard"):
        return []
    return [keras.callbacks.TensorBoard(log_dir=str(run / "logs"), write_graph=False)]


def _write_config(run: Path, config: TrainConfig, dec_config: dict, attrs: dict, n_images: int) -> None:
    from captioner.captions import DEFAULT_RULES

    payload = {
        "format": RUN_FORMAT,
        "version": 1,
        "decoder": {"kind": config.decoder, "config": dec_config},
        "encoder": encoder_from_cache(attrs),
        "cleaning": DEFAULT_RULES.to_dict(),
        "training": dataclasses.asdict(config),
        "train_images": n_images,
        "seed": config.seed,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = run / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=json_default))
    os.replace(tmp, run / CONFIG_FILE)


def json_default(value: Any) -> Any:
    """JSON for numpy scalars and arrays (anything else as its string)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
