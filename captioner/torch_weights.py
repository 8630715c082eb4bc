"""Read legacy PyTorch ``torch.save`` state dicts into numpy arrays, without torch.

The legacy (non-zip) format is a sequence of pickles followed by raw storages:

1. the magic number, 2. the protocol version, 3. a ``sys_info`` dict,
4. the state dict, whose tensors refer to storages by persistent id,
5. the list of storage keys, then for each key: an int64 element count and the raw bytes.

Every pickle goes through :class:`_RestrictedUnpickler`, which resolves only
``torch._utils._rebuild_tensor_v2``, the ``torch.*Storage`` type names and
``collections.OrderedDict``; any other global is refused, so a crafted file cannot run code.
This is the project's one pickle reader, and it only ever rebuilds tensors.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioner.errors import WeightsError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass
class _Storage:
    """A storage named in the state dict; its bytes are read after the pickles."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    """A tensor view into a storage (offset, shape and strides in elements)."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise WeightsError(f"storage {self.storage.key} was never read")
        if not self.shape:
            return data[self.offset].copy()
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.shape,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        return np.array(view)  # contiguous copy, detached from the storage buffer


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only carries the dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, *_):
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that allows tensor rebuilding and nothing else."""

    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        # pid: ("storage", storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(str(key), storage_type.dtype, int(numel))
        return self.storages[key]


def _load_pickle(f: io.BufferedIOBase, storages: dict[str, _Storage]):
    return _RestrictedUnpickler(f, storages).load()


def _read_storages(f: io.BufferedIOBase, keys: list[str], storages: dict[str, _Storage]) -> None:
    for key in keys:
        storage = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        nbytes = numel * storage.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise WeightsError(f"storage {key}: expected {nbytes} bytes, file ends early")
        storage.data = np.frombuffer(raw, dtype=storage.dtype)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a legacy ``torch.save`` file, by name, as numpy arrays."""
    path = Path(path)
    storages: dict[str, _Storage] = {}
    try:
        with path.open("rb") as f:
            if _load_pickle(f, storages) != MAGIC_NUMBER:
                raise WeightsError(f"{path} is not a legacy torch.save file (bad magic number)")
            if _load_pickle(f, storages) != PROTOCOL_VERSION:
                raise WeightsError(f"{path}: unsupported torch.save protocol version")
            sys_info = _load_pickle(f, storages)
            if not sys_info.get("little_endian", True):
                raise WeightsError(f"{path} was written on a big-endian machine")
            state = _load_pickle(f, storages)
            keys = _load_pickle(f, storages)
            _read_storages(f, [str(k) for k in keys], storages)
    except (pickle.UnpicklingError, EOFError, struct.error, AttributeError, ValueError) as exc:
        raise WeightsError(f"{path} is not a readable torch state dict: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {
        name: ref.to_numpy() for name, ref in state.items() if isinstance(ref, _TensorRef)
    }
