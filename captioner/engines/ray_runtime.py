"""Starting, joining and leaving Ray; what every Ray pipeline stage shares.

Ray is an optional extra (``pip install "captioner[ray]"``) imported only here, inside
functions. A command that starts a local Ray also shuts it down (even on errors); a command
run while Ray is already initialised (a test fixture, a notebook) uses that session and
leaves it running.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from captioner.errors import CaptionerError, OptionError

DECODE_CPUS = 0.5  # fractional, so Ray never fuses decoding into the (1-CPU) model actors


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise CaptionerError(
            f'the Ray engine needs Ray Data ({exc}); install it with `pip install "captioner[ray]"` '
            '(or `pip install "ray[data]"`), or use the local engine.'
        ) from exc
    return ray


def check_options(actors: int, gpus_per_actor: float, batch_size: int) -> None:
    """Reject impossible engine options before anything starts."""
    if actors < 1:
        raise OptionError("actors", f"must be at least 1, not {actors}.")
    if gpus_per_actor < 0:
        raise OptionError("gpus_per_actor", f"must be 0 or more, not {gpus_per_actor}.")
    if batch_size < 1:
        raise OptionError("batch_size", f"must be at least 1, not {batch_size}.")


@contextmanager
def ray_session(address: str | None = None) -> Iterator[Any]:
    """Ray, initialised: joined at ``address`` ("auto": the running cluster), else a new
    local instance in a temporary folder of its own (under ``$RAY_TMPDIR`` when set); on exit
    Ray is shut down and that folder removed, when this call started them."""
    ray = import_ray()
    if address:
        _probe(address)
    if ray.is_initialized():
        yield ray
        return
    local = None if address else tempfile.mkdtemp(prefix="captioner-ray-",
                                                  dir=os.environ.get("RAY_TMPDIR"))  # fmt: skip
    try:
        _init(ray, address, local)
        _quiet_data_context(ray)
        yield ray
    finally:
        ray.shutdown()
        if local:
            shutil.rmtree(local, ignore_errors=True)


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast (Ray itself retries for minutes) when nothing listens at ``host:port``."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", ray:// client addresses: Ray's own checks
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise CaptionerError(
            f"no Ray cluster answers at {address} ({exc}); start one there with "
            "`ray start --head`, check the address (`ray status` on the head node), or give "
            "no address to run on a local Ray."
        ) from exc


def _init(ray: Any, address: str | None, temp_dir: str | None) -> None:
    options = {"_temp_dir": temp_dir} if temp_dir else {}
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level="warning", **options)  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        hint = " Start one with `ray start --head`, or omit --ray-address." if address else ""
        raise CaptionerError(f"cannot start or join {where} ({exc}).{hint}") from exc


def _quiet_data_context(ray: Any) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the command draws its own bar
    ctx.print_on_execution_start = False


def actor_threads() -> int:
    """CPUs Ray gave the calling actor (at least 1)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(np.ceil(cpus)))


def limit_backend_threads(threads: int) -> None:
    """Make the Keras backend use ``threads`` CPU threads in this process (call first thing in
    an actor: TensorFlow ignores OMP_NUM_THREADS there and sizes its pools from the machine)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
        except RuntimeError:  # already initialised in this process: keep its pools
            pass
    elif keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(threads)


def environment_json() -> str:
    """The library versions a new cache records, as JSON (computed where the model runs)."""
    from captioner.features.extraction import _environment

    return json.dumps(_environment())


def decode_batch(
    batch: dict[str, np.ndarray], size: tuple[int, int], resample: str, max_pixels: int,
    mirror: bool = False,
) -> dict[str, np.ndarray]:
    """Ray task: decode ``batch["path"]`` into pixels (N, H, W, 3) uint8 and error texts
    ("" when fine); a bad image gets zero pixels and its reason, exactly as the local loader."""
    from functools import partial

    from captioner.encoders.images import load_image
    from captioner.features.extraction import _safe_load

    load = partial(load_image, size=size, resample=resample, max_pixels=max_pixels,
                   mirror=mirror)
    paths = [str(p) for p in batch["path"]]
    pixels = np.zeros((len(paths), *size, 3), np.uint8)  # (N, H, W, 3)
    errors = []
    for i, path in enumerate(paths):
        image, reason = _safe_load(load, Path(path))
        if image is None:
            errors.append(reason or "unknown error")
        else:
            pixels[i] = image
            errors.append("")
    out = {k: v for k, v in batch.items() if k != "path"}
    return {**out, "pixels": pixels, "error": np.array(errors, dtype=object)}
