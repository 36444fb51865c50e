"""CPU kernels heron compiles itself, on first use, for the machine it runs on.

A kernel is one C file here (with the portable bodies its variants without AVX-512 include).
It is built with the system C compiler into heron's cache, once per variant (``isa``: avx512,
avx2vnni, avx2 or portable, picked at run time from what the CPU reports, or forced with
``HERON_CPU_ISA``), and loaded with ctypes (``build``): no build step at install time and no
compiler at all where kernels are not wanted. Where a kernel cannot be had (no compiler,
``HERON_CPU_ISA=none``, ``HERON_CPU_KERNELS=0``, a failed build) the loader says why once and
returns None; callers keep their PyTorch path.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from heron.kernels.cpu.build import load_library, per_variant
from heron.kernels.cpu.isa import DISABLE_ENV_VAR, cpu_features

__all__ = ["DISABLE_ENV_VAR", "Elementwise", "cpu_flags", "elementwise", "fused_decode",
           "has_native_bf16", "paged_decode_attention", "q8_gemm"]


def cpu_flags() -> frozenset[str]:
    """The CPU's features as the probe reports them (see ``isa``), e.g. ``avx512_vnni``."""
    return cpu_features()


def has_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX). Elsewhere heron's
    kernels emulate the bf16 steps, and oneDNN's bf16 GEMM is 3-5x slower than its float32 one
    from ~100 rows up (Cascade Lake, 4096 x 640 at 512 rows: 52.9 ms against 12.3 ms)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_features())


Q8Gemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]


@per_variant
def q8_gemm(variant: str) -> Q8Gemm | None:
    """``fn(x, codes, scales, out_dtype)``: x [M, K] (bf16 or float32) @ W^T -> [M, N] in float32
    or bfloat16, W in the blocked int8 layout of ``q8_gemm.c`` (``heron.layers.quant.Q8Weight``
    builds it); None where unavailable."""
    lib = load_library("q8_gemm", ("q8_gemm",), variant)
    if lib is None:
        return None
    fn = lib.heron_q8_gemm
    fn.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ctypes.c_int, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]

    def q8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
           out_dtype: torch.dtype) -> torch.Tensor:
        # x: [M, K]; codes: [N / 16, K / 4, 16, 4] uint8; scales: [N / 16, K / 32, 16] fp16
        x_fp32 = x.dtype == torch.float32
        if not x_fp32 and x.dtype != torch.bfloat16:
            x, x_fp32 = x.float(), True
        if x.stride(1) != 1:
            x = x.contiguous()
        m, k = x.shape
        n = codes.shape[0] * codes.shape[2]
        out = torch.empty(m, n, dtype=out_dtype)  # [M, N]
        status = fn(x.data_ptr(), x.stride(0), x_fp32, m, k, codes.data_ptr(), scales.data_ptr(), n,
                    out.data_ptr(), out_dtype == torch.bfloat16)
        if status:
            raise ValueError(f"q8_gemm: K={k} is not a multiple of 32 or N={n} of 16" if status == -1
                             else "q8_gemm: no memory for its buffers")
        return out

    return q8


def load_engine_kernels() -> None:
    """Load (on a first start: compile) the libraries a CPU engine steps with: a model loader
    calls it before it reads weights into memory, so that the compiler's memory (~160 MiB for
    the fused decode step) and the weights' do not add up in the first start's peak."""
    fused_decode()
    elementwise()
    paged_decode_attention()


@per_variant
def fused_decode(variant: str) -> Callable[..., int] | None:
    """``fn(model, batch)``: a whole decode step of a decoder stack (see fused_decode.c and
    heron/models/fused_decode.py, which builds the structs); None where unavailable."""
    lib = load_library("fused_decode", ("fused_decode", "q8_gemm", "gguf_matmul", "elementwise",
                                        "paged_attention"),
                       variant)
    if lib is None:
        return None
    fn = lib.heron_fused_decode
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return fn


PagedDecodeAttention = Callable[..., torch.Tensor]


@per_variant
def paged_decode_attention(variant: str) -> PagedDecodeAttention | None:
    """``fn(q, kv_cache, block_tables, seq_lens, num_heads, scale, sliding_window)`` -> [B, H, D]
    bf16: one query token per sequence attended over its pages of ``kv_cache`` in place
    (see paged_attention.c); None where unavailable."""
    lib = load_library("paged_attention", ("paged_attention",), variant)
    if lib is None:
        return None
    fn = lib.heron_paged_decode_attention
    fn.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, i64, ptr, i64, i64, i64,
                   ctypes.c_float, ptr]

    def attend(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, sliding_window: int | None) -> torch.Tensor:
        # q: [B, H, D] bf16, heads contiguous; kv_cache: [2, num_blocks, block_size, Hkv, D] bf16
        # block_tables: [B, max_blocks] int64; seq_lens: [B] int64
        if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
            q = q.contiguous()
        block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
        (batch, heads, dim), (_, num_blocks, block_size, kv_heads, _) = q.shape, kv_cache.shape
        out = torch.empty(batch, heads, dim, dtype=torch.bfloat16)
        status = fn(q.data_ptr(), q.stride(0), kv_cache.data_ptr(), num_blocks, block_size,
                    kv_heads, dim, block_tables.data_ptr(), block_tables.stride(0),
                    seq_lens.data_ptr(), batch, heads, sliding_window or 0, scale, out.data_ptr())
        if status:
            raise ValueError(f"paged_decode_attention: unsupported shape (status {status})")
        return out

    return attend


