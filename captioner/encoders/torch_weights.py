"""Read legacy PyTorch ``torch.save`` state dicts into numpy arrays, without torch.

The legacy (non-zip) format is a sequence of pickles followed by raw storages:

1. the magic number, 2. the protocol version, 3. a ``sys_info`` dict,
4. the state dict, whose tensors refer to storages by persistent id,
5. the list of storage keys, then for each key: an int64 element count and the raw bytes.

Every pickle goes through :class:`_RestrictedUnpickler`, which resolves only
``torch._utils._rebuild_tensor_v2``, the ``torch.*Storage`` type names and
``collections.OrderedDict``; any other global is refused, so a crafted file cannot run code.
This is the project's one pickle reader, and it only ever rebuilds tensors.

Nothing in the file is trusted: the file is read into memory once and never beyond its end;
every storage's element count is checked against the bytes the file really holds before
anything is allocated, and every tensor view (offset, shape, strides) is checked against its
storage before an array is built (with ``np.ndarray`` over a bounded buffer, which numpy checks
again). A file that fails any check is refused with a :class:`WeightsError` naming the file
and the tensor.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioner.errors import WeightsError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
MAX_DIMS = 8  # no convolution or dense weight has more

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


class _Refused(Exception):
    """A check inside the file failed; :func:`load_state_dict` adds the file's name."""


@dataclass
class _Storage:
    """A storage named in the state dict; its bytes are read after the pickles."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class _TensorRef:
    """A tensor view into a storage (offset, shape and strides in elements), not yet checked."""

    storage: _Storage
    offset: object
    shape: object
    stride: object

    def check(self) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        """The view's (offset, shape, stride) once each is proven to lie inside the storage."""
        offset, shape, stride = self.offset, self.shape, self.stride
        if not _is_int(offset) or offset < 0:
            raise _Refused(f"offset {offset!r} is not an element index")
        if not isinstance(shape, tuple) or not isinstance(stride, tuple):
            raise _Refused("shape and strides must be tuples")
        if len(shape) != len(stride) or len(shape) > MAX_DIMS:
            raise _Refused(f"shape {shape!r} and strides {stride!r} do not pair up")
        if not all(_is_int(d) and d >= 0 for d in shape):
            raise _Refused(f"shape {shape!r} has a negative or non-integer dimension")
        if not all(_is_int(s) and s >= 0 for s in stride):
            raise _Refused(f"strides {stride!r} have a negative or non-integer entry")
        numel = math.prod(shape)
        if numel > self.storage.numel:
            raise _Refused(
                f"shape {shape} has {numel} elements, its storage only {self.storage.numel}")
        if numel:
            last = offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True))
            if last >= self.storage.numel:
                raise _Refused(
                    f"view (offset {offset}, shape {shape}, strides {stride}) reaches element "
                    f"{last} of a {self.storage.numel}-element storage")
        return offset, shape, stride

    def to_numpy(self) -> np.ndarray:
        """A contiguous copy of the checked view, detached from the storage buffer."""
        offset, shape, stride = self.check()
        data = self.storage.data
        if data is None:
            raise _Refused(f"storage {self.storage.key} is not in the file's storage list")
        if math.prod(shape) == 0:
            return np.empty(shape, data.dtype)
        item = data.itemsize
        steps = tuple(s * item if d > 1 else 0 for d, s in zip(shape, stride, strict=True))
        # the stride of a dimension of size 1 is never used (torch may write any value there)
        view = np.ndarray(shape, data.dtype, buffer=data, offset=offset * item,
                          strides=steps)  # numpy re-checks the extent
        return view.copy()


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only carries the dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


def _rebuild_tensor_v2(storage, offset, size, stride, *_):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor's storage is a {type(storage).__name__}")
    return _TensorRef(storage, offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that allows tensor rebuilding and nothing else."""

    def __init__(self, file, storages: dict[str, _Storage], limit: int):
        super().__init__(file)
        self.storages = storages
        self.limit = limit  # no storage can hold more bytes than the file has

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
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r:.80}")
        if not isinstance(key, str) or not _is_int(numel):
            raise pickle.UnpicklingError(f"storage key {key!r:.40} / size {numel!r:.40} of wrong type")
        if numel < 0 or numel * storage_type.dtype.itemsize > self.limit:
            raise pickle.UnpicklingError(
                f"storage {key} claims {numel} elements, more than the file could hold")
        known = self.storages.get(key)
        if known is None:
            self.storages[key] = known = _Storage(key, storage_type.dtype, numel)
        elif (known.dtype, known.numel) != (storage_type.dtype, numel):
            raise pickle.UnpicklingError(f"storage {key} is declared twice, differently")
        return known


def _load_pickle(f: io.BytesIO, storages: dict[str, _Storage], limit: int):
    return _RestrictedUnpickler(f, storages, limit).load()


def _read_storages(f: io.BytesIO, keys: object, storages: dict[str, _Storage]) -> None:
    """Read each storage's bytes, never past the end of the file or beyond its declared size."""
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _Refused("the storage key list is not a list of names")
    if len(set(keys)) != len(keys):
        raise _Refused("the storage key list names a storage twice")
    for key in keys:
        storage = storages.get(key)
        if storage is None:
            raise _Refused(f"storage {key} is listed but no tensor uses it")
        header = f.read(8)
        if len(header) != 8:
            raise _Refused(f"storage {key}: the file ends before its size")
        (numel,) = struct.unpack("<q", header)
        if numel != storage.numel:
            raise _Refused(f"storage {key} holds {numel} elements but was declared with "
                           f"{storage.numel}")
        nbytes = numel * storage.dtype.itemsize
        left = len(f.getbuffer()) - f.tell()
        if nbytes > left:
            raise _Refused(f"storage {key}: {nbytes} bytes expected, the file has {left} left")
        storage.data = np.frombuffer(f.read(nbytes), dtype=storage.dtype)


def _tensors(state: dict) -> dict[str, np.ndarray]:
    out = {}
    for name, ref in state.items():
        if isinstance(ref, _TensorRef):
            try:
                out[str(name)] = ref.to_numpy()
            except _Refused as exc:
                raise _Refused(f"tensor {str(name)[:80]!r}: {exc}") from None
    return out


def _read(raw: bytes) -> dict[str, np.ndarray]:
    f = io.BytesIO(raw)
    storages: dict[str, _Storage] = {}
    limit = len(raw)
    if _load_pickle(f, storages, limit) != MAGIC_NUMBER:
        raise _Refused("not a legacy torch.save file (bad magic number)")
    if _load_pickle(f, storages, limit) != PROTOCOL_VERSION:
        raise _Refused("unsupported torch.save protocol version")
    sys_info = _load_pickle(f, storages, limit)
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
        raise _Refused("written on a big-endian machine or without system info")
    state = _load_pickle(f, storages, limit)
    if not isinstance(state, dict):
        raise _Refused(f"holds a {type(state).__name__}, not a state dict")
    _read_storages(f, _load_pickle(f, storages, limit), storages)
    return _tensors(state)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a legacy ``torch.save`` file, by name, as numpy arrays (checked views)."""
    path = Path(path)
    try:
        return _read(path.read_bytes())
    except _Refused as exc:
        raise WeightsError(f"{path}: refused as a torch state dict: {exc}") from None
    except (pickle.UnpicklingError, EOFError, struct.error, AttributeError, ValueError,
            TypeError, IndexError, KeyError, MemoryError, RecursionError, OverflowError) as exc:
        raise WeightsError(f"{path} is not a readable torch state dict: "
                           f"{type(exc).__name__}: {str(exc)[:200]}") from None
