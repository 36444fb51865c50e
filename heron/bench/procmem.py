"""Resident memory of a whole server: a process and all its descendants, read from ``/proc``.

heron serves from several processes (the API process, one or more engine cores, compilers
during a first start); llama.cpp's server from one. Their memory is compared as the sum over
the process tree: RSS (what ``ps`` and ``top`` show; pages shared between processes, such as
libraries, count once per process) and PSS (shared pages split between the processes that map
them, so the sum is the tree's real footprint). ``PeakSampler`` polls the tree's RSS in a
thread (every 50 ms by default) and keeps the largest sum seen, and how it was split between
the processes (by ``process_label``: heron's API process, its engine core, a compiler...).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

PROC = Path("/proc")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant of it (root first)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            parent = _parent(entry)
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, []))
    return found


def _parent(entry: Path) -> int | None:
    try:
        stat = (entry / "stat").read_text()
    except OSError:  # exited meanwhile
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])  # after "pid (comm) state"


def rss_bytes(pid: int) -> int:
    """Resident bytes of one process (0 if it is gone)."""
    try:
        return int((PROC / str(pid) / "statm").read_text().split()[1]) * PAGE_BYTES
    except OSError:
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 if it is gone)."""
    try:
        rollup = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return 0
    for line in rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class TreeMemory:
    """One reading of a process tree's memory."""

    rss: int
    pss: int
    processes: int


def tree_memory(root: int) -> TreeMemory:
    pids = tree_pids(root)
    return TreeMemory(rss=sum(rss_bytes(pid) for pid in pids),
                      pss=sum(pss_bytes(pid) for pid in pids), processes=len(pids))


def tree_rss(root: int) -> int:
    return sum(rss_bytes(pid) for pid in tree_pids(root))


def process_label(pid: int, root: int) -> str:
    """What a process of the tree is: "server" (the root: heron's API process, llama-server),
    "engine core" (heron's engine), "resource tracker" (multiprocessing's), "grammar
    encoder" (heron's forced-text tokenizer), else the program's name (cc1, as: heron compiling
    its kernels)."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    text = b" ".join(argv)
    if pid == root:
        return "server"
    if b"heron-engine-core" in text or b"spawn_main" in text:  # spawn_main: heron before 12-06
        return "engine core"
    if b"resource_tracker" in text:
        return "resource tracker"
    if b"forced_text.py" in text:
        return "grammar encoder"
    return os.path.basename(argv[0].decode(errors="replace")) or "?"


class PeakSampler:
    """``with PeakSampler(pid) as s: ...`` then ``s.peak``: the largest tree RSS sum seen, and
    ``s.peak_split``: each process kind's RSS in that reading (see ``process_label``)."""

    def __init__(self, root: int, interval_s: float = 0.05) -> None:
        self.root, self.interval_s = root, interval_s
        self.peak, self.samples = 0, 0
        self.peak_split: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # one last reading, so a short window still has one

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        readings = {pid: rss_bytes(pid) for pid in tree_pids(self.root)}
        self.samples += 1
        if sum(readings.values()) <= self.peak:
            return
        self.peak = sum(readings.values())
        split: dict[str, int] = {}
        for pid, rss in readings.items():
            label = process_label(pid, self.root)  # not kept: between fork and exec a child
            split[label] = split.get(label, 0) + rss  # still shows its parent's command
        self.peak_split = split


def folder_files(folder: Path) -> dict[str, int]:
    """Bytes of each file under ``folder``, by path relative to it (empty if it does not
    exist)."""
    sizes = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            try:
                sizes[os.path.relpath(path, folder)] = os.lstat(path).st_size
            except OSError:  # removed meanwhile (a temporary file renamed into place)
                pass
    return sizes


def folder_bytes(folder: Path) -> int:
    """Bytes in the files under ``folder`` (0 if it does not exist)."""
    return sum(folder_files(folder).values())


def largest_files(folder: Path, count: int) -> list[tuple[str, int]]:
    """The ``count`` largest files under ``folder``: (relative path, bytes), largest first."""
    return sorted(folder_files(folder).items(), key=lambda item: (-item[1], item[0]))[:count]
