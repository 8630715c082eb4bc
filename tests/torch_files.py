"""Write legacy ``torch.save`` files without torch, with any (even impossible) tensor views.

The reader's tests need files a crafted download could hold: views past their storage, negative
strides, storages that claim more elements than the file has. The pure-Python pickler writes the
same opcodes torch does; ``Global`` objects are written as GLOBAL opcodes for names that need
not be importable here.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captioner.encoders.torch_weights import MAGIC_NUMBER, PROTOCOL_VERSION

STORAGE_NAMES = {np.dtype("<f4"): "FloatStorage", np.dtype("<f2"): "HalfStorage",
                 np.dtype("<i8"): "LongStorage"}


@dataclass(frozen=True)
class Global:
    """A global by name (``torch.FloatStorage``), written without importing it."""

    module: str
    name: str

    def __call__(self, *args):  # the pickler wants reduce functions to be callable
        raise NotImplementedError


@dataclass
class Storage:
    """A storage: its values, and the element count the file declares for it."""

    key: str
    values: np.ndarray
    declared: int | None = None  # None: the true count

    @property
    def numel(self) -> int:
        return len(self.values) if self.declared is None else self.declared


@dataclass
class Tensor:
    """A view into a storage, written as torch writes ``_rebuild_tensor_v2`` calls."""

    storage: Storage
    offset: int
    shape: tuple
    stride: tuple

    def __reduce__(self):
        hooks = collections.OrderedDict()
        return (Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, self.shape, self.stride, False, hooks))


@dataclass
class LegacyFile:
    """The parts of a legacy file; ``bytes()`` lays them out, ``size_field`` overrides counts."""

    tensors: dict[str, Tensor]
    size_field: dict[str, int] = field(default_factory=dict)  # storage key -> written count

    def storages(self) -> list[Storage]:
        seen: dict[str, Storage] = {}
        for t in self.tensors.values():
            seen.setdefault(t.storage.key, t.storage)
        return list(seen.values())

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}):
            _Pickler(out).dump(obj)
        _Pickler(out).dump(collections.OrderedDict(self.tensors))
        storages = self.storages()
        _Pickler(out).dump([s.key for s in storages])
        for s in storages:
            out.write(struct.pack("<q", self.size_field.get(s.key, s.numel)))
            out.write(s.values.tobytes())
        return out.getvalue()

    def write(self, path: Path, truncate: int = 0) -> Path:
        data = self.to_bytes()
        path.write_bytes(data[: len(data) - truncate] if truncate else data)
        return path


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its ``save`` can be extended
    def __init__(self, file):
        super().__init__(file, protocol=2)

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            name = STORAGE_NAMES[obj.values.dtype]
            return ("storage", Global("torch", name), obj.key, "cpu", obj.numel, None)
        return None


def one_tensor(values, offset=0, shape=None, stride=None, declared=None) -> LegacyFile:
    """A file with one tensor ``w`` over one storage holding ``values``."""
    values = np.asarray(values, np.float32)
    shape = (len(values),) if shape is None else shape
    stride = (1,) if stride is None else stride
    return LegacyFile({"w": Tensor(Storage("0", values, declared), offset, shape, stride)})
