"""``heron.heap.release_free_heap``: freed heap memory that glibc keeps resident goes back to the
OS (a start frees hundreds of MB: tokenizer.json parsing, model loading)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from heron import heap
from heron.heap import (
    HUGE_PAGE,
    anonymous_huge,
    limit_arenas,
    release_free_heap,
    transparent_huge_pages,
)

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


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds ``address`` (/proc/self/smaps)."""
    return _smaps_field(address, "VmFlags:")


def _smaps_field(address: int, field: str) -> list[str]:
    """A field of the mapping that holds ``address`` (/proc/self/smaps), split."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= address < high
            elif inside and head == field:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_kv_pool_pages_are_small() -> None:
    """numpy advises huge pages on large arrays ("hg"): a KV pool's first touched block would
    make 2 MiB per layer resident. The pool withdraws that advice ("nh")."""
    import numpy as np
    import torch

    from heron.engine.runner import _zeros

    inside = 2**20  # numpy advises whole pages only: not the first, which it shares
    assert "hg" in _vm_flags(np.zeros(64 * 2**20, dtype=np.uint8).ctypes.data + inside)
    pool = _zeros((2, 1024, 16, 1, 256), torch.bfloat16, torch.device("cpu"))  # 16 MiB
    pool[0, 0] = 1.0
    flags = _vm_flags(pool.data_ptr() + inside)
    assert "nh" in flags and "hg" not in flags, flags
    assert float(pool.float().sum()) == 16 * 256  # still zeros elsewhere


def test_anonymous_huge_memory_starts_on_a_huge_page_and_asks_for_them() -> None:
    """Where ``--gguf-memory copy`` puts a GGUF file's blocks: 2 MiB-aligned, advised "hg"."""
    region = anonymous_huge(8 * HUGE_PAGE + 4096)
    assert region.ctypes.data % HUGE_PAGE == 0 and region.nbytes == 8 * HUGE_PAGE + 4096
    assert "hg" in _vm_flags(region.ctypes.data) and int(region.sum()) == 0  # zeroed
    region[:] = 3
    assert int(region.sum(dtype=np.uint64)) == 3 * region.nbytes


@pytest.mark.skipif(not transparent_huge_pages(),
                    reason="this kernel's transparent huge pages are off ([never])")
def test_anonymous_huge_memory_is_backed_by_huge_pages() -> None:
    region = anonymous_huge(16 * HUGE_PAGE)
    region[:] = 1  # first writes take the pages
    assert int(_smaps_field(region.ctypes.data, "AnonHugePages:")[0]) >= 2048  # kB


def test_transparent_huge_pages_reads_the_kernels_setting(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    setting = tmp_path / "enabled"
    monkeypatch.setattr(heap, "_THP_SETTING", setting)
    for text, expected in (("always [madvise] never\n", True), ("[always] madvise never\n", True),
                           ("always madvise [never]\n", False)):
        setting.write_text(text)
        assert transparent_huge_pages() is expected, text
    setting.unlink()
    assert transparent_huge_pages() is False  # not Linux, or no such file


_ARENAS = """
import ctypes, sys, threading
from heron.heap import limit_arenas
if sys.argv[1] == "limit":
    assert limit_arenas(2)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
start = threading.Barrier(6)
def work():
    start.wait()
    for _ in range(200):
        libc.malloc(1000)  # a thread's first malloc picks (or makes) its arena
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
out = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.malloc_info(0, out)
libc.fclose.argtypes = [ctypes.c_void_p]
libc.fclose(out)
"""


@pytest.mark.parametrize(("mode", "most"), [("limit", 2), ("default", None)])
def test_limit_arenas(tmp_path: Path, mode: str, most: int | None) -> None:
    """Threads share at most two malloc arenas once limited (glibc's default is 8 per core)."""
    report = tmp_path / "malloc_info.xml"
    subprocess.run([sys.executable, "-c", _ARENAS, mode, str(report)], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    arenas = report.read_text().count("<heap nr=")
    if most is None:
        assert arenas > 2  # the check itself sees threads' own arenas
    else:
        assert arenas == most


def test_limit_arenas_refuses_zero() -> None:
    with pytest.raises(ValueError, match="positive"):
        limit_arenas(0)


_STEP_BUFFERS = """
import ctypes, resource, sys
from heron.heap import keep_step_buffers
if sys.argv[1] == "keep":
    assert keep_step_buffers()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 40 << 20  # the second benchmark model's prefill MLP output, 2,048 rows
def step():  # a buffer asked for, written, freed: as each layer does
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    libc.free(block)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.parametrize("mode", ["keep", "default"])
def test_keep_step_buffers_reuses_a_freed_large_block(mode: str) -> None:
    """A 40 MB block freed and asked for again: glibc maps fresh pages each time (10,240 page
    faults per step) unless ``keep_step_buffers`` keeps it in the heap (no faults)."""
    out = subprocess.run([sys.executable, "-c", _STEP_BUFFERS, mode], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    faults = int(out.stdout)
    if mode == "keep":
        assert faults < 100, faults
    else:
        assert faults >= 5 * (40 << 20) // os.sysconf("SC_PAGE_SIZE") // 2, faults


def test_keep_step_buffers_refuses_zero() -> None:
    with pytest.raises(ValueError, match="positive"):
        heap.keep_step_buffers(0)


def test_freeze_startup_objects_leaves_them_out_of_collections() -> None:
    import gc

    table = [{"token": i} for i in range(1000)]  # a start-up's long-lived tables
    try:
        heap.freeze_startup_objects()
        assert gc.get_freeze_count() >= len(table)
        assert not any(obj is table for obj in gc.get_objects())
    finally:
        gc.unfreeze()
