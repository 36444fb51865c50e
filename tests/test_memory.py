"""Memory a user can predict (heron/engine/memory.py): the start-up line, the KV pool's default."""

from __future__ import annotations

import logging
import mmap
from pathlib import Path

import pytest

from heron import LLM
from heron.engine import memory
from tests.test_gguf_native import _hf_model, write_gguf

GiB, MiB = 1 << 30, 1 << 20


def test_kv_budget_is_a_capped_share_of_available_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    per_token, plenty = 1024, 10**9
    assert memory.kv_budget(3 * GiB, per_token, plenty).nbytes == 3 * GiB  # --kv-cache-memory
    monkeypatch.setattr(memory, "memory_headroom", lambda: None)  # no container limit
    monkeypatch.setattr(memory, "_host_available_ram", lambda: 5 * GiB)
    auto = memory.kv_budget(None, per_token, plenty)
    assert auto.nbytes == int(5 * GiB * memory.KV_AUTO_SHARE) and "20% of 5.0 GiB" in auto.reason
    monkeypatch.setattr(memory, "_host_available_ram", lambda: 64 * GiB)
    assert memory.kv_budget(None, per_token, plenty).nbytes == memory.KV_AUTO_CAP
    monkeypatch.setattr(memory, "_host_available_ram", lambda: 10 * MiB)
    assert memory.kv_budget(None, per_token, plenty).nbytes == memory.KV_AUTO_FLOOR
    monkeypatch.setattr(memory, "_host_available_ram", lambda: None)
    assert memory.kv_budget(None, per_token, plenty).nbytes == memory.KV_AUTO_CAP
    small = memory.kv_budget(None, per_token, 1000)  # a tiny model needs less than the share
    assert small.nbytes == 1000 * per_token and "need" in small.reason


def test_kv_budget_fits_a_containers_memory_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64 GiB host, a container limited to 3 GiB of which 1 GiB is left: the pool is a share
    of the 1 GiB (the host's share would be the 2 GiB cap, past the limit: an OOM kill)."""
    per_token, plenty = 1024, 10**9
    monkeypatch.setattr(memory, "_host_available_ram", lambda: 64 * GiB)
    monkeypatch.setattr(memory, "memory_headroom", lambda: 1 * GiB)
    auto = memory.kv_budget(None, per_token, plenty)
    assert auto.nbytes == int(1 * GiB * memory.KV_AUTO_SHARE)
    assert "20% of 1.0 GiB available under the cgroup's memory limit" in auto.reason
    assert memory.available_ram() == 1 * GiB
    monkeypatch.setattr(memory, "memory_headroom", lambda: 100 * GiB)  # a limit past the RAM
    assert memory.available_ram() == 64 * GiB
    assert "cgroup" not in memory.kv_budget(None, per_token, plenty).reason


def test_resident_bytes_of_a_mapped_file(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"\1" * (4 * MiB))
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert memory.mapped_resident_bytes(path) <= 4 * MiB
        assert sum(m[i] for i in range(0, 4 * MiB, 4096)) == 1024  # touch every page
        assert memory.mapped_resident_bytes(path) >= 3 * MiB
    assert memory.resident_bytes() > 10 * MiB


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mem") / "tiny-llama.gguf"
    write_gguf(path, "llama", _hf_model("llama"))
    return path


def _start(path: Path, caplog: pytest.LogCaptureFixture, **kwargs: object) -> tuple[LLM, str]:
    with caplog.at_level(logging.INFO, logger="heron.engine.core"):
        llm = LLM(str(path), dtype="bfloat16", skip_tokenizer_init=True, **kwargs)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("memory:"))
    caplog.clear()
    return llm, line


