"""Files written so that nothing is lost: atomic writes, and one run per output folder.

- ``write_atomic(path, write)``: the file appears whole or not at all (a temporary file beside it,
  flushed to disk, then renamed), with the user's umask;
- ``folder_lock(folder)``: a run holds its output folder; a second run on it fails at once, a lock left
  by a dead process is taken over, and the temporary files of this module's writes that a kill
  interrupted are removed (those names only: a user's own ``*.tmp`` files are never touched).
"""

from __future__ import annotations

import fcntl
import glob
import os
import tempfile
from contextlib import contextmanager


class FolderLockedError(RuntimeError):
    """Another live process is running in this output folder."""


TMP_MARK = ".minimaml-partial-"  # in the names of write_atomic's temporary files, and of no one else's


def write_atomic(path, write) -> None:
    """Create ``path`` by ``write(binary file)`` on ``.<name>.minimaml-partial-XXXX.tmp`` in the same
    folder, flushed to disk, then renamed over ``path``: the file on disk is always complete. Mode: the
    user's umask."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{TMP_MARK}", suffix=".tmp", dir=folder)
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


def process_running(pid: int) -> bool:
    """Whether a process with this pid is alive (for the temporary files of ``datadir``'s writers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


LOCK_NAME = ".lock"


@contextmanager
def folder_lock(folder, say=print):
    """Hold ``folder`` for this run: an exclusive ``fcntl.flock`` on ``<folder>/.lock``, which also holds
    the owner's pid for the message. The kernel drops the lock when its process dies, so a kill never
    leaves the folder locked, and two processes can never both hold it (a lock file being written, or
    one left behind, is no lock). A second run on the folder fails at once with ``FolderLockedError``.
    Holding the lock, the temporary files of ``write_atomic`` calls that a kill interrupted are removed:
    only names with ``TMP_MARK``, never a user's own ``*.tmp``."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 100).decode("ascii", "replace").split()
            os.close(fd)
            raise FolderLockedError(
                f"{folder} is in use by another run (process {owner[0] if owner else 'unknown'}, lock file "
                f"{path}); wait for it to finish or give this run another --out-dir") from None
        try:  # the file we locked must still be the one at ``path`` (the owner removes it when it ends)
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        left = os.read(fd, 100).decode("ascii", "replace").split()
        if left and left[0] != str(os.getpid()):
            say(f"taking over {path}: left by process {left[0]}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for leftover in glob.glob(os.path.join(glob.escape(str(folder)), f".*{TMP_MARK}*.tmp")):
            os.remove(leftover)
        yield
    finally:
        try:
            os.remove(path)  # still holding the lock: a waiting process finds the file gone and retries
        except OSError:
            pass
        os.close(fd)