class Elementwise:
    """The per-layer small ops of ``elementwise.c``; bf16 tensors on CPU, rows contiguous."""

    ACTIVATIONS = ("gelu_tanh", "silu")

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        self._add_rms_norm = lib.heron_add_rms_norm
        c_int = ctypes.c_int
        self._add_rms_norm.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, ptr, f32, c_int, ptr, ptr]
        self._qk_norm_rope = lib.heron_qk_norm_rope
        self._qk_norm_rope.argtypes = [ptr, i64, i64, i64, i64, ptr, f32, c_int, ptr, ptr, ptr]
        self._act_and_mul = lib.heron_act_and_mul
        self._act_and_mul.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ptr]
        self._argmax_rows = lib.heron_argmax_rows
        self._argmax_rows.argtypes = [ptr, i64, i64, i64, ptr]
        self._sample_rows = lib.heron_sample_rows
        self._sample_rows.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr]
        for fn in (self._add_rms_norm, self._qk_norm_rope, self._act_and_mul, self._argmax_rows,
                   self._sample_rows):
            fn.restype = ctypes.c_int

    def add_rms_norm(self, x: torch.Tensor, h: torch.Tensor | None, post_scale: torch.Tensor | None,
                     pre_scale: torch.Tensor, eps: float,
                     unit_offset: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + norm(h) * post_scale, norm(that) * pre_scale); post_scale None: h is added as
        is; h None: (x, norm(x) * pre). x, h: [T, dim] bf16; scales: [dim] float32; the
        roundings of Gemma norms (``unit_offset``) or Llama's (see elementwise.c)."""
        rows, dim = x.shape
        x_out = torch.empty_like(x, memory_format=torch.contiguous_format) if h is not None else x
        y_out = torch.empty(rows, dim, dtype=torch.bfloat16)
        _check(self._add_rms_norm(
            x.data_ptr(), x.stride(0), 0 if h is None else h.data_ptr(), 0 if h is None else h.stride(0),
            rows, dim, None if post_scale is None else post_scale.data_ptr(), pre_scale.data_ptr(),
            eps, int(unit_offset), x_out.data_ptr(), y_out.data_ptr()), "add_rms_norm")
        return x_out, y_out

    def qk_norm_rope(self, qk: torch.Tensor, scale: torch.Tensor | None, eps: float,
                     cos: torch.Tensor, sin: torch.Tensor, unit_offset: bool = True) -> torch.Tensor:
        """qk [T, heads, D] (heads contiguous), scale [heads, D] float32 (None: no norm),
        cos/sin [T, 1, D / 2] bf16 -> normalised and rotated [T, heads, D]."""
        tokens, heads, dim = qk.shape
        out = torch.empty(tokens, heads, dim, dtype=torch.bfloat16)
        _check(self._qk_norm_rope(qk.data_ptr(), qk.stride(0), tokens, heads, dim,
                                  None if scale is None else scale.data_ptr(), eps,
                                  int(unit_offset), cos.data_ptr(), sin.data_ptr(),
                                  out.data_ptr()), "qk_norm_rope")
        return out

    def act_and_mul(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        """x = [gate | up] [T, 2 d] bf16 -> act(gate) * up [T, d]."""
        rows, d = x.shape[0], x.shape[1] // 2
        out = torch.empty(rows, d, dtype=torch.bfloat16)
        _check(self._act_and_mul(x.data_ptr(), x.stride(0), rows, d, self.ACTIVATIONS.index(activation),
                                 out.data_ptr()), "act_and_mul")
        return out

    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, cols] float32 (columns contiguous) -> [rows] int64, as ``x.argmax(dim=-1)``."""
        if x.stride(1) != 1:
            x = x.contiguous()
        rows, cols = x.shape
        out = torch.empty(rows, dtype=torch.int64)
        _check(self._argmax_rows(x.data_ptr(), x.stride(0), rows, cols, out.data_ptr()), "argmax_rows")
        return out

    def sample_rows(self, x: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """One draw per row of x [rows, cols] float32 from softmax(x / temperature) by inverse
        CDF: temperature [rows] float32, uniforms [rows] float64 in [0, 1) -> [rows] int64."""
        if x.stride(1) != 1:
            x = x.contiguous()
        rows, cols = x.shape
        temperature, uniforms = temperature.contiguous(), uniforms.contiguous()
        out = torch.empty(rows, dtype=torch.int64)
        _check(self._sample_rows(x.data_ptr(), x.stride(0), rows, cols, temperature.data_ptr(),
                                 uniforms.data_ptr(), out.data_ptr()), "sample_rows")
        return out


def _check(status: int, name: str) -> None:
    if status:
        raise ValueError(f"{name}: unsupported shape (status {status})")


@per_variant
def elementwise(variant: str) -> Elementwise | None:
    """The small per-layer ops compiled (see elementwise.c); None where unavailable."""
    lib = load_library("elementwise", ("elementwise",), variant)
    return None if lib is None else Elementwise(lib)
