"""heron's compiled CPU kernels against plain float32 math: decode attention read in place from
the paged cache (sliding windows, GQA groups, scattered blocks) and the loader's fallbacks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

from heron.kernels import cpu as cpu_kernels
from heron.kernels.cpu import build, isa
from heron.layers.attention import Attention, AttentionMetadata, PrefillSpan, TorchAttentionBackend


def _variant(name: str) -> object:
    """A variant as a fixture parameter, marked with the CPU features it needs: it may skip only
    where the CPU lacks one (tests/conftest.py)."""
    return pytest.param(name, marks=pytest.mark.cpu_features(
        *sorted(isa.SPECS[name].needs(isa.cpu_features()))))


@pytest.fixture(params=[_variant(name) for name in isa.VARIANTS])
def variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test below runs once per kernel variant (selected through HERON_CPU_ISA, as a user
    would); a CPU with AVX-512 runs them all."""
    if request.param not in isa.runnable_variants(isa.cpu_features()):
        pytest.skip(f"this CPU cannot run the {request.param} variant")
    monkeypatch.setenv(isa.ISA_ENV_VAR, request.param)
    return request.param


needs_kernel = pytest.mark.usefixtures("variant")


def _paged_case(seq_lens: list[int], heads: int, kv_heads: int, dim: int, block_size: int, seed: int):
    """A bf16 cache with each sequence's blocks scattered; returns q, cache, tables, lens, K/V per seq."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in seq_lens)
    num_blocks = len(seq_lens) * max_blocks + 3
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=g).to(torch.bfloat16)
    order = torch.randperm(num_blocks, generator=g)
    tables = order[:len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks).clone()
    q = torch.randn(len(seq_lens), heads, dim, generator=g).to(torch.bfloat16)
    return q, cache, tables, torch.tensor(seq_lens)


def _reference(q, cache, tables, seq_lens, scale, window):
    """float32 softmax attention over each sequence's visible positions, gathered by hand."""
    heads, kv_heads, block_size = q.shape[1], cache.shape[3], cache.shape[2]
    out = []
    for b, n in enumerate(seq_lens.tolist()):
        first = max(0, n - window) if window else 0
        pos = torch.arange(first, n)
        slots = tables[b, pos // block_size] * block_size + pos % block_size
        k = cache[0].flatten(0, 1)[slots].float().repeat_interleave(heads // kv_heads, dim=1)
        v = cache[1].flatten(0, 1)[slots].float().repeat_interleave(heads // kv_heads, dim=1)
        p = torch.einsum("hd,shd->hs", q[b].float(), k).mul(scale).softmax(-1)  # [H, S]
        out.append(torch.einsum("hs,shd->hd", p, v))
    return torch.stack(out)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,dim,block_size,window", [
    (4, 1, 256, 16, None),  # Gemma 3 270M's global layers
    (4, 1, 256, 16, 40),  # ... its local layers (window shorter than the longest context)
    (8, 2, 64, 4, None),  # GQA groups of 4 over two K/V heads, small blocks
    (6, 6, 32, 8, 7),  # no GQA, a window shorter than a block
    (14, 2, 64, 16, None),  # Qwen2.5-0.5B's groups of 7: heads in passes of 4, then 3
    (12, 6, 32, 8, 9),  # groups of 2
])
def test_paged_decode_attention_matches_float32_reference(heads, kv_heads, dim, block_size, window) -> None:
    q, cache, tables, lens = _paged_case([1, 5, 16, 17, 63, 100], heads, kv_heads, dim, block_size, seed=heads)
    attend = cpu_kernels.paged_decode_attention()
    out = attend(q, cache, tables, lens, dim ** -0.5, window)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _reference(q, cache, tables, lens, dim ** -0.5, window),
                               atol=2e-2, rtol=2e-2)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,dim,seq_lens,window", [
    (4, 1, 256, [300], None),  # one request of Gemma 3 270M: its keys split between threads
    (4, 1, 256, [700], 512),  # ... a local layer past its window
    (7, 1, 64, [129, 40], None),  # a group of 7 (heads in passes of 4, then 3), two requests
    (14, 2, 64, [200], None),  # two K/V heads
])
def test_fewer_tasks_than_threads_split_them_with_the_same_bits(heads, kv_heads, dim, seq_lens,
                                                                window) -> None:
    """With fewer (sequence, K/V head) tasks than threads, a task's keys, heads and value
    dimensions are shared out (attend_split): one thread, two or four, the same bits."""
    q, cache, tables, lens = _paged_case(seq_lens, heads, kv_heads, dim, 16, seed=len(seq_lens))
    attend = cpu_kernels.paged_decode_attention()
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(attend(q, cache, tables, lens, dim ** -0.5, window))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    torch.testing.assert_close(results[0].float(), _reference(q, cache, tables, lens, dim ** -0.5, window),
                               atol=2e-2, rtol=2e-2)


