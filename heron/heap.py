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
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # glibc's mallopt parameter number
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
