"""``minimaml.parallel``: the thread count from ``MINIMAML_THREADS``, which passes are shared out, and
``map_shares`` splitting blocks into contiguous shares that run on separate threads, results in share
order, errors passed on."""

from __future__ import annotations

import threading

import pytest

from minimaml import parallel


def test_cpu_threads_reads_the_environment(monkeypatch):
    monkeypatch.delenv("MINIMAML_THREADS", raising=False)
    assert parallel.cpu_threads() >= 1
    monkeypatch.setenv("MINIMAML_THREADS", "3")
    assert parallel.cpu_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("MINIMAML_THREADS", bad)
        with pytest.raises(ValueError, match="MINIMAML_THREADS"):
            parallel.cpu_threads()


def test_small_passes_stay_on_one_thread_while_blas_has_its_own(monkeypatch):
    monkeypatch.setenv("MINIMAML_THREADS", "2")
    monkeypatch.setattr(parallel, "_blas_limit", None)
    assert parallel.threads_for(parallel.SHARE_MIN_BYTES - 1) == 1
    assert parallel.threads_for(parallel.SHARE_MIN_BYTES) == 2
    monkeypatch.setattr(parallel, "_blas_limit", object())  # BLAS already held to one thread
    assert parallel.threads_for(1) == 2
    monkeypatch.setenv("MINIMAML_THREADS", "1")
    assert parallel.threads_for(1 << 40) == 1


@pytest.mark.parametrize("threads, n_blocks, n_shares", [(1, 5, 1), (2, 5, 2), (3, 7, 3), (4, 2, 2), (3, 1, 1)])
def test_map_shares_covers_every_block_once_in_order(threads, n_blocks, n_shares):
    blocks = list(range(n_blocks))
    shares = parallel.map_shares(lambda share: list(share), blocks, threads)
    assert len(shares) == n_shares
    assert [b for share in shares for b in share] == blocks


def test_map_shares_runs_shares_on_separate_threads():
    barrier = threading.Barrier(3, timeout=10)  # passes only if all three shares run at the same time

    def work(share):
        barrier.wait()
        return threading.get_ident()

    idents = parallel.map_shares(work, [0, 1, 2], 3)
    assert len(set(idents)) == 3 and idents[0] == threading.get_ident()


def test_map_shares_passes_on_a_worker_error():
    def work(share):
        if share[0] == 2:
            raise RuntimeError("share two failed")
        return share

    with pytest.raises(RuntimeError, match="share two failed"):
        parallel.map_shares(work, [0, 1, 2, 3], 2)
