"""Writing files safely: every file is either its old version or its complete new one.

The one atomic-write helper of the package (:func:`atomic_path`), used for run configs,
histories, checkpoints, reports and feature caches, plus the JSON and checksum helpers they
share. Standard library only.

Temporary files: every temporary name is ``.<target name>.<host>.<pid>.<tag>.tmp[suffix]``
(:func:`temp_path`), so a later run can tell whose it was: :func:`remove_stale` deletes those
of this host whose process is gone (``kill -9``, OOM, power cut) and leaves alone those of
running processes and of other hosts (a shared file system). Names of captioner 0.1.0
(``.<stem>.<pid>[.union].h5.tmp``, ``.<name>.<pid>.tmp``) are recognised too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
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


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname() or "host")[:40]


def temp_path(path: str | os.PathLike, tag: str = "part", suffix: str = "") -> Path:
    """A temporary name beside ``path`` owned by this process (``tag`` tells uses apart;
    ``suffix`` ends the name, for writers that insist on an extension)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{tag}.tmp{suffix}")


def target_of(path: Path) -> Path:
    """The file a temporary name of :func:`temp_path` stands for (``path`` itself otherwise)."""
    found = re.fullmatch(
        r"\.(.+)\.[A-Za-z0-9-]+\.\d+\.[A-Za-z0-9_-]+\.tmp[A-Za-z0-9._-]*", path.name
    )
    return path.with_name(found.group(1)) if found else path


def _owner(name: str, target: Path) -> tuple[str | None, int] | None:
    """(host or None for first-release names, pid) of a temporary file of ``target``."""
    current = re.fullmatch(
        rf"\.{re.escape(target.name)}\.([A-Za-z0-9-]+)\.(\d+)\.[A-Za-z0-9_-]+\.tmp[A-Za-z0-9._-]*",
        name,
    )
    if current:
        return current.group(1), int(current.group(2))
    legacy = re.fullmatch(
        rf"\.\.?{re.escape(target.stem)}\.(\d+)\.(?:union\.h5\.\d+\.h5|union\.h5|h5)\.tmp", name
    )
    if legacy is None:  # atomic writes: .<name>.<pid>.tmp[suffix]
        legacy = re.fullmatch(rf"\.{re.escape(target.name)}\.(\d+)\.tmp[A-Za-z0-9._-]*", name)
    if legacy:
        return None, int(legacy.group(1))
    return None


def process_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this host (or cannot be checked)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else, or unknown: keep its files
    return True


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files of ``path`` left by processes of this host that no longer run."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    stale = []
    for entry in entries:
        owner = _owner(entry.name, target)
        if owner is None:
            continue
        host, pid = owner
        if host not in (None, _HOST) or pid == os.getpid() or process_alive(pid):
            continue
        stale.append(entry)
    return sorted(stale)


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Delete the stale temporary files of ``path`` (see :func:`stale_temp_files`)."""
    removed = []
    for entry in stale_temp_files(path):
        try:
            entry.unlink()
            removed.append(entry)
        except FileNotFoundError:
            pass  # another run removed it first
        except OSError:
            continue
    return removed


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
    (full disk, read-only, ...) becomes its one line (:mod:`captioner.faults`), which names
    ``path`` and the ``nbytes`` being written (and gives ``hint`` when the disk is full).
    """
    from captioner.faults import writing

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
