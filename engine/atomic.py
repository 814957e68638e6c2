"""Writes that a crash cannot leave half done: write under a temporary name beside the target, then rename.

``os.replace`` is atomic within one filesystem, so the target name only ever
names a complete file or folder: the previous one until the rename, the new
one after it. Checkpoints, adapter files and converted model folders are
written this way.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def write_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(temporary)`` creates a file or a folder at ``temporary``; it then replaces ``target``.

    The temporary name is hidden (a leading dot) and carries the process id, so
    listings of the parent ignore it and two processes never share it. Files
    are flushed to disk before the rename, so a power loss cannot leave a
    renamed but empty file. On any error, Ctrl-C included, the temporary is
    removed and ``target`` is untouched.
    """
    target = Path(target)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
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