@needs_kernel
def test_backend_uses_the_kernel_and_agrees_with_its_torch_path(monkeypatch) -> None:
    heads, kv_heads, dim, block_size, window = 4, 1, 256, 16, 40
    q, cache, tables, lens = _paged_case([3, 33, 70], heads, kv_heads, dim, block_size, seed=7)
    layer = Attention(heads, dim, kv_heads, layer_idx=0, scale=dim ** -0.5, sliding_window=window)
    meta = AttentionMetadata(slot_mapping=torch.zeros(3, dtype=torch.int64),
                             decode_token_idx=torch.arange(3), decode_seq_lens=lens,
                             decode_block_tables=tables, prefills=[], block_size=block_size)
    backend = TorchAttentionBackend()
    calls = []
    real = cpu_kernels.paged_decode_attention()
    monkeypatch.setattr("heron.layers.attention.paged_decode_attention",
                        lambda: lambda *a: calls.append(1) or real(*a))
    with_kernel = backend._decode(layer, q, cache, meta)
    assert calls == [1]
    monkeypatch.setattr("heron.layers.attention.paged_decode_attention", lambda: None)
    torch_path = backend._decode(layer, q, cache, AttentionMetadata(
        slot_mapping=meta.slot_mapping, decode_token_idx=meta.decode_token_idx, decode_seq_lens=lens,
        decode_block_tables=tables, prefills=[], block_size=block_size))
    torch.testing.assert_close(with_kernel.float(), torch_path.float(), atol=2e-2, rtol=2e-2)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,dim,window", [
    (4, 1, 256, 40),  # Gemma 3 270M's local layers: a window shorter than the chunks
    (4, 1, 256, None),  # ... its global layers
    (14, 2, 64, None),  # Qwen2.5-0.5B's groups of 7
])
def test_prefill_rows_use_the_kernel_and_agree_with_the_torch_path(monkeypatch, heads, kv_heads,
                                                                   dim, window) -> None:
    """Each row of a prompt chunk is a query over its own context through the decode kernel: a
    fresh 37-token prompt and a 20-token chunk after a 50-token cached prefix, in one step with a
    decode row, against scaled_dot_product_attention with its masks."""
    block_size, g = 16, torch.Generator().manual_seed(heads + dim)
    cache = torch.randn(2, 12, block_size, kv_heads, dim, generator=g).to(torch.bfloat16)
    order = torch.randperm(12, generator=g)
    tables = [order[0:3], order[3:8], order[8:10]]  # 37 tokens, 70 tokens, a 20-token decode
    spans, slots, start = [], [], 1  # token 0 of the step is the decode row
    for (cached, chunk), table in zip([(0, 37), (50, 20)], tables):
        spans.append(PrefillSpan(start=start, end=start + chunk, seq_len=cached + chunk,
                                 block_table=table))
        pos = torch.arange(cached, cached + chunk)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        start += chunk
    decode_slot = tables[2][19 // block_size] * block_size + 19 % block_size
    tokens = start
    q = torch.randn(tokens, heads, dim, generator=g).to(torch.bfloat16)
    k = torch.randn(tokens, kv_heads, dim, generator=g).to(torch.bfloat16)
    v = torch.randn(tokens, kv_heads, dim, generator=g).to(torch.bfloat16)
    layer = Attention(heads, dim, kv_heads, layer_idx=0, scale=dim ** -0.5, sliding_window=window)

    def run() -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=torch.cat([decode_slot[None], *slots]),
                                 decode_token_idx=torch.tensor([0]),
                                 decode_seq_lens=torch.tensor([20]),
                                 decode_block_tables=tables[2][None, :], prefills=spans,
                                 block_size=block_size)
        return TorchAttentionBackend().forward(layer, q, k, v, cache.clone(), meta)

    calls = []
    real = cpu_kernels.paged_decode_attention()
    monkeypatch.setattr("heron.layers.attention.paged_decode_attention",
                        lambda: lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with_kernel = run()
    assert calls == [1, 37, 20]  # the decode row, then each chunk's rows
    monkeypatch.setattr("heron.layers.attention.paged_decode_attention", lambda: None)
    torch.testing.assert_close(with_kernel.float(), run().float(), atol=2e-2, rtol=2e-2)


def test_every_variant_runs_here() -> None:
    """The test machine runs all variants (avx2vnni where it has VNNI as well, as every machine
    CI has met: see tests/test_gguf_kernels.py): no kernel test below skips."""
    features = isa.cpu_features()
    assert isa.runnable_variants(features) == tuple(
        name for name in isa.VARIANTS
        if name != "avx2vnni" or isa.SPECS[name].needs(features) <= features)
    assert {"avx512", "avx2", "portable"} <= set(isa.runnable_variants(features))


def test_probe_agrees_with_proc_cpuinfo() -> None:
    """CPUID as the probe decodes it names the same features Linux lists."""
    probed = isa._run_probe()
    assert probed is not None and "x86" in probed
    assert probed - {"x86"} <= isa._proc_cpuinfo_flags()
    assert {"avx2", "fma", "f16c"} <= probed


@pytest.fixture()
def fresh_selection(monkeypatch: pytest.MonkeyPatch):
    isa._select.cache_clear()
    yield monkeypatch
    isa._select.cache_clear()


def test_a_variant_the_cpu_lacks_is_refused(fresh_selection, caplog) -> None:
    fresh_selection.setattr(isa, "cpu_features", lambda: frozenset({"avx2", "fma", "f16c"}))
    fresh_selection.setenv(isa.ISA_ENV_VAR, "avx512")
    with caplog.at_level("WARNING", logger="heron.kernels.cpu.isa"):
        assert isa.selected_variant() == "avx2"
    assert "avx512 refused" in caplog.text and "avx512bw" in caplog.text
    fresh_selection.delenv(isa.ISA_ENV_VAR)
    assert isa.selected_variant() == "avx2"  # the best it runs
    fresh_selection.setattr(isa, "cpu_features", lambda: frozenset({"sse2"}))
    isa._select.cache_clear()
    assert isa.selected_variant() == "portable"


def test_avx2vnni_takes_avx_vnni_where_the_cpu_has_it(fresh_selection, caplog) -> None:
    """An AVX2 CPU with AVX-VNNI (Alder Lake and later Intel client CPUs) runs the avx2vnni
    variant built with -mavxvnni; an AVX-512 CPU with VNNI can run it too (the same instructions,
    EVEX-encoded); a plain AVX2 CPU cannot and is told what it lacks."""
    spec, avx2 = isa.SPECS["avx2vnni"], frozenset({"avx2", "fma", "f16c"})
    alder_lake = avx2 | {"avx_vnni"}
    assert isa.runnable_variants(alder_lake) == ("avx2vnni", "avx2", "portable")
    assert spec.compile_flags(alder_lake) == ("-mavx2", "-mfma", "-mf16c", "-mavxvnni")
    both = alder_lake | {"avx512_vnni", "avx512vl"}
    assert spec.compile_flags(both) == ("-mavx2", "-mfma", "-mf16c", "-mavxvnni")
    stand_in = spec.compile_flags(avx2 | {"avx512_vnni", "avx512vl"})
    assert "-mavx512vnni" in stand_in and "-ffixed-xmm31" in stand_in
    assert isa.runnable_variants(avx2) == ("avx2", "portable")
    fresh_selection.setattr(isa, "cpu_features", lambda: alder_lake)
    with caplog.at_level("INFO", logger="heron.kernels.cpu.isa"):
        assert isa.selected_variant() == "avx2vnni"
    assert "avx2vnni variant (+avx_vnni)" in caplog.text
    isa._select.cache_clear()
    fresh_selection.setattr(isa, "cpu_features", lambda: avx2)
    fresh_selection.setenv(isa.ISA_ENV_VAR, "avx2vnni")
    with caplog.at_level("WARNING", logger="heron.kernels.cpu.isa"):
        assert isa.selected_variant() == "avx2"
    assert "avx2vnni refused: the CPU lacks avx_vnni" in caplog.text


def test_clang_gets_no_gcc_register_flags(monkeypatch) -> None:
    monkeypatch.setattr(isa, "cpu_features", lambda: frozenset({"avx2", "fma", "f16c", "avx512_vnni",
                                                                "avx512vl"}))
    monkeypatch.setattr(isa, "compiler", lambda: "clang")
    monkeypatch.setattr(isa, "compiler_version", lambda cc: "Debian clang version 16.0.6\n")
    flags = isa.variant_flags("avx2vnni")
    assert "-mavx512vnni" in flags and not any(f.startswith("-ffixed") for f in flags)
    monkeypatch.setattr(isa, "compiler_version", lambda cc: "gcc (Debian 12.2.0-14) 12.2.0\n")
    assert "-ffixed-xmm16" in isa.variant_flags("avx2vnni")


def test_the_avx_vnni_build_compiles_to_vex_vpdpbusd(monkeypatch, tmp_path) -> None:
    """This machine has no AVX-VNNI, so the avx2vnni variant runs here EVEX-encoded; the build an
    AVX-VNNI CPU gets (-mavxvnni) is compiled here too, and its dot products are VEX-encoded."""
    objdump = shutil.which("objdump")
    assert objdump is not None, "objdump (binutils, beside the C compiler) is needed"
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path))
    features = frozenset({"avx2", "fma", "f16c", "avx_vnni"})
    monkeypatch.setattr(isa, "cpu_features", lambda: features)
    monkeypatch.setattr(build, "cpu_features", lambda: features)
    build._load.cache_clear()
    try:
        for name in ("gguf_matmul", "fused_decode"):
            sources = ("gguf_matmul",) if name == "gguf_matmul" else (
                "fused_decode", "q8_gemm", "gguf_matmul", "elementwise", "paged_attention")
            assert build.load_library(name, sources, "avx2vnni") is not None
            (library,) = (tmp_path / "kernels").glob(f"{name}-avx2vnni-*.so")
            code = subprocess.run([objdump, "-d", str(library)], capture_output=True, text=True,
                                  check=True).stdout
            dots = [line for line in code.splitlines() if "vpdpbusd" in line]
            assert dots and all("{vex}" in line and "ymm" in line for line in dots), dots[:3]
            assert "zmm" not in code
    finally:
        build._load.cache_clear()
    # the stand-in this machine runs: EVEX-encoded, but on the 16 registers the VEX build has
    monkeypatch.undo()
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path / "here"))
    build._load.cache_clear()
    try:
        if "avx2vnni" in isa.runnable_variants(isa.cpu_features()):
            assert build.load_library("gguf_matmul", ("gguf_matmul",), "avx2vnni") is not None
            (library,) = (tmp_path / "here" / "kernels").glob("gguf_matmul-avx2vnni-*.so")
            code = subprocess.run([objdump, "-d", str(library)], capture_output=True, text=True,
                                  check=True).stdout
            assert "vpdpbusd" in code and not re.search(r"[xyz]mm(1[6-9]|2\d|3[01])\b", code)
    finally:
        build._load.cache_clear()


