"""Memory a user can predict: what the weights, the KV cache and the rest of the engine take.

At start the engine logs one line::

    memory: weights 253 MiB (250 MiB mapped from the model file, 3 MiB in RAM), KV cache
    1.0 GiB = 58,254 tokens (auto: 20% of 5.1 GiB available, at most 2 GiB), overhead 412 MiB

- weights: every tensor the model holds; a GGUF file's blocks are either mapped (their pages
  are the OS page cache's, shared, and read in as they are used) or read once into memory on
  huge pages (``--gguf-memory``), never converted;
- KV cache: the pool ``--kv-cache-memory`` sets; by default a share of the RAM still available
  once the weights are loaded (in a container, of what its memory limit leaves), capped, and never more than ``max_num_seqs`` full-length
  sequences need. Its pages are taken on first use (see ``runner._zeros``);
- overhead: the process's resident memory besides those (Python, PyTorch, buffers).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from heron.engine.cgroups import memory_headroom

KV_AUTO_SHARE = 0.2  # of the RAM available after loading the weights
KV_AUTO_CAP = 2 << 30
KV_AUTO_FLOOR = 64 << 20
_MiB = 2**20
_MAPPING_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")  # a mapping's first line in smaps


@dataclass(frozen=True)
class WeightBytes:
    """The bytes of a model's tensors: ``mapped`` read in place from the model file, the rest
    ``in_ram``."""

    in_ram: int
    mapped: int

    @property
    def total(self) -> int:
        return self.in_ram + self.mapped


def weight_bytes(model: nn.Module) -> WeightBytes:
    """Every parameter and buffer (meta ones hold nothing) and every quantized weight, once."""
    from heron.layers.gguf_weight import GGUFWeight

    in_ram = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
                 if t.device.type != "meta")
    mapped = 0
    seen: set[int] = set()
    for module in model.modules():
        quantized = getattr(module, "quantized", None)
        if quantized is None or id(quantized) in seen:
            continue
        seen.add(id(quantized))
        if isinstance(quantized, GGUFWeight) and quantized.mapped:
            mapped += quantized.nbytes
        else:
            in_ram += quantized.nbytes
    return WeightBytes(in_ram=in_ram, mapped=mapped)


def available_ram() -> int | None:
    """Bytes this process can still take without swapping or being OOM-killed: the host's
    (Linux MemAvailable; elsewhere free pages), and no more than its cgroup's limit leaves (a
    container's ``--memory``; ``cgroups.memory_headroom``)."""
    return _available()[0]


def _available() -> tuple[int | None, str]:
    """``available_ram`` and what bounds it, for the log."""
    host, headroom = _host_available_ram(), memory_headroom()
    if headroom is not None and (host is None or headroom < host):
        return headroom, " under the cgroup's memory limit"
    return host, ""


def _host_available_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux), else its peak (other Unixes)."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None


def mapped_resident_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (Linux; 0 where unknown)."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    total, inside, target = 0, False, str(path.resolve())
    for line in text.splitlines():
        if _MAPPING_HEADER.match(line):
            inside = line.rstrip().endswith(target)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@dataclass(frozen=True)
class KVBudget:
    """The KV pool's size and why."""

    nbytes: int
    reason: str


def kv_budget(configured: int | None, per_token: int, max_tokens_needed: int) -> KVBudget:
    """``configured`` (``--kv-cache-memory``) when given; else a share of the available RAM,
    between the floor and the cap, and no more than ``max_tokens_needed`` tokens take."""
    if configured is not None:
        return KVBudget(configured, "--kv-cache-memory")
    available, bound = _available()
    share = KV_AUTO_CAP if available is None else int(available * KV_AUTO_SHARE)
    budget = max(KV_AUTO_FLOOR, min(KV_AUTO_CAP, share))
    reason = (f"auto: {KV_AUTO_SHARE:.0%} of {_human(available)} available{bound}"
              if available is not None
              else "auto: available RAM unknown") + f", at most {_human(KV_AUTO_CAP)}"
    needed = max_tokens_needed * per_token
    if needed < budget:
        return KVBudget(needed, "auto: all that max_num_seqs full-length sequences need")
    return KVBudget(budget, reason)


def memory_report(weights: WeightBytes, kv_bytes: int, kv_tokens: int, kv_reason: str,
                  model_file: Path | None) -> str:
    """The start-up line of the module docstring."""
    resident = resident_bytes()
    mapped_resident = mapped_resident_bytes(model_file) if model_file is not None else 0
    overhead = None if resident is None else max(0, resident - weights.in_ram - mapped_resident)
    return (f"memory: weights {_human(weights.total)} ({_human(weights.mapped)} mapped from the "
            f"model file, {_human(weights.in_ram)} in RAM), KV cache {_human(kv_bytes)} = "
            f"{kv_tokens:,} tokens ({kv_reason}), overhead "
            f"{'unknown' if overhead is None else _human(overhead)}")


def _human(nbytes: int | None) -> str:
    if nbytes is None:
        return "unknown"
    if nbytes >= 1 << 30:
        return f"{nbytes / 2**30:.1f} GiB"
    return f"{nbytes / _MiB:.0f} MiB"

