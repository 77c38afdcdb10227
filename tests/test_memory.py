"""geoseg.memory: freed heap pages go back to the OS between strips (glibc only)."""

import numpy as np
import pytest

from geoseg import memory

glibc = pytest.mark.skipif(memory.heap_free_mb() is None, reason="needs glibc >= 2.33 (malloc_trim, mallinfo2)")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@glibc
def test_release_returns_fragmented_heap_pages():
    # Freeing a 16 MB array raises glibc's mmap threshold, so the 1 MB arrays below come from the
    # heap; the small arrays kept between them pin it, as open regions' pieces do between strips.
    huge = np.ones(16 * 2**20 // 8)
    del huge
    big, small = [], []
    for _ in range(300):
        big.append(np.ones(2**20 // 8))
        small.append(np.ones(256))  # 2 KB: from malloc, not numpy's small-block cache
    del big
    assert memory.heap_free_mb() > memory.FREE_MB
    before = _rss_mb()
    assert memory.release() is True
    assert _rss_mb() < before - 100
    assert len(small) == 300


@glibc
def test_release_leaves_a_small_free_heap_alone():
    memory.release(free_mb=0)  # whatever is free now is handed back
    assert memory.release(free_mb=10**9) is False


def test_release_is_harmless_everywhere():
    assert memory.release() in (True, False)