def test_off_switches_and_no_compiler_give_no_kernel(fresh_selection, caplog) -> None:
    fresh_selection.setenv(isa.ISA_ENV_VAR, "none")
    assert isa.selected_variant() == "none" and cpu_kernels.elementwise() is None
    fresh_selection.delenv(isa.ISA_ENV_VAR)
    fresh_selection.setenv(isa.DISABLE_ENV_VAR, "0")
    assert cpu_kernels.q8_gemm() is None
    fresh_selection.delenv(isa.DISABLE_ENV_VAR)
    fresh_selection.setattr(isa, "compiler", lambda: None)
    with caplog.at_level("WARNING", logger="heron.kernels.cpu.isa"):
        assert isa.selected_variant() == "none" and cpu_kernels.paged_decode_attention() is None
        assert isa.selected_variant() == "none"
    assert caplog.text.count("no C compiler found") == 1  # said once
    fresh_selection.setenv(isa.ISA_ENV_VAR, "sse9")
    with pytest.raises(ValueError, match="avx512, avx2vnni, avx2, portable, none"):
        isa.selected_variant()


def test_the_compiler_is_looked_up_once_per_cc_and_path(monkeypatch, tmp_path) -> None:
    """compiler() is asked on every kernel lookup: the PATH is searched once per ($CC, $PATH),
    and a changed PATH or $CC is searched again."""
    found, empty = tmp_path / "bin", tmp_path / "empty"
    found.mkdir(), empty.mkdir()
    (found / "cc").write_text("#!/bin/sh\n")
    (found / "cc").chmod(0o755)
    searches = []
    real_which = isa.shutil.which
    monkeypatch.setattr(isa.shutil, "which", lambda *a, **kw: searches.append(a) or real_which(*a, **kw))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(found))
    assert isa.compiler() == isa.compiler() == str(found / "cc") and len(searches) == 1
    monkeypatch.setenv("PATH", str(empty))
    assert isa.compiler() is None and len(searches) == 4  # cc, gcc, clang: none there
    monkeypatch.setenv("CC", "my-cc")
    assert isa.compiler() == "my-cc"


