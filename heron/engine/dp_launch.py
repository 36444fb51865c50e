"""Where the N engine cores of data parallelism run: processes on this machine (``mp``) or Ray
actors on a cluster (``ray``, in ``heron.engine.dp_ray``). A backend hands out one
``CoreLauncher`` per engine and releases what it set up (a Ray placement group) at the end.

``mp`` splits this machine: engine i gets its own CPUs (``--cpus-per-engine``, or an even split
of the CPUs this process may use), pinned with affinity and with as many OpenMP threads; on
CUDA each engine sees one GPU (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Protocol

from heron.engine.cgroups import cpu_quota
from heron.engine.client import CoreLauncher, ProcessLauncher, engine_label

if TYPE_CHECKING:
    from heron.config import EngineConfig, ParallelConfig

logger = logging.getLogger(__name__)

_NVIDIA_GPUS = "/proc/driver/nvidia/gpus"  # one entry per GPU the driver sees


class Backend(Protocol):
    """One launcher per engine, and ``close()`` once every engine is shut down."""

    launchers: list[CoreLauncher]

    def close(self) -> None: ...


def open_backend(config: EngineConfig, parallel: ParallelConfig, log_level: int) -> Backend:
    """The launchers for ``parallel.data_parallel_size`` engines (ValueError on a bad setup:
    too few CPUs or GPUs, Ray missing or unreachable, a cluster too small to place them)."""
    if parallel.backend == "ray":
        from heron.engine.dp_ray import RayBackend

        return RayBackend(config, parallel, log_level)
    return ProcessBackend(config, parallel, log_level)


class ProcessBackend:
    """``--data-parallel-backend mp``: N core processes on this machine, each on its own CPUs."""

    def __init__(self, config: EngineConfig, parallel: ParallelConfig, log_level: int) -> None:
        n = parallel.data_parallel_size
        cpus = cpu_split(n, parallel.cpus_per_engine, sorted(os.sched_getaffinity(0)))
        gpus = gpu_split(config, n)
        self.launchers: list[CoreLauncher] = []
        for i in range(n):
            env = {} if cpus is None else {"OMP_NUM_THREADS": str(_engine_threads(len(cpus[i]), n))}
            if gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpus[i]
            self.launchers.append(
                ProcessLauncher(
                    config,
                    log_level,
                    label=engine_label(i, n),
                    cpus=None if cpus is None else cpus[i],
                    env=env,
                )
            )

    def close(self) -> None:
        pass


def _engine_threads(cpus: int, engines: int) -> int:
    """An engine's threads: its CPUs, and its share of the cgroup's CPU quota where one is set."""
    quota = cpu_quota()
    return cpus if quota is None else max(1, min(cpus, math.floor(quota / engines)))


def cpu_split(n: int, per_engine: int | None, available: list[int]) -> list[list[int]] | None:
    """Disjoint CPU sets, one per engine; None: leave a single engine unpinned.

    ``per_engine`` None splits ``available`` evenly (the remainder stays unused so that every
    engine gets the same share).
    """
    if per_engine is None:
        if n == 1:
            return None
        per_engine = len(available) // n
        if per_engine == 0:
            raise ValueError(
                f"{n} data-parallel engines need at least {n} CPUs; this process may use "
                f"{len(available)} ({_cpu_list(available)})"
            )
    if n * per_engine > len(available):
        raise ValueError(
            f"{n} engines x {per_engine} CPUs need {n * per_engine} CPUs; this process may use "
            f"{len(available)} ({_cpu_list(available)}); lower --cpus-per-engine"
        )
    return [available[i * per_engine : (i + 1) * per_engine] for i in range(n)]


def gpu_split(config: EngineConfig, n: int) -> list[str] | None:
    """One visible GPU per engine on CUDA; None on CPU (or a single engine)."""
    if n == 1 or config.model.device == "cpu":
        return None
    visible = _visible_gpus()
    if not visible:
        if config.model.device == "cuda":
            raise ValueError("--device cuda: no CUDA GPU is visible")
        return None
    if len(visible) < n:
        raise ValueError(
            f"{n} data-parallel engines on CUDA need {n} GPUs; {len(visible)} are visible"
        )
    return visible[:n]


def _visible_gpus() -> list[str]:
    """CUDA devices this process may use, without importing torch (the API process never
    does): ``CUDA_VISIBLE_DEVICES`` if set, else the NVIDIA driver's list of GPUs."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    try:
        return [str(i) for i in range(len(os.listdir(_NVIDIA_GPUS)))]
    except OSError:
        return []


def _cpu_list(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)
