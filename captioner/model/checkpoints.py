"""The run folder's weight files: ``checkpoint.h5`` (for ``--resume``) and decoder weights.

``checkpoint.h5`` layout::

    model/<key>       one dataset per model variable (dropout RNG states included)
    optimizer/<key>   one dataset per optimizer variable
    attrs             epoch (epochs done), monitor (JSON state of the training monitor),
                      keyed_by = "path"

A key is the variable's ``path`` with the names Keras numbers per process (the model's, the
optimizer's, the seed generators') replaced by fixed ones, and ``/`` written as ``|``; so a
checkpoint fits a model rebuilt in another process whatever else that process built.
Checkpoints of captioner 0.1.0 stored variables by position (keys ``00000``, ...); they still
load, by position.

Decoder weights (``best``/``last``/per-epoch) are Keras ``.weights.h5`` files of the model
alone, written by Keras's own ``save_weights`` code of an uncompiled copy, so the optimizer's
slots stay out of them. Every file here is built in memory and written atomically as bytes
(:func:`h5_bytes`), so a full or read-only disk is one line and never a crash.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from captioner.errors import CaptionerError
from captioner.formats.run_folder import CHECKPOINT, CHECKPOINTS_DIR
from captioner.storage.faults import check_space
from captioner.storage.files import atomic_path, write_bytes

GROUPS = ("model", "optimizer")


def variable_keys(variables, model_name: str, optimizer_name: str) -> list[str]:
    """Stable, unique keys of ``variables`` (see the module docstring)."""
    keys, seeds = [], 0
    for v in variables:
        path = v.path
        if path.split("/")[0].startswith("seed_generator"):
            path, seeds = f"seed_generator/{seeds}", seeds + 1
        else:
            path = re.sub(rf"^{re.escape(optimizer_name)}/", "optimizer/", path)
            path = re.sub(rf"(^|/){re.escape(model_name)}(?=[/_])", r"\1model", path)
        keys.append(path.replace("/", "|"))
    if len(set(keys)) != len(keys):
        raise CaptionerError(
            f"variables of {model_name} do not have unique paths; cannot "
            "write a checkpoint keyed by path"
        )
    return keys


def _grouped(model) -> dict[str, tuple[list, list[str]]]:
    opt = model.optimizer
    return {
        group: (variables, variable_keys(variables, model.name, opt.name))
        for group, variables in (("model", model.variables), ("optimizer", opt.variables))
    }


def h5_bytes(fill: Callable[[Any], None]) -> bytes:
    """An HDF5 file built in memory by ``fill(h5)``, as bytes. Whole files are written this
    way: HDF5 never meets the disk, so a full or read-only disk is a plain ``OSError`` of the
    atomic write that follows (an HDF5 file whose close fails on a write can crash the
    process; see :mod:`captioner.storage.faults`)."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        fill(h5)
    return buffer.getvalue()


def save_checkpoint(path: Path, model, epoch: int, monitor_state: dict) -> None:
    """All model and optimizer variables plus the monitor's state, written atomically."""

    def fill(h5) -> None:
        for group, (variables, keys) in _grouped(model).items():
            g = h5.create_group(group)
            for key, v in zip(keys, variables, strict=True):
                g.create_dataset(key, data=np.asarray(v.numpy()))
        h5.attrs["epoch"] = epoch
        h5.attrs["monitor"] = json.dumps(monitor_state)
        h5.attrs["keyed_by"] = "path"

    write_bytes(path, h5_bytes(fill))


def weights_bytes(model) -> int:
    """The bytes of ``model``'s variables (about the size of its weights file)."""
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)


def check_run_space(run: Path, model, keep: int) -> None:
    """One line before training when the run folder's disk clearly cannot hold what every
    epoch writes: best, last and ``keep`` per-epoch weights, the checkpoint (weights and the
    optimizer's two slots) and the temporary copy of the largest file, less what is there."""
    need = weights_bytes(model) * (2 + max(keep, 1) + 3 + 3)
    have = sum(p.stat().st_size for p in [*run.glob("*.h5"), *run.glob(f"{CHECKPOINTS_DIR}/*.h5")])
    hint = " or keep fewer per-epoch weights (--keep-checkpoints 1)"
    check_space(run / CHECKPOINT, need - have, f"the run folder {run}", hint)