def test_variants_build_with_explicit_flags_and_are_cached(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path))
    build._load.cache_clear()
    try:
        commands = []
        real = build.subprocess.run
        monkeypatch.setattr(build.subprocess, "run", lambda cmd, **kw: commands.append(cmd) or real(cmd, **kw))
        for variant in isa.VARIANTS:
            assert build.load_library("paged_attention", ("paged_attention",), variant) is not None
        assert len(commands) == 4 and not any("-march=native" in c for c in commands)
        assert "-mavx512f" in commands[0] and "-mavx2" in commands[2]
        assert "-mavx2" in commands[1] and not any(f.startswith("-m") and "vnni" in f for f in commands[2])
        assert not any(flag.startswith("-m") for flag in commands[-1])  # portable: no target flags
        built = sorted((tmp_path / "kernels").glob("paged_attention-*.so"))
        assert [p.name.split("-")[1] for p in built] == ["avx2", "avx2vnni", "avx512", "portable"]
        mtimes = [p.stat().st_mtime_ns for p in built]
        build._load.cache_clear()
        assert build.load_library("paged_attention", ("paged_attention",), "avx2") is not None
        assert len(commands) == 4 and [p.stat().st_mtime_ns for p in built] == mtimes  # not rebuilt
    finally:
        build._load.cache_clear()


