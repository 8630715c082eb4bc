"""``captioner train --distribute``: data-parallel training over every local device.

Keras 3's ``keras.distribution.DataParallel`` (JAX backend) replicates the variables on each
device and splits every batch across them; gradients are reduced by XLA, so one step is the
same computation as on one device with the same global batch. Batches are padded to a
multiple of the device count with zero-weight samples (see ``CaptionDataset(pad_to=...)``).
On TensorFlow and PyTorch, Keras has no such distribution: a clear error says what to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from captioner.errors import OptionError


def local_devices() -> list[str]:
    """The devices data-parallel training would use: those of the backend's default platform
    (all GPUs when there are any, else the CPU devices)."""
    import keras

    return keras.distribution.list_devices()


@contextmanager
def data_parallel(enabled: bool) -> Iterator[int]:
    """Within: models and ``fit`` are data-parallel over the local devices; yields their
    count (1 when not ``enabled``). The previous distribution is restored on exit."""
    if not enabled:
        yield 1
        return
    import keras

    backend = keras.backend.backend()
    if backend != "jax":
        raise OptionError(
            "distribute", f"needs the JAX backend (keras.distribution); this is {backend}. "
            "Run with KERAS_BACKEND=jax (pip install jax), or train on one device."
        )
    devices = local_devices()
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    try:
        yield len(devices)
    finally:
        keras.distribution.set_distribution(previous)
