"""``heron.heap.release_free_heap``: freed heap memory that glibc keeps resident goes back to the
OS (a start frees hundreds of MB: tokenizer.json parsing, model loading)."""

from __future__ import annotations

import ctypes
import sys

import pytest

from heron.heap import release_free_heap

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="malloc_trim is glibc's (Linux)")


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_freed_heap_below_a_live_block_is_returned() -> None:
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    blocks = [libc.malloc(4096) for _ in range(50_000)]  # 200 MB of small blocks (on the heap)
    for block in blocks:
        libc.memset(block, 1, 4096)  # touched: resident
    top = libc.malloc(4096)  # still in use above them: glibc cannot shrink the heap by itself
    for block in blocks:
        libc.free(block)
    before = _rss_mib()
    assert release_free_heap()
    after = _rss_mib()
    libc.free(top)
    assert before - after > 150, (before, after)
