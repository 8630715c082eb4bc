"""Temporary files beside their target: named after the writing process, removed when stale.

A file built under a temporary name and ``os.replace``-d into place is never seen half
written, but a process killed meanwhile (``kill -9``, OOM, power cut) leaves the temporary
file behind. Every temporary name made here is ``.<target name>.<host>.<pid>.<tag>.tmp``, so a
later run can tell whose it was: :func:`remove_stale` deletes those of this host whose
process is gone, and leaves alone those of running processes and of other hosts (a shared
file system). Names of the first release (``.<stem>.<pid>[.union].h5.tmp``) are recognised
too.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname() or "host")[:40]


def temp_path(path: str | os.PathLike, tag: str = "part") -> Path:
    """A temporary name beside ``path`` owned by this process (``tag`` tells uses apart)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{tag}.tmp")


def _owner(name: str, target: Path) -> tuple[str | None, int] | None:
    """(host or None for first-release names, pid) of a temporary file of ``target``."""
    current = re.fullmatch(
        rf"\.{re.escape(target.name)}\.([A-Za-z0-9-]+)\.(\d+)\.[A-Za-z0-9_-]+\.tmp", name
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
