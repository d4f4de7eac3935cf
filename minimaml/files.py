"""Files written so that nothing is lost: atomic writes, and one run per output folder.

- ``write_atomic(path, write)``: the file appears whole or not at all (a temporary file beside it,
  flushed to disk, then renamed), with the user's umask;
- ``folder_lock(folder)``: a run holds its output folder; a second run on it fails at once, a lock left
  by a dead process is taken over, and the temporary files of writes that a kill interrupted are removed.
"""

from __future__ import annotations

import glob
import os
import tempfile
from contextlib import contextmanager


class FolderLockedError(RuntimeError):
    """Another live process is running in this output folder."""


def write_atomic(path, write) -> None:
    """Create ``path`` by ``write(binary file)`` on ``<name>.XXXX.tmp`` in the same folder, flushed to
    disk, then renamed over ``path``: the file on disk is always complete. Mode: the user's umask."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is put back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


LOCK_NAME = ".lock"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux ``/proc``), to tell a live owner from a new
    process that reuses a dead owner's pid; None where ``/proc`` is absent."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_running(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` is alive (and, given ``start``, is the one that started then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or _process_start(pid) in (None, start)


@contextmanager
def folder_lock(folder, say=print):
    """Hold ``folder`` for this run: ``<folder>/.lock`` holds the owner's pid (created exclusively).
    A second run on the folder fails at once with ``FolderLockedError``; a lock left by a process that
    is no longer running is taken over, with a message. Holding the lock, the temporary files of writes
    that a kill interrupted (``*.tmp``) are removed."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    me = f"{os.getpid()} {_process_start(os.getpid())}\n"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    fields = f.read().split()
                pid, start = int(fields[0]), (fields[1] if len(fields) > 1 and fields[1] != "None" else None)
            except (OSError, ValueError, IndexError):
                pid, start = None, None  # being written, or garbage: treat as stale below
            if pid is not None and process_running(pid, start):
                raise FolderLockedError(
                    f"{folder} is in use by another run (process {pid}, lock file {path}); wait for it to "
                    f"finish or give this run another --out-dir") from None
            say(f"taking over {path}: left by process {pid}, which is no longer running")
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me)
        break
    try:
        for pattern in ("*.tmp", ".*.tmp"):  # glob's * skips names that start with a dot
            for leftover in glob.glob(os.path.join(glob.escape(str(folder)), pattern)):
                os.remove(leftover)
        yield
    finally:
        try:
            with open(path, encoding="utf-8") as f:
                mine = f.read() == me
            if mine:
                os.remove(path)
        except OSError:
            pass
