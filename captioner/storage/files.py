"""Writing files safely: every file is either its old version or its complete new one.

The one atomic-write helper of the package (:func:`atomic_path`), used for run configs,
histories, checkpoints, reports and feature caches, plus the JSON and checksum helpers they
share. Standard library only.

Temporary files are named by :mod:`captioner.storage.temp_files` (``temp_path``): a later run can tell
whose each was, and ``remove_stale`` deletes those of this host whose process is gone (``kill
-9``, OOM, power cut), leaving alone those of running processes and of other hosts (a shared
file system); names of captioner 0.1.0 are recognised too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from captioner.storage.temp_files import remove_stale, temp_path


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
def atomic_path(
    path: str | os.PathLike,
    *,
    sync: bool = True,
    suffix: str = "",
    nbytes: int | None = None,
    hint: str = "",
) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it replaces ``path``.

    The temporary file is flushed to disk before the rename (``sync``), and removed if the
    body raises, so ``path`` never holds a half-written file. ``suffix`` ends the temporary
    name (for writers that insist on an extension, e.g. ``.weights.h5``). A machine fault
    (full disk, read-only, ...) becomes its one line (:mod:`captioner.storage.faults`), which names
    ``path`` and the ``nbytes`` being written (and gives ``hint`` when the disk is full).
    """
    from captioner.storage.faults import writing

    path = Path(path)
    remove_stale(path)
    tmp = temp_path(path, "part", suffix)
    with writing(path, nbytes, hint):
        try:
            yield tmp
            if sync:
                _fsync_file(tmp)
            os.replace(tmp, path)
            if sync:
                fsync_dir(path)
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # its folder is gone or read-only: the fault is reported
                pass


def write_bytes(path: str | os.PathLike, data: bytes, *, sync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, sync=sync, nbytes=len(data)) as tmp:
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
    return file_digest(path, "sha256", chunk)


def file_digest(path: str | os.PathLike, algorithm: str, chunk: int = 1 << 20) -> str:
    """The hex digest of a file by ``hashlib`` algorithm name, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
