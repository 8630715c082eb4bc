"""Progress bars that stay quiet when output is not a terminal (CI, pipes)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from tqdm.auto import tqdm

T = TypeVar("T")


class NoBar:
    """A disabled bar that never imports tqdm (tqdm.auto and its imports, asyncio and
    importlib.metadata among them, cost 40-65 ms of a cold ``captioner caption``): it iterates
    like its iterable, is a context manager, and every other tqdm method does nothing."""

    def __init__(self, iterable: Iterable[T] | None = None):
        self.iterable = iterable

    def __iter__(self) -> Iterator[T]:
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, name: str) -> Any:  # update, close, set_postfix_str, refresh, ...
        return lambda *args, **kwargs: None


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool | None = None,
) -> tqdm | NoBar:
    """A tqdm bar on stderr, only on a terminal: ``enabled`` None or True shows it when stderr
    is a TTY (never into a pipe or a log file), False never; a disabled bar is a
    :class:`NoBar`."""
    if enabled is False or not sys.stderr.isatty():
        return NoBar(iterable)
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        smoothing=0.1,
        file=sys.stderr,
    )


def duration(seconds: float) -> str:
    """``42s``, ``6m 43s``, ``1h 05m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def metric(name: str, value: float | None) -> str:
    """A training metric as a person reads it: BLEU and CIDEr x100 with one decimal, the
    learning rate in scientific notation, losses with three decimals."""
    if value is None:
        return "n/a"
    if "bleu" in name.lower() or "cider" in name.lower():
        return f"{100 * value:.1f}"
    if "learning_rate" in name or name == "lr":
        return f"{value:.1e}"
    return f"{value:.3f}"


def epoch_line(epoch: int, epochs: int, logs: dict, seconds: float) -> str:
    """One line per finished epoch, e.g. ``epoch 3/8: loss 31.250 (xent 2.710) ...``."""
    parts = [f"epoch {epoch}/{epochs}:"]
    for label, key, extra in (("loss", "loss", "xent"), ("val loss", "val_loss", "val_xent")):
        if logs.get(key) is not None:
            text = f"{label} {metric(key, logs[key])}"
            if logs.get(extra) is not None and abs(logs[extra] - logs[key]) > 5e-4:
                text += f" (cross-entropy {metric(extra, logs[extra])})"
            parts.append(text)
    if logs.get("val_bleu4") is not None:
        parts.append(f"val BLEU-4 {metric('bleu', logs['val_bleu4'])}")
    if logs.get("val_cider") is not None:
        parts.append(f"val CIDEr-D {metric('cider', logs['val_cider'])}")
    if logs.get("train_cider") is not None:  # far above val: reciting the training captions
        parts.append(f"train CIDEr-D {metric('cider', logs['train_cider'])}")
    if logs.get("learning_rate") is not None:
        parts.append(f"lr {metric('learning_rate', logs['learning_rate'])}")
    parts.append(duration(seconds))
    return "  ".join(parts)


def epoch_progress(epochs: int, steps: int, enabled: bool | None = None):
    """A Keras callback: a bar inside every epoch (ETA, running loss) on a terminal, and one
    readable line per finished epoch (always, on stderr)."""
    import time

    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.time()
            self.bar = progress(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                                enabled=enabled)

        def on_train_batch_end(self, batch, logs=None):
            self.bar.update(1)
            if logs and logs.get("loss") is not None:
                self.bar.set_postfix_str(f"loss {float(logs['loss']):.3f}", refresh=False)

        def on_test_begin(self, logs=None):
            if getattr(self, "bar", None) is not None:
                self.bar.set_postfix_str("validating")

        def on_epoch_end(self, epoch, logs=None):
            self.bar.close()
            logs = dict(logs or {})
            lr = self.model.optimizer.learning_rate
            logs.setdefault("learning_rate", float(keras.ops.convert_to_numpy(lr)))
            print(epoch_line(epoch + 1, epochs, logs, time.time() - self.started),
                  file=sys.stderr, flush=True)

    return EpochProgress()
