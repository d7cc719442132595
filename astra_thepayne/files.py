"""Atomic file writes: a temporary file in the target's folder, then one rename. Readers see the old file or the
new one, never a partial one, even when the writer is killed mid-way."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path, write, fsync=False) -> Path:
    """Create ``path`` through ``write(fileobj)`` on a binary temporary file, then :func:`os.replace`.

    The file gets the permissions the umask gives new files (``mkstemp`` alone would leave it readable by its owner
    only, which breaks shared survey folders and packaged models). ``fsync=True`` forces the bytes to disk before
    the rename, for files that a database row will point at once committed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
