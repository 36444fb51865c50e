"""Frozen, validated configuration for the engine. Bad values raise ValueError, never assert."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from heron.lora import LoRARequest
from heron.scoring import HFOverrides

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "dummy")
QUANTIZATIONS = ("auto", "gguf", "none", "int8", "int4")
GRAMMAR_INDEX = ("start", "first-use")
GGUF_MEMORY = ("auto", "mapped", "copy")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str | int) -> int:
    """'4GiB', '512M', '1.5G' or a plain byte count -> bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"cannot read {value!r} as a size; use e.g. 4GiB, 512MiB or a byte count")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.upper()])


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how. ``model=None`` is the embedded default (Gemma 3 270M)."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    load_format: str = "auto"
    chat_template: str | None = None  # a file path or the template text itself
    # How weights are held on CPU. gguf: a GGUF file's quantized blocks as the only copy
    # (heron.layers.gguf_weight); int8/int4: weight-only copies re-quantized from float weights
    # (heron.layers.quant); none: float weights. auto: gguf for GGUF files on CPU, none otherwise.
    quantization: str = "auto"
    # When a serving engine core builds the structured-output tokenizer index (seconds, holding
    # the GIL): "start", before it reports ready; "first-use", on the first constrained request
    # (a faster start, but running streams pause while it is built).
    grammar_index: str = "start"
    # Where a GGUF file's blocks live when they are the weights: "mapped", the file's pages (the
    # OS page cache's, shared by every process that maps the file); "copy", read once into this
    # process's memory on 2 MiB pages (fewer TLB misses: faster decode); "auto", copy where
    # Linux has transparent huge pages, else mapped.
    gguf_memory: str = "auto"
    # vLLM's --hf-overrides JSON, limited to a causal LM served as a reranker
    # (``heron.scoring.HFOverrides``); None: the checkpoint as it is.
    hf_overrides: str | None = None

    def __post_init__(self) -> None:
        HFOverrides.parse(self.hf_overrides)  # ValueError naming the bad key
        if self.gguf_memory not in GGUF_MEMORY:
            raise ValueError(f"gguf_memory must be one of {', '.join(GGUF_MEMORY)}, "
                             f"got {self.gguf_memory!r}")
        if self.grammar_index not in GRAMMAR_INDEX:
            raise ValueError(f"grammar_index must be one of {', '.join(GRAMMAR_INDEX)}, "
                             f"got {self.grammar_index!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, "
                             f"got {self.quantization!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")


def gguf_memory_for(mode: str, data_parallel_size: int) -> str:
    """``mode`` for each engine of a server: ``auto`` maps the file when there are several
    engines (on one machine, each copy would hold the weights again; mapped, they share the
    page cache)."""
    return "mapped" if mode == "auto" and data_parallel_size > 1 else mode


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size and how much memory the pool takes."""

    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes, on CPU; None: a share of the RAM (engine.memory)
    gpu_memory_utilization: float = 0.9  # fraction of free GPU memory, on CUDA
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None  # tests: force a tiny pool

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two in [1, 128], got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 2:
            raise ValueError("num_gpu_blocks_override must be at least 2")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits: at most ``max_num_seqs`` requests and ``max_num_batched_tokens`` tokens."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters beside the base projections (vLLM's flags): ``enable_lora``; at most
    ``max_loras`` distinct adapters among the running requests (and as many kept loaded that
    no request uses); ranks up to ``max_lora_rank``; ``preload``: adapters the engine loads,
    and so checks, before it reports ready (the server's ``--lora-modules``)."""

    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    preload: tuple[LoRARequest, ...] = ()

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be positive, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be positive, got {self.max_lora_rank}")
        if self.preload and not self.enable_lora:
            raise ValueError("LoRA modules were given but LoRA is not enabled (--enable-lora)")
        ids = [r.lora_int_id for r in self.preload]
        names = [r.lora_name for r in self.preload]
        if len(set(ids)) != len(ids) or len(set(names)) != len(names):
            raise ValueError("each LoRA module needs its own name and lora_int_id")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    lora: LoRAConfig = field(default_factory=LoRAConfig)


DP_BACKENDS = ("mp", "ray")
ROUTERS = ("prefix", "round-robin")


@dataclass(frozen=True)
class ParallelConfig:
    """Data parallelism: ``data_parallel_size`` engine cores behind one endpoint, each with its
    own KV cache. ``mp``: processes on this machine, ``cpus_per_engine`` CPUs each (None: an even
    split) pinned with affinity; ``ray``: Ray actors placed on the cluster at ``ray_address``
    (``cpus_per_engine`` None: as many CPUs as the smallest node has), restarted by Ray at most
    ``max_restarts`` times. ``router`` picks an engine per request (heron.server.router)."""

    data_parallel_size: int = 1
    backend: str = "mp"
    cpus_per_engine: int | None = None
    ray_address: str = "auto"
    router: str = "prefix"
    max_restarts: int = 3

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be positive, got {self.data_parallel_size}")
        if self.backend not in DP_BACKENDS:
            raise ValueError(f"data_parallel_backend must be one of {', '.join(DP_BACKENDS)}, "
                             f"got {self.backend!r}")
        if self.cpus_per_engine is not None and self.cpus_per_engine < 1:
            raise ValueError(f"cpus_per_engine must be positive, got {self.cpus_per_engine}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be non-negative, got {self.max_restarts}")
