"""Temporary file names: each is owned by one process of one host, maps back to the file it
stands for, and is removed once its process is gone (stale files of killed runs).

A name is ``.<target>.<host>.<pid>.<tag>.tmp[<suffix>]`` beside its target; names of the first
release (``.<target>.<pid>.tmp``) are still recognised as stale.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

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
