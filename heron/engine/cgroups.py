"""What a container lets this process use: its cgroup's memory limit and CPU quota (Linux).

``/proc/meminfo`` and the CPU count describe the host. In a container (Docker ``--memory`` /
``--cpus``, a Kubernetes pod's limits, a systemd slice) the kernel enforces the cgroup's limits
instead: a KV pool sized from the host's RAM gets the engine OOM-killed once its pages are
used, and as many OpenMP threads as the host has cores, under a quota of two, spend most of a
step throttled at a barrier. Both cgroup versions are read:

    v2 (unified): <dir>/memory.max, memory.current, memory.stat (inactive_file); <dir>/cpu.max
    v1:           <dir>/memory.limit_in_bytes, memory.usage_in_bytes, memory.stat
                  (total_inactive_file); <dir>/cpu.cfs_quota_us, cpu.cfs_period_us

``<dir>`` is the process's cgroup (``/proc/self/cgroup``) under the controller's mount
(``/proc/self/mountinfo``), and each of its ancestors up to the mount's root: the tightest
limit on the way up is the one that holds. Where nothing is found (no cgroup, no limit, not
Linux) the functions return None and callers keep the host's figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T", int, float)
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded LONG_MAX


@dataclass(frozen=True)
class _Mount:
    root: str  # the cgroup path the mount shows at its mount point
    point: Path
    version: int


def cgroup_dirs(controller: str, root: Path = Path("/")) -> list[Path]:
    """The process's cgroup directory for ``controller`` and its ancestors, innermost first
    (empty where the controller is not mounted). ``root``: where ``/`` is (tests)."""
    mounts = _mounts(controller, root)
    paths = _cgroup_paths(controller, root)
    for mount in mounts:
        path = paths.get(mount.version)
        if path is None:
            continue
        relative = Path(path).relative_to(mount.root) if _under(path, mount.root) else Path()
        inner = mount.point / relative
        if not inner.is_dir():  # a container that sees its own cgroup at the mount point
            inner = mount.point
        return [inner, *[p for p in inner.parents if _under(str(p), str(mount.point))]]
    return []


def memory_headroom(root: Path = Path("/")) -> int | None:
    """Bytes the cgroup still lets this process take (limit minus what it uses, page cache
    that can be dropped not counted); None without a limit."""
    return _tightest(cgroup_dirs("memory", root), _memory_room)


def cpu_quota(root: Path = Path("/")) -> float | None:
    """CPUs' worth of time per period the cgroup allows (2.0: two CPUs); None without a quota."""
    return _tightest(cgroup_dirs("cpu", root), _cpu_limit)


def _tightest(directories: list[Path], limit_of: Callable[[Path], T | None]) -> T | None:
    """The smallest limit any of ``directories`` sets (None: none sets one)."""
    limits = [limit for limit in map(limit_of, directories) if limit is not None]
    return min(limits, default=None)


def quota_threads(threads: int, root: Path = Path("/")) -> int:
    """``threads`` capped at the CPU quota, rounded down (a thread past the quota waits at
    every barrier), at least one."""
    quota = cpu_quota(root)
    if quota is None:
        return threads
    return max(1, min(threads, math.floor(quota)))


def _memory_room(directory: Path) -> int | None:
    if (directory / "memory.max").exists():  # v2
        limit = _read_int(directory / "memory.max")
        used = _read_int(directory / "memory.current")
        inactive = _stat(directory / "memory.stat", "inactive_file")
    else:
        limit = _read_int(directory / "memory.limit_in_bytes")
        used = _read_int(directory / "memory.usage_in_bytes")
        inactive = _stat(directory / "memory.stat", "total_inactive_file")
    if limit is None or limit >= _NO_LIMIT or used is None:
        return None
    return max(0, limit - max(0, used - (inactive or 0)))


def _cpu_limit(directory: Path) -> float | None:
    if (directory / "cpu.max").exists():  # v2: "max 100000" or "150000 100000"
        fields = _read(directory / "cpu.max").split()
        if len(fields) != 2 or fields[0] == "max":
            return None
        quota, period = _int(fields[0]), _int(fields[1])
    else:
        quota = _read_int(directory / "cpu.cfs_quota_us")  # -1: no quota
        period = _read_int(directory / "cpu.cfs_period_us")
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return quota / period


def _mounts(controller: str, root: Path) -> list[_Mount]:
    """The v1 mount holding ``controller`` first (hybrid systems mount v2 without it), then v2."""
    v1, v2 = [], []
    for line in _read(root / "proc/self/mountinfo").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        point = root / fields[4].lstrip("/")
        if tail[0] == "cgroup" and controller in tail[2].split(","):
            v1.append(_Mount(fields[3], point, 1))
        elif tail[0] == "cgroup2":
            v2.append(_Mount(fields[3], point, 2))
    return v1 + v2


def _cgroup_paths(controller: str, root: Path) -> dict[int, str]:
    """The process's cgroup path per version, from ``/proc/self/cgroup``."""
    paths: dict[int, str] = {}
    for line in _read(root / "proc/self/cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            paths[2] = parts[2]
        elif controller in parts[1].split(","):
            paths[1] = parts[2]
    return paths


def _under(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor.rstrip("/") + "/")


def _stat(path: Path, key: str) -> int | None:
    for line in _read(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return _int(value)
    return None


def _read_int(path: Path) -> int | None:
    return _int(_read(path))


def _int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
