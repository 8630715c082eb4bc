"""Writing files safely: every file is either its old version or its complete new one.

The one atomic-write helper of the package (:func:`atomic_path`), used for run configs,
histories, checkpoints, reports and feature caches, plus the JSON and checksum helpers they
share. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush the folder entry of ``path`` (best effort: not every platform allows it)."""
    try:
        fd = os.open(Path(path).parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike, *, sync: bool = True, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it replaces ``path``.

    The temporary file is flushed to disk before the rename (``sync``), and removed if the
    body raises, so ``path`` never holds a half-written file. ``suffix`` ends the temporary
    name (for writers that insist on an extension, e.g. ``.weights.h5``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        if sync:
            _fsync_file(tmp)
        os.replace(tmp, path)
        if sync:
            fsync_dir(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def json_default(value: Any) -> Any:
    """JSON for numpy scalars and arrays, tuples and paths (anything else as its string)."""
    if hasattr(value, "tolist"):  # numpy scalar or array, without importing numpy
        return value.tolist()
    return str(value)


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(payload, indent=2, default=json_default) + "\n")


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
