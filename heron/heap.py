"""Give the heap's free memory back to the operating system after a start.

Parsing a tokenizer.json (32 MB of JSON for Gemma's 262,144-token vocabulary) or loading a
model frees far more than it keeps, but glibc's allocator holds freed memory in its arenas, where
it stays resident: measured on the default model, loading its tokenizer left 306 MiB resident
of which 193 MiB were free heap. ``release_free_heap`` (glibc's ``malloc_trim``) returns it. A
leaf: imports nothing from heron.

Trimming returns only whole free pages. The API process builds its tokenizer in a thread, whose
own arena then holds the tokenizer's tables among freed pieces of the JSON parse: with glibc's
default of 8 arenas per core that process kept ~215 MiB on the default model's first start,
with ``limit_arenas(2)`` ~185 MiB (``heron serve`` sets it before any thread starts).

The opposite case is an engine's step: its large buffers (a prefill's MLP output, 2,048 rows x
9,728 bf16 = 40 MB on the second benchmark model) are freed and asked for again at every layer.
glibc serves blocks above its mmap threshold (at most 32 MB, however it adapts) with fresh
mappings, so each such buffer is page faults and zeroed pages all over again.
``keep_step_buffers`` raises the threshold and keeps that much free at the heap's top.

Start-up also leaves ~220,000 long-lived Python objects (mostly a tokenizer's tables): one of
the garbage collector's full passes over them took 110 ms, a stall of whatever the process was
serving. ``freeze_startup_objects`` takes them out of its passes.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import mmap
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # glibc's mallopt parameter numbers
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
STEP_BUFFERS = 64 << 20  # keep_step_buffers' default: the largest block reused
_MADV_NOHUGEPAGE = 15  # Linux's madvise advice
_PAGE = 4096


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc; musl and others have none
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def limit_arenas(count: int) -> bool:
    """At most ``count`` malloc arenas in this process from now on (call it before threads
    start: arenas already made stay); False where the C library cannot."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    mallopt = _mallopt()
    return mallopt is not None and mallopt(_M_ARENA_MAX, count) == 1


def keep_step_buffers(max_bytes: int = STEP_BUFFERS) -> bool:
    """Serve blocks up to ``max_bytes`` from the heap, not from new mappings, and keep up to
    ``max_bytes`` free at the heap's top instead of returning it: a buffer freed in one layer
    is reused in the next, with no page faults. Resident memory may stay up to ``max_bytes``
    higher. False where the C library cannot (the default behaviour stays)."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    mallopt = _mallopt()
    return (mallopt is not None and mallopt(_M_MMAP_THRESHOLD, max_bytes) == 1
            and mallopt(_M_TRIM_THRESHOLD, max_bytes) == 1)


def freeze_startup_objects() -> None:
    """Once start-up is over: collect its garbage, then leave every object alive now out of
    the garbage collector's passes (they live as long as the process)."""
    gc.collect()
    gc.freeze()


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages() -> bool:
    """Whether Linux gives this process 2 MiB pages where it asks (``always`` or ``madvise``)."""
    try:
        return re.search(r"\[(always|madvise)\]", _THP_SETTING.read_text()) is not None
    except OSError:
        return False


def anonymous_huge(nbytes: int) -> np.ndarray:
    """``nbytes`` of zeroed anonymous memory starting on a 2 MiB boundary, which Linux is asked
    to back with huge pages (one TLB entry per 2 MiB instead of per 4 KiB); the array keeps its
    mapping alive. Pages are taken as they are first written."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(mapping, dtype=np.uint8)
    start = -whole.ctypes.data % HUGE_PAGE
    region = whole[start:start + nbytes]
    madvise = _madvise()
    if madvise is not None and nbytes:
        madvise(region.ctypes.data, -(-nbytes // HUGE_PAGE) * HUGE_PAGE, _MADV_HUGEPAGE)
    return region


def no_huge_pages(address: int, nbytes: int) -> bool:
    """Ask Linux to back ``[address, address + nbytes)`` with small pages only: numpy asks for
    transparent huge pages on arrays of 4 MiB or more, where a first touch of a few bytes then
    makes 2 MiB resident (a KV pool's first blocks: 2 MiB per layer). The whole pages inside the
    range are advised; False where that is not possible."""
    madvise = _madvise()
    start = -(-address // _PAGE) * _PAGE
    end = (address + nbytes) // _PAGE * _PAGE
    if madvise is None or end <= start:
        return False
    return madvise(start, end - start, _MADV_NOHUGEPAGE) == 0


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
