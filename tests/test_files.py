"""Files written so nothing is lost: one run per folder (live owners refused, dead ones taken over,
leftovers of killed writes removed) and atomic writes with the user's umask."""

import os
import subprocess
import sys

import pytest

from minimaml import files


def test_a_folder_held_by_a_live_process_is_refused(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / files.LOCK_NAME).write_text(f"{owner.pid} {files._process_start(owner.pid)}\n")
        with pytest.raises(files.FolderLockedError, match=f"in use by another run \\(process {owner.pid}"):
            with files.folder_lock(tmp_path):
                pass
    finally:
        owner.kill()
        owner.wait()
    assert (tmp_path / files.LOCK_NAME).exists()  # the owner's lock is left alone


def test_a_lock_left_by_a_dead_process_is_taken_over_and_leftovers_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / files.LOCK_NAME).write_text(f"{dead.pid} 12345\n")
    for leftover in ("maml.ckpt.npz.abc123.tmp", ".results.json.xyz.tmp"):
        (tmp_path / leftover).write_bytes(b"half")
    (tmp_path / "maml.ckpt.npz").write_bytes(b"kept")
    said = []
    with files.folder_lock(tmp_path, say=said.append):
        assert sorted(os.listdir(tmp_path)) == [".lock", "maml.ckpt.npz"]
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(files.FolderLockedError):  # a second holder in this very process too
            with files.folder_lock(tmp_path):
                pass
    assert said and f"left by process {dead.pid}, which is no longer running" in said[0]
    assert os.listdir(tmp_path) == ["maml.ckpt.npz"]


def test_files_are_written_with_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        files.write_atomic(tmp_path / "ckpt.npz", lambda f: f.write(b"x"))
        os.umask(0o077)
        files.write_atomic(tmp_path / "private.npz", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "ckpt.npz").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(tmp_path / "private.npz").st_mode & 0o777) == oct(0o600)