def test_kernel_cache_is_private_and_a_changed_library_is_rebuilt(
    monkeypatch, tmp_path, caplog
) -> None:
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path))
    build._load.cache_clear()
    try:
        assert build.load_library("paged_attention", ("paged_attention",), "portable") is not None
        kernels = tmp_path / "kernels"
        assert kernels.stat().st_mode & 0o777 == 0o700
        [lib] = kernels.glob("paged_attention-portable-*.so")
        built = lib.read_bytes()
        assert isa.matches_record(lib)
        changed = lib.with_name("changed.tmp")  # a new file: the loaded one stays mapped intact
        changed.write_bytes(built[:-64] + b"\0" * 64)
        os.replace(changed, lib)
        assert not isa.matches_record(lib)
        build._load.cache_clear()
        with caplog.at_level("WARNING", logger="heron.kernels.cpu.build"):
            assert build.load_library("paged_attention", ("paged_attention",), "portable")
        assert "does not match the sha256 recorded" in caplog.text
        assert isa.matches_record(lib) and lib.read_bytes()[-64:] != b"\0" * 64  # rebuilt
        lib.with_name(lib.name + ".sha256").unlink()  # no record: not trusted either
        build._load.cache_clear()
        mtime = lib.stat().st_mtime_ns
        assert build.load_library("paged_attention", ("paged_attention",), "portable")
        assert isa.matches_record(lib) and lib.stat().st_mtime_ns != mtime
    finally:
        build._load.cache_clear()


def _bf16(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


def _assert_agree(out: torch.Tensor, expected: torch.Tensor, equal_fraction: float = 0.98) -> None:
    """Nearly every element bit-equal; the rest one bf16 rounding apart (fp32 sums in another
    order can move a norm, and everything after it, by one ulp)."""
    assert out.dtype == expected.dtype == torch.bfloat16 and out.shape == expected.shape
    assert (out == expected).float().mean() >= equal_fraction
    torch.testing.assert_close(out.float(), expected.float(), atol=1e-2, rtol=2 ** -6)


@needs_kernel
@pytest.mark.parametrize("rows,dim", [(1, 640), (9, 100), (33, 64)])
def test_add_rms_norm_matches_the_torch_ops_it_replaces(rows, dim) -> None:
    from heron.layers.norm import RMSNorm

    post, pre = RMSNorm(dim, 1e-6, unit_offset=True), RMSNorm(dim, 1e-6, unit_offset=True)
    with torch.no_grad():
        post.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(1)))
        pre.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(2)))
    x, h = _bf16(rows, dim, seed=3, scale=20.0), _bf16(rows, 2 * dim, seed=4)[:, :dim]  # h strided
    kernel = cpu_kernels.elementwise()
    x_out, y_out = kernel.add_rms_norm(x, h, post.scale(), pre.scale(), 1e-6)
    x_ref = x + post(h)
    _assert_agree(x_out, x_ref)
    _assert_agree(y_out, pre(x_ref))
    x_same, y_only = kernel.add_rms_norm(x, None, None, pre.scale(), 1e-6)
    assert x_same is x
    _assert_agree(y_only, pre(x))


