"""``allocator.keep_freed_memory``: a freed big array's memory is reused without new page faults.

Each check runs in a fresh Python process, so that the malloc settings do not leak into the tests."""

import ctypes
import subprocess
import sys

import pytest

from minimaml import allocator

HAS_MALLOPT = hasattr(ctypes.CDLL(None), "mallopt")

# Page faults of allocating, filling and freeing a 256 MB array, the second time round.
FAULTS_OF_A_REUSED_ARRAY = """
import resource, sys
import numpy
from minimaml import allocator
print(allocator.keep_freed_memory() if sys.argv[1] == "keep" else "default")
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = numpy.ones(64 << 20, dtype=numpy.float32)
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _reuse(mode: str, env=None):
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_ARRAY, mode], capture_output=True,
                         text=True, check=True, env=env)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not HAS_MALLOPT, reason="mallopt is glibc's")
def test_freed_big_arrays_are_reused_without_page_faults():
    applied, faults_kept = _reuse("keep")
    assert applied == "True"
    _, faults_default = _reuse("default")
    # By default glibc returns the block to the kernel, and it comes back a page at a time: 65,536 faults
    # of 4 KB pages, or ~128 of 2 MB pages where NumPy's huge pages are on (each still zero-filled).
    assert faults_default >= 100
    assert faults_kept <= faults_default // 10


def test_the_users_own_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert allocator.keep_freed_memory() is False
