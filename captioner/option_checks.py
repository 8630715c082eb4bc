"""Checks of command-line values, run before any work starts.

Each failure is an :class:`OptionError` whose one line names the setting, the value and what
to do; the CLI prints the setting as its flag (``batch_size`` as ``--batch-size``) and exits
with status 2. ``option`` may be given either way (``"--batch-size"`` or ``"batch_size"``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from captioner.errors import CaptionerError, OptionError


def _error(option: str, text: str) -> OptionError:
    """The error of one setting, by its field name (the CLI writes it as a flag)."""
    return OptionError(option.lstrip("-").replace("-", "_"), text)


def at_least(option: str, value: float | None, minimum: float, what: str = "") -> None:
    """``value`` (when given) must be >= ``minimum``."""
    if value is not None and not value >= minimum:
        raise _error(option, f"must be at least {minimum}{what}, not {value}")


def in_range(
    option: str, value: float | None, low: float, high: float, high_open: bool = False
) -> None:
    """``low <= value <= high`` (``< high`` with ``high_open``), finite."""
    if value is None:
        return
    ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bound = f"below {high}" if high_open else f"at most {high}"
        raise _error(option, f"must be at least {low} and {bound}, not {value}")


def output_file(option: str, path: str | os.PathLike, example: str) -> None:
    """``path`` must name a file (not a folder) in a folder that exists or can be made."""
    target = Path(path)
    if target.is_dir() or str(path).endswith(("/", os.sep)):
        raise _error(option, f"{path} is a folder; give a file name, e.g. {target / example}")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise _error(option, f"{path}: {parent} is a file, not a folder")


def no_extra_sources(extra: Sequence[str], first: str) -> None:
    """One SOURCE only: several usually mean the shell expanded an unquoted glob."""
    if extra:
        raise CaptionerError(
            f"got {len(extra) + 1} sources ({first}, {extra[0]}, ...): if the shell expanded a "
            "glob, quote it, e.g. 'photos/*.jpg'; otherwise give a folder or a list file"
        )


def train_config(config) -> None:
    """The numeric options of ``train`` (a TrainConfig), each on its own."""
    for option, minimum in (
        ("epochs", 1),
        ("batch_size", 1),
        ("embed_dim", 1),
        ("units", 1),
        ("attention_units", 1),
        ("min_count", 1),
        ("plateau_patience", 1),
        ("patience", 0),
        ("keep_checkpoints", 1),
        ("val_bleu_images", 0),
        ("train_score_images", 0),
        ("max_train_images", 1),
        ("warmup_epochs", 0),
        ("attention_reg", 0),
    ):
        at_least("--" + option.replace("_", "-"), getattr(config, option, None), minimum)
    at_least("--max-length", config.max_length, 3, " tokens (<start>, one word, <end>)")
    in_range("--dropout", config.dropout, 0.0, 1.0, high_open=True)
    in_range("--label-smoothing", config.label_smoothing, 0.0, 1.0, high_open=True)
    for option in ("learning_rate", "clipnorm"):
        value = getattr(config, option)
        if not (math.isfinite(value) and value > 0):
            raise _error(option, f"must be above 0, not {value}")


FEATURE_KEYS = ("encoder", "layer", "weights", "input_size", "preprocessing", "feature_shape")


def _describe(attrs: dict) -> str:
    return f"{attrs.get('encoder')} layer {attrs.get('layer')} {tuple(attrs.get('feature_shape') or ())}"


def features_fit(decoder: str, train, val=None) -> None:
    """The decoder can read the training features, and the validation cache (if any) was made
    the same way (encoder, layer, weights, input size, preprocessing, shape)."""
    shape = tuple(train.feature_shape)
    if decoder == "attention" and len(shape) == 1:
        raise OptionError(
            "decoder", f"attention needs spatial features, but {train.path} holds pooled "
            f"vectors {shape}; extract the conv layer, or use a merge or inject decoder"
        )
    if val is None:
        return
    diff = [k for k in FEATURE_KEYS if _norm(train.attrs.get(k)) != _norm(val.attrs.get(k))]
    if tuple(val.feature_shape) != shape and "feature_shape" not in diff:
        diff.append("feature_shape")
    if diff:
        raise OptionError(
            "val_features", f"{val.path} ({_describe(val.attrs)}) was not made like the "
            f"training features {train.path} ({_describe(train.attrs)}): {', '.join(diff)} "
            "differ; extract both splits with the same encoder, layer and weights"
        )


def _norm(value):
    import numpy as np

    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(np.asarray(value).ravel().tolist())
    return value