@needs_kernel
@pytest.mark.parametrize("tokens,heads,dim", [(1, 5, 256), (7, 3, 48)])
def test_qk_norm_rope_matches_norm_then_rotation(tokens, heads, dim) -> None:
    from heron.layers.norm import rms_norm_heads
    from heron.layers.rotary import RotaryEmbedding, norm_and_rotate

    rope = RotaryEmbedding(dim, {"rope_type": "default", "rope_theta": 10000.0})
    cos_sin = rope.cos_sin(torch.tensor([3, 70, 900, 5, 6, 7, 8][:tokens]), torch.bfloat16)
    qk = _bf16(tokens, heads + 2, dim, seed=5, scale=3.0)[:, 1:heads + 1]  # token stride > heads * D
    scale = 1 + torch.randn(heads, dim, generator=torch.Generator().manual_seed(6))
    out = cpu_kernels.elementwise().qk_norm_rope(qk, scale, 1e-6, *cos_sin)
    expected = rope.rotate(rms_norm_heads(qk, scale, 1e-6), cos_sin)
    _assert_agree(out, expected)
    torch.testing.assert_close(norm_and_rotate(qk, scale, 1e-6, rope, cos_sin), out, atol=0, rtol=0)


@needs_kernel
@pytest.mark.parametrize("name", ["gelu_pytorch_tanh", "silu"])
def test_act_and_mul_matches_torch(name) -> None:
    from heron.layers import activation

    x = _bf16(5, 2 * 200, seed=7, scale=4.0)
    act = activation.get_activation(name)
    out = activation.act_and_mul(x, act)  # the kernel
    expected = act(x[:, :200]) * x[:, 200:]
    _assert_agree(out, expected)


@needs_kernel
def test_argmax_rows_matches_torch_with_ties_nans_and_tails() -> None:
    from heron.engine.sampler import argmax

    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 1000 + 7, generator=g)[:, 3:1003]  # strided rows, a 16-lane tail
    x[1, 40] = x[1, 900] = 50.0  # a tie: the first wins
    x[2, 997] = 60.0  # the maximum in the tail
    x[3, 10], x[3, 500] = float("nan"), 70.0  # NaN counts as the largest, as in torch
    x[4] = float("-inf")  # nothing but -inf: index 0
    x[5, 0] = 80.0
    expected = x.argmax(dim=-1)
    assert expected.tolist() == [expected[0].item(), 40, 997, 10, 0, 0]
    assert torch.equal(cpu_kernels.elementwise().argmax_rows(x), expected)
    assert torch.equal(argmax(x), expected)
    big = torch.randn(16, 262144, generator=g)
    assert torch.equal(argmax(big), big.argmax(dim=-1))


@needs_kernel
@pytest.mark.parametrize("vocab", [37, 1000, 262_144])
def test_sample_rows_picks_what_the_torch_inverse_cdf_picks(vocab) -> None:
    """The same two-level search as sampler._inverse_cdf: identical picks but where a uniform
    falls within rounding of a boundary (at most 1 in 500 draws here)."""
    from heron.engine.sampler import _inverse_cdf

    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=gen) * 3
    x[2, ::3] = float("-inf")  # filtered tokens
    temperature = torch.tensor([1.0, 0.6, 1.7, 1.0, 0.3, 2.5])
    same = total = 0
    for _ in range(100):
        u = torch.rand(6, generator=gen, dtype=torch.float64)
        picks = cpu_kernels.elementwise().sample_rows(x, temperature, u)
        same += int((picks == _inverse_cdf(torch.softmax(x / temperature[:, None], -1), u)).sum())
        total += 6
        assert torch.isfinite(x[2, picks[2]])  # never a removed token
    assert same >= total - total // 500


@needs_kernel
def test_sample_rows_extreme_uniforms_and_broken_rows() -> None:
    x = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")],  # two live tokens
                      [float("-inf")] * 4,  # nothing finite: argmax, an index
                      [0.0, float("nan"), 1.0, 2.0]])  # NaN: argmax (the NaN)
    kernel = cpu_kernels.elementwise()
    ones = torch.ones(3)
    low = kernel.sample_rows(x, ones, torch.zeros(3, dtype=torch.float64))
    high = kernel.sample_rows(x, ones, torch.full((3,), 1 - 2**-53, dtype=torch.float64))
    assert low.tolist() == [0, 0, 1] and high.tolist() == [2, 0, 1]
