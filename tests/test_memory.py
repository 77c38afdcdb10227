"""geoseg.memory: freed heap pages go back to the OS between strips (glibc only)."""

import pytest

from geoseg import memory

glibc = pytest.mark.skipif(memory.heap_free_mb() is None, reason="needs glibc >= 2.33 (malloc_trim, mallinfo2)")


FRAGMENT = """
import numpy as np
from geoseg import memory

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

# Freeing a 16 MB array raises glibc's mmap threshold, so the 1 MB arrays below come from the heap;
# the 2 KB arrays kept between them (from malloc, not numpy's small-block cache) pin it, as open
# regions' pieces do between strips.
huge = np.ones(16 * 2**20 // 8)
del huge
big, small = [], []
for _ in range(300):
    big.append(np.ones(2**20 // 8))
    small.append(np.ones(256))
del big
free = memory.heap_free_mb()
before = rss()
returned = memory.release()
print(free, before, rss(), returned, len(small))
"""


@glibc
def test_release_returns_fragmented_heap_pages():
    # in a fresh interpreter: a test process's heap may hold free pages that were returned already
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True).stdout.split()
    free, before, after, returned = float(out[0]), float(out[1]), float(out[2]), out[3]
    assert free > memory.FREE_MB
    assert returned == "True"
    assert after < before - 100


@glibc
def test_release_leaves_a_small_free_heap_alone():
    memory.release(free_mb=0)  # whatever is free now is handed back
    assert memory.release(free_mb=10**9) is False


def test_release_is_harmless_everywhere():
    assert memory.release() in (True, False)