def load_checkpoint(path: Path, model) -> tuple[int, dict]:
    """Restore what :func:`save_checkpoint` wrote; returns (epochs done, monitor state)."""
    import h5py

    model.optimizer.build(model.trainable_variables)
    with h5py.File(path, "r") as h5:
        by_path = h5.attrs.get("keyed_by") == "path"
        for group, (variables, keys) in _grouped(model).items():
            stored = h5[group]
            if not by_path:  # captioner 0.1.0: by position
                keys = [f"{i:05d}" for i in range(len(variables))]
            missing = sorted(set(keys) - set(stored)) if by_path else []
            if missing or len(stored) != len(variables):
                raise CaptionerError(
                    f"{path} does not match this model ({group} variables differ"
                    f"{', e.g. ' + missing[0].replace('|', '/') if missing else ''}); "
                    "resume with the options the run was started with"
                )
            for key, v in zip(keys, variables, strict=True):
                v.assign(stored[key][()])
        return int(h5.attrs["epoch"]), json.loads(h5.attrs["monitor"])


def checkpoint_progress(path: Path) -> tuple[int, bool]:
    """(epochs done, stopped early) of a checkpoint, without a model; (0, False) when absent
    or unreadable (the resume itself then says what is wrong)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            state = json.loads(h5.attrs.get("monitor", "{}"))
            return int(h5.attrs["epoch"]), bool(state.get("stopped_early"))
    except (OSError, KeyError, ValueError, TypeError):
        return 0, False


class WeightsExporter:
    """Writes a training model's weights without its optimizer, via public Keras APIs only:
    the values are copied into an uncompiled twin built from the same config."""

    def __init__(self, kind: str, config: dict):
        self.kind, self.config = kind, config
        self._twin = None

    def save(self, model, path: Path) -> None:
        """``model``'s weights as a Keras ``.weights.h5`` file at ``path`` (atomically)."""
        from captioner.model.decoders import build_decoder

        if self._twin is None:
            self._twin = build_decoder(self.kind, **self.config)
        self._twin.set_weights(model.get_weights())
        data = keras_weights_bytes(self._twin)
        if data is not None:
            write_bytes(path, data, sync=False)
            return
        check_space(path, 2 * weights_bytes(self._twin), str(path))  # a full disk may crash h5py
        with atomic_path(path, sync=False, suffix=".weights.h5") as tmp:
            self._twin.save_weights(tmp)


def keras_weights_bytes(model) -> bytes | None:
    """``model.save_weights`` into memory: the ``.weights.h5`` bytes Keras writes, by the
    same code (its ``H5IOStore`` over a ``BytesIO``); None when this Keras lacks it."""
    try:
        from keras.src.saving.saving_lib import H5IOStore, _save_state
    except ImportError:  # pragma: no cover (another Keras: save_weights to a file instead)
        return None
    buffer = io.BytesIO()
    store = H5IOStore(buffer, mode="w")
    try:
        _save_state(model, weights_store=store, assets_store=None, inner_path="",
                    visited_saveables=set())  # fmt: skip
    finally:
        store.close()
    return buffer.getvalue()


def weights_as_float16(src: Path, dst: Path) -> int:
    """Copy the Keras weights file ``src`` to ``dst`` with its float32 variables stored as
    float16 (half the size; Keras casts them back to the model's dtype on load). Returns the
    number of variables converted."""
    import h5py

    converted = 0

    def fill(fout) -> None:
        def copy(name: str, obj) -> None:
            nonlocal converted
            if isinstance(obj, h5py.Group):
                fout.require_group(name).attrs.update(obj.attrs)
                return
            data = obj[()]
            if data.dtype == np.float32:
                data, converted = data.astype(np.float16), converted + 1
            fout.create_dataset(name, data=data).attrs.update(obj.attrs)

        fout.attrs.update(fin.attrs)
        fin.visititems(copy)

    with h5py.File(src, "r") as fin:
        data = h5_bytes(fill)
    write_bytes(dst, data)
    return converted