def test_start_up_line_names_weights_kv_cache_and_overhead(tiny_file: Path, caplog,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERON_CACHE_DIR", str(tiny_file.parent / "cache"))
    llm, line = _start(tiny_file, caplog, kv_cache_memory="3MiB", gguf_memory="mapped")
    weights = memory.weight_bytes(llm.engine.model)
    assert weights.mapped > 0.9 * tiny_file.stat().st_size  # the file's blocks, not copies
    assert weights.in_ram < 0.1 * tiny_file.stat().st_size
    assert "mapped from the model file" in line and "KV cache 3 MiB" in line
    assert "(--kv-cache-memory)" in line and "overhead" in line and "unknown" not in line
    blocks = llm.engine.info.num_kv_blocks
    per_block = 2 * 2 * 64 * 2 * 2 * 16  # K and V x layers x (kv heads x head dim) x bf16 x block
    assert blocks == (3 * MiB) // per_block
    llm, line = _start(tiny_file, caplog, max_num_seqs=4)  # default: what 4 sequences need
    assert "auto: all that max_num_seqs full-length sequences need" in line
    assert llm.engine.info.num_kv_blocks * 16 >= 4 * 256


def test_gguf_memory_copy_holds_the_same_blocks_in_ram(tiny_file: Path, caplog,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``--gguf-memory copy``: the file's blocks read into memory, counted as such, and the
    model computes the same numbers as from the mapped file."""
    from heron import SamplingParams

    monkeypatch.setenv("HERON_CACHE_DIR", str(tiny_file.parent / "cache"))
    mapped, _ = _start(tiny_file, caplog, kv_cache_memory="3MiB", gguf_memory="mapped")
    copied, line = _start(tiny_file, caplog, kv_cache_memory="3MiB", gguf_memory="copy")
    weights = memory.weight_bytes(copied.engine.model)
    assert weights.mapped == 0 and weights.in_ram > 0.9 * tiny_file.stat().st_size
    assert "(0 MiB mapped from the model file" in line
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=3, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 17, 99, 3, 250]}, {"prompt_token_ids": [7] * 20}]
    a, b = (llm.generate(prompts, params, use_tqdm=False) for llm in (mapped, copied))
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert [{t: p.logprob for t, p in d.items()} for d in x.outputs[0].logprobs] == \
            [{t: p.logprob for t, p in d.items()} for d in y.outputs[0].logprobs]


def test_gguf_memory_auto_maps_the_file_for_several_engines() -> None:
    from heron.config import ModelConfig, gguf_memory_for

    assert gguf_memory_for("auto", 1) == "auto" and gguf_memory_for("auto", 2) == "mapped"
    assert gguf_memory_for("copy", 4) == "copy"
    with pytest.raises(ValueError, match="gguf_memory must be one of auto, mapped, copy"):
        ModelConfig(gguf_memory="huge")


def test_auto_dtype_never_pairs_float32_with_a_slow_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU without fast bf16 GEMMs auto is float32 for float weights, but bfloat16 where the
    projections run PyTorch's int4 kernel (scalar for float32 activations on x86) or are GGUF
    blocks in heron's kernels (the fused decode step and small kernels are bf16-only)."""
    import torch

    from heron.engine import core
    from heron.kernels.cpu import isa

    cpu = torch.device("cpu")

    def auto(quantization: str) -> torch.dtype:
        return core.resolve_dtype("auto", cpu, core._runs_torch_int4(quantization, cpu),
                                  core._runs_heron_gguf(quantization, cpu))

    monkeypatch.setattr(core, "_cpu_has_fast_bf16", lambda: False)
    assert auto("none") == torch.float32
    assert auto("gguf") == torch.bfloat16  # heron's kernels
    assert auto("int4") == torch.bfloat16
    monkeypatch.setenv(isa.ISA_ENV_VAR, "none")  # no kernels: GGUF falls back to int8 in int4 form
    assert auto("gguf") == torch.bfloat16
    assert auto("none") == torch.float32
    assert core.resolve_dtype("float32", cpu, True, True) == torch.float32  # asked for: kept
