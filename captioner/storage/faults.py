"""Faults of the machine under captioner: a full disk, a read-only file system, a permission,
a path component that is a file, too many open files, a folder removed while running.

Each becomes one line (:class:`~captioner.errors.MachineFaultError`, exit 2) naming the file,
built here and only here (:func:`fault_message`): write sites add what they know (the bytes
being written), and the CLI translates whatever reaches it. h5py reports these faults as
``OSError`` or ``RuntimeError`` with ``errno = N`` in the message; both are recognised.

HDF5 files whose write failed are never closed as they are: a failed flush inside
``H5Dclose``/``H5Fclose`` leaves an object half-closed, and the library crashes on it when it
is touched again (at the latest at exit, segmentation fault). :func:`abandon_hdf5` first
points the file's descriptor at an anonymous in-memory file, so every pending write succeeds
into nothing, then closes it: nothing more reaches the disk, and what was committed before
stays as it was. Standard library only (h5py is used only when the caller already has it).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from captioner.errors import MachineFaultError

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
FAULTS = NO_SPACE | {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EMFILE,
                     errno.ENFILE}  # fmt: skip
_H5_ERRNO = re.compile(r"errno = (\d+)")
H5PY_ERRORS = (OSError, RuntimeError, ValueError)  # what h5py raises for a failed write
_H5_NAME = re.compile(r"(?:file)?name = '([^']*)'")


def size_text(nbytes: float) -> str:
    """``nbytes`` as 512 B, 2.0 KB, 3.4 MB, 1.2 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(nbytes) < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TB"  # pragma: no cover


def fault_errno(exc: BaseException, *, writing: bool = False) -> int | None:
    """The errno of a machine fault behind ``exc`` (its causes included), else None.
    ``writing``: ENOENT counts too (a folder removed while a write was under way)."""
    codes = FAULTS | {errno.ENOENT} if writing else FAULTS
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in codes:
            return exc.errno
        if isinstance(exc, H5PY_ERRORS):
            found = _H5_ERRNO.search(str(exc))
            if found and int(found.group(1)) in codes:
                return int(found.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def _named(exc: BaseException) -> Path | None:
    """The file an exception names (its ``filename``, or h5py's ``name = '...'``), as the
    target of a temporary name."""
    from captioner.storage.temp_files import target_of

    name = getattr(exc, "filename", None)
    if not name and (found := _H5_NAME.search(str(exc))):
        name = found.group(1)
    return target_of(Path(os.fsdecode(name))) if name else None


def existing_folder(path: Path) -> Path:
    """The nearest folder of ``path`` (itself included) that exists."""
    path = Path(os.path.abspath(path))
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    """Free bytes for an unprivileged writer on the file system of ``path``; None if unknown."""
    try:
        return shutil.disk_usage(existing_folder(path)).free
    except OSError:
        return None


def _file_component(path: Path) -> Path:
    """The first component of ``path`` that exists and is not a folder."""
    for part in reversed([path, *path.parents]):
        if part.exists() and not part.is_dir():
            return part
    return path.parent


def fault_message(
    exc: BaseException,
    path: str | os.PathLike | None = None,
    nbytes: int | None = None,
    hint: str = "",
    *,
    writing: bool = False,
) -> str | None:
    """The one line for a machine fault behind ``exc`` (None when it is not one). ``path``:
    the file being written (default: the one ``exc`` names); ``nbytes``: how much was being
    written; ``hint``: advice for a full disk (e.g. ``--dtype float16``)."""
    code = fault_errno(exc, writing=writing)
    if code is None:
        return None
    target = Path(path) if path is not None else _named(exc)
    where = str(target) if target is not None else "a file"
    folder = existing_folder(target.parent) if target is not None else Path(".")
    if code in NO_SPACE:
        free = free_bytes(folder)
        what = "disk quota exceeded" if code == errno.EDQUOT else "no space left on the device"
        amount = f"{size_text(nbytes)} being written" if nbytes else "while writing"
        left = f", {size_text(free)} free in {folder}" if free is not None else ""
        return f"{what} of {where} ({amount}{left}): free some space{hint}"
    if code == errno.EROFS:
        return (f"{folder} is on a read-only file system, so {where} cannot be written: "
                "write to a folder on a writable disk")  # fmt: skip
    if code in (errno.EACCES, errno.EPERM):
        return (f"permission denied writing {where}: choose a folder you may write to, or "
                f"change the permissions of {folder}")  # fmt: skip
    if code == errno.ENOTDIR:
        blocker = _file_component(target) if target is not None else "a part of the path"
        return (
            f"{blocker} is a file, not a folder, so {where} cannot be written: choose another path"
        )
    if code == errno.ENOENT:
        if target is not None and target.parent.is_dir():
            return None  # the folder is there: not a fault of the machine
        return (f"the folder {target.parent if target else '?'} does not exist (or was removed "
                f"while writing {where}): create it (or choose another path)")  # fmt: skip
    limit = _open_files_limit()
    return (f"too many open files while writing {where} (this process may open {limit}): "
            "raise the limit, e.g. `ulimit -n 4096`, or use fewer --workers")  # fmt: skip


def _open_files_limit() -> str:
    try:
        import resource

        return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError, ValueError):  # pragma: no cover (not POSIX)
        return "a limited number"


