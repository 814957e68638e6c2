"""Writes that a crash cannot leave half done: write under a temporary name beside the target, then rename.

``os.replace`` is atomic within one filesystem, so the target name only ever
names a complete file or folder: the previous one until the rename, the new
one after it. Checkpoints, adapter files and converted model folders are
written this way. A process killed mid-write (SIGKILL, power loss) leaves its
temporary behind; ``remove_stale_temporaries`` clears those of dead processes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

_TEMPORARY = ".tmp-"  # a temporary is named .<target name>.tmp-<process id>


def write_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(temporary)`` creates a file or a folder at ``temporary``; it then replaces ``target``.

    The temporary name is hidden (a leading dot) and carries the process id, so
    listings of the parent ignore it and two processes never share it. Files
    are flushed to disk before the rename, so a power loss cannot leave a
    renamed but empty file. On any error, Ctrl-C included, the temporary is
    removed and ``target`` is untouched.
    """
    target = Path(target)
    temporary = target.with_name(f".{target.name}{_TEMPORARY}{os.getpid()}")
    _remove(temporary)  # left by an earlier crash of a process with the same id
    try:
        write(temporary)
        _fsync(temporary)
        if target.is_dir():  # os.replace cannot replace a non-empty folder: the old one goes first
            shutil.rmtree(target)
        os.replace(temporary, target)
    except BaseException:
        _remove(temporary)
        raise
    return target


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries in ``folder`` that killed writes left behind; returns what was removed.

    A temporary is stale when its process is no longer running, or is this
    process (which is not writing while it cleans up). Another live process's
    temporary is left alone: it may be in the middle of its write.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [path for path in folder.iterdir() if _is_stale(path.name)]
    for path in stale:
        _remove(path)
    return stale


def _is_stale(name: str) -> bool:
    """True for a temporary's name (.<target>.tmp-<pid>) whose writer is this process or no longer runs."""
    _, separator, pid = name.rpartition(_TEMPORARY)
    if not (name.startswith(".") and separator and pid.isdigit()):
        return False  # not a temporary: never touched
    return int(pid) == os.getpid() or not _process_exists(int(pid))


def _process_exists(pid: int) -> bool:
    if os.name != "posix":  # on Windows os.kill(pid, 0) would end the process: assume it runs, keep its file
        return True
    try:
        os.kill(pid, 0)  # signal 0 delivers nothing: it only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # no such process (or no process could have that id)
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _fsync(path: Path) -> None:
    for file in [path] if path.is_file() else path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
