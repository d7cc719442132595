"""Atomic file writes: a temporary file in the target's folder, then one rename. Readers see the old file or the
new one, never a partial one, even when the writer is killed mid-way.

A writer killed by SIGKILL (or a power cut) leaves its temporary file behind. Temporary names carry the host and
the process id of the writer, ``.<name>.<host>-<pid>.<random>.tmp``, so the first write of a process into a folder
removes the temporaries there whose writer is gone: on this host, a process id that is no longer running; from
another host (a shared file system), or without a process id (written by versions before this one), a file not
touched for :data:`STALE_SECONDS`. A live writer's temporary is never removed.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["atomic_write", "remove_stale_temporaries", "STALE_SECONDS"]

log = logging.getLogger(__name__)

#: Age after which a temporary file whose writer cannot be checked is considered abandoned.
STALE_SECONDS = 24 * 3600.0

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"
_TEMPORARY = re.compile(r"\..+?\.(?:(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.)?[^.]+\.tmp")
_cleaned: set = set()  # (pid, folder) already cleaned by this process
# os.umask reads the umask only by setting it: two threads writing at once (the task writes its pickles from a
# thread pool) could each read the 0 the other set and leave the process with umask 0, and a folder made meanwhile
# would get mode 0777. Both happen under this lock.
_UMASK_LOCK = threading.Lock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return True
    return True


def remove_stale_temporaries(folder, now: float | None = None) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` in ``folder`` whose writer is gone; returns them."""
    folder = Path(folder)
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        host, pid = match.group("host"), match.group("pid")
        if pid is not None and host == _HOST:
            stale = int(pid) != os.getpid() and not _alive(int(pid))
        else:
            try:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > STALE_SECONDS
            except OSError:
                continue
        if stale:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:  # another process cleaned it first
                continue
            except OSError as exc:
                log.debug("cannot remove the stale temporary %s: %s", entry.path, exc)
                continue
            removed.append(Path(entry.path))
    if removed:
        log.info("removed %d temporary file(s) left by killed writers in %s", len(removed), folder)
    return removed


def _fsync_folder(folder) -> None:
    """Force a folder's entries (names created or renamed in it) to disk; where folders cannot be opened for that
    (Windows), the file system's own ordering is all there is."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot sync a folder: nothing to do
            raise
    finally:
        os.close(fd)


def atomic_write(path, write, fsync=False) -> Path:
    """Create ``path`` through ``write(fileobj)`` on a binary temporary file, then :func:`os.replace`.

    The file gets the permissions the umask gives new files (``mkstemp`` alone would leave it readable by its owner
    only, which breaks shared survey folders and packaged models). ``fsync=True`` is for files that a database row
    will point at once committed: it forces the bytes to disk before the rename, and after it the folder (and the
    folders above that this call created), so that the name survives a power cut too: a rename is recorded in its
    folder, which a file's own fsync does not write. The first write of a process into a folder removes the
    temporaries that killed writers left there (:func:`remove_stale_temporaries`). Threads of one process may call
    it at once.
    """
    path = Path(path)
    created = []  # the folders this call makes (their names are entries of their parents, synced below)
    if fsync:
        folder = path.parent
        while folder != folder.parent and not folder.exists():  # up to the first that exists, not to the root
            created.append(folder)
            folder = folder.parent
    with _UMASK_LOCK:
        path.parent.mkdir(parents=True, exist_ok=True)
    key = (os.getpid(), str(path.parent))
    if key not in _cleaned:
        _cleaned.add(key)
        remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        with _UMASK_LOCK:
            umask = os.umask(0)
            os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        if fsync:
            for folder in (path.parent, *(new.parent for new in created)):
                _fsync_folder(folder)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:  # a failed write names no file: name the one being written (disk full, ...)
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