def as_fault(
    exc: BaseException, path: str | os.PathLike | None = None, nbytes: int | None = None,
    hint: str = "",
) -> MachineFaultError | None:  # fmt: skip
    """:class:`MachineFaultError` for ``exc`` raised while writing ``path``, else None."""
    if isinstance(exc, MachineFaultError):
        return exc
    message = fault_message(exc, path, nbytes, hint, writing=True)
    return MachineFaultError(message) if message else None


@contextmanager
def writing(path: str | os.PathLike, nbytes: int | None = None, hint: str = "") -> Iterator[None]:
    """Turn a machine fault raised by the body (writing ``path``) into its one line."""
    try:
        yield
    except H5PY_ERRORS as exc:
        if (fault := as_fault(exc, path, nbytes, hint)) is None or fault is exc:
            raise
        raise fault from exc


# --------------------------------------------------------------------------- checks first


def check_space(path: str | os.PathLike, nbytes: int, what: str, hint: str = "") -> None:
    """One line, before any work, when the disk of ``path`` clearly cannot take ``nbytes``."""
    free = free_bytes(Path(path))
    if free is not None and nbytes > free:
        fault = MachineFaultError(
            f"{what} needs about {size_text(nbytes)} but {existing_folder(Path(path).parent)} "
            f"has {size_text(free)} free: free some space{hint}"
        )
        fault.before_work = True  # nothing was written: no resume hint
        raise fault


def check_writable(folder: str | os.PathLike, target: str | os.PathLike | None = None) -> None:
    """Create ``folder`` (and its parents) and write a byte there, so that a read-only,
    full or forbidden folder is one line before any work instead of after it."""
    folder = Path(folder)
    shown = Path(target) if target is not None else folder
    try:
        if folder.exists() and not folder.is_dir():
            raise MachineFaultError(
                f"{folder} is a file, not a folder, so {shown} cannot be written: choose another path"
            )
        with writing(shown):
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".captioner-probe-") as probe:
                probe.write(b"\0")
                probe.flush()
    except MachineFaultError as fault:
        fault.before_work = True  # nothing was written: no resume hint
        raise


# --------------------------------------------------------------------------- HDF5


def _sink() -> int:
    """A descriptor of an anonymous file that takes any write (memory; a temporary file
    where the platform has no ``memfd_create``)."""
    if hasattr(os, "memfd_create"):
        try:
            return os.memfd_create("captioner-abandoned")
        except OSError:
            pass
    return os.dup(tempfile.TemporaryFile().fileno())


def abandon_hdf5(file_id) -> None:
    """Close an h5py ``FileID`` whose write failed without writing another byte to its file
    (see the module docstring). Objects of the file still held in Python become invalid."""
    h5py = sys.modules.get("h5py")
    if h5py is None or not file_id.valid:
        return
    try:
        fd = file_id.get_vfd_handle()
    except Exception:  # noqa: BLE001 (a driver without a descriptor: memory, file object)
        fd = None
    if isinstance(fd, int) and fd >= 0:
        sink = _sink()
        os.dup2(sink, fd)
        os.close(sink)
    try:
        h5py.File(file_id).close()  # every object of the file, then the file
    except (OSError, RuntimeError):  # pragma: no cover (a sink takes every write)
        pass
