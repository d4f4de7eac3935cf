"""Files written so nothing is lost: one run per folder (live owners refused, dead ones taken over,
leftovers of killed writes removed) and atomic writes with the user's umask."""

import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from minimaml import files


HOLD = "import sys, time; from minimaml import files\nwith files.folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"


def test_a_folder_held_by_a_live_process_is_refused(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline() == "held\n"
        with pytest.raises(files.FolderLockedError, match=f"in use by another run \\(process {owner.pid}"):
            with files.folder_lock(tmp_path):
                pass
    finally:
        owner.kill()
        owner.wait()
    assert (tmp_path / files.LOCK_NAME).exists()  # the owner's lock is left alone
    with files.folder_lock(tmp_path):  # the kernel dropped the killed owner's lock
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over_and_only_our_leftovers_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / files.LOCK_NAME).write_text(f"{dead.pid}\n")
    ours = [f".maml.ckpt.npz{files.TMP_MARK}abc123.tmp", f".results.json{files.TMP_MARK}xyz.tmp"]
    users = ["notes.tmp", ".draft.tmp", "results.json.abc.tmp"]
    for leftover in ours + users:
        (tmp_path / leftover).write_bytes(b"half")
    (tmp_path / "maml.ckpt.npz").write_bytes(b"kept")
    said = []
    with files.folder_lock(tmp_path, say=said.append):
        assert sorted(os.listdir(tmp_path)) == sorted([".lock", "maml.ckpt.npz", *users])
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(files.FolderLockedError):  # a second holder in this very process too
            with files.folder_lock(tmp_path):
                pass
    assert said and f"left by process {dead.pid}, which is no longer running" in said[0]
    assert sorted(os.listdir(tmp_path)) == sorted(["maml.ckpt.npz", *users])


def _try_lock(folder, barrier, holders):
    barrier.wait()
    try:
        with files.folder_lock(folder, say=lambda line: None):
            entered = time.monotonic()  # the same clock in every process
            time.sleep(0.3)
            holders.put((entered, time.monotonic()))
    except files.FolderLockedError:
        pass


def test_processes_racing_for_a_lock_file_being_written_never_both_hold_it(tmp_path):
    """The audit's race: an empty lock file (its owner still writing it, or left so) and several
    processes released at once by a barrier. Each trial, one of them holds the folder, and no two
    holdings overlap in time (a racer delayed past the first holder's end may hold it after it)."""
    context = multiprocessing.get_context("fork")
    for trial in range(15):
        folder = tmp_path / str(trial)
        folder.mkdir()
        (folder / files.LOCK_NAME).write_text("")
        barrier, holders = context.Barrier(4), context.Queue()
        racers = [context.Process(target=_try_lock, args=(folder, barrier, holders)) for _ in range(4)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(30)
        held = []
        while not holders.empty():
            held.append(holders.get())
        held.sort()
        assert held and all(end <= start for (_, end), (start, _) in zip(held, held[1:])), (trial, held)


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
