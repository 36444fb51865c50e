"""Weight-only quantization for CPU: a small int8 or int4 copy of each projection, made from
float weights (a Hugging Face checkpoint, or a GGUF file when ``--quantization int8 / int4``
asks for it; by default a GGUF file's own blocks are the weights: ``gguf_weight``).

Decoding a few requests is bound by how fast the weights stream from memory, so reading 8 or 4
bits per weight instead of 16 makes those steps faster; with AVX-512 VNNI the int8 form is also
the fastest arithmetic for large batches. ``linear()`` picks the quantized copy for batches of
up to its ``max_rows`` rows and the float weight above that.

Every format has one scale per group of 32 inputs of an output row (as GGUF's Q8_0 and Q4_K
do). Two kernels serve them:

- ``Q8Weight`` (int8, wherever heron's kernels build: VNNI code on AVX-512, plain C elsewhere):
  GGUF's Q8_0 numbers (codes -127..127 and an fp16 scale per group, 8.5 bits per weight) in
  blocks of 16 outputs, through heron's own kernel (``kernels/cpu/q8_gemm.c``), which quantizes the activations the same way per call and
  multiplies int8 by int8 (VPDPBUSD), as llama.cpp does for Q8_0. Measured on the 2-core
  Cascade Lake box, Gemma's 262,144 x 640 LM head: 10 ms at 1 row, 26 ms at 16 rows (oneDNN:
  31 / 148 ms in bf16, 40 / 201 ms in float32); a 4096 x 640 projection at 2,048 rows (prefill):
  29 ms against 74 ms in float32 and 241 ms in bf16. Its AVX-512 VNNI build serves every
  batch size (``default_max_rows``).
- ``PackedWeight`` (int4, and int8 where that kernel is not available): PyTorch's CPU int4
  kernel, which computes ``(code - 8) * scale + zero`` per group::

    int4   codes 0..15:   w ~= min + code * step                 (scale = step, zero = min + 8 step)
    int8   codes -127..127, w ~= s * code, split into two int4 codes of code + 128 = 16 hi + lo:
             w = 16 s (hi - 8) + s lo  =  [x | x] @ [hi-part | lo-part]^T  (one call, K doubled)
                  hi-part: scale 16 s, zero 0        lo-part: scale s, zero 8 s

(PyTorch's int8 kernel has only one scale per row, which on Gemma's weights costs ~2x the
error of group scales, and runs slower here.) Rounding is to the nearest code, so each weight
is off by at most half a step; scales are rounded to their stored dtype first and the codes
fitted against the rounded scales.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
from torch import nn

from heron.kernels.cpu import cpu_flags, q8_gemm
from heron.kernels.cpu.isa import selected_variant
from heron.layers.linear import Linear, LMHead, QuantizedWeight
from heron.progress import track

logger = logging.getLogger(__name__)

QUANTIZATION_METHODS = ("none", "int8", "int4")
GROUP_SIZE = 32
Q8_BLOCK_OUTPUTS = 16  # Q8Weight keeps outputs in blocks of this many (see q8_gemm.c)
QUANTIZED_MAX_ROWS = 16  # the row limit of a PackedWeight (PyTorch's int4 kernel), and of a Q8Weight on AMX CPUs


@dataclass
class Q8Weight(QuantizedWeight):
    """GGUF Q8_0-style codes and fp16 group scales in blocks of 16 outputs, multiplied by heron's
    AVX-512 VNNI kernel (layout and arithmetic: ``cpu_kernels/q8_gemm.c``)."""

    codes: torch.Tensor  # [N / 16, K / 4, 16, 4] uint8: code + 128, code in -127..127
    scales: torch.Tensor  # [N / 16, K / 32, 16] float16
    max_rows: int

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        kernel = q8_gemm()  # cached; a Q8Weight is only built where it loaded
        if kernel is None:
            raise RuntimeError("q8_gemm kernel unavailable, yet a Q8Weight was built")
        out_dtype = out_dtype or x.dtype
        if out_dtype in (torch.float32, torch.bfloat16):
            return kernel(x, self.codes, self.scales, out_dtype)
        return kernel(x, self.codes, self.scales, torch.float32).to(out_dtype)

    def row_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [N, K] int8, scales [N, K / 32] float16) in plain row order."""
        blocks, quads, outs, _ = self.codes.shape
        codes = self.codes.permute(0, 2, 1, 3).reshape(blocks * outs, quads * 4).to(torch.int16) - 128
        return codes.to(torch.int8), self.scales.permute(0, 2, 1).reshape(blocks * outs, -1)

    def dequantize(self) -> torch.Tensor:
        codes, scales = self.row_codes()
        n, k = codes.shape
        return (codes.float().view(n, k // GROUP_SIZE, GROUP_SIZE) * scales.float()[..., None]).view(n, k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales))


@dataclass
class PackedWeight(QuantizedWeight):
    """Codes of an [N, K] weight in PyTorch's int4 kernel layout."""

    packed: torch.Tensor  # the kernel's packed layout of codes [N, K * parts] (two per byte)
    scales_and_zeros: torch.Tensor  # [K * parts / GROUP_SIZE, N, 2], the activations' dtype
    parts: int  # 1 for int4; 2 for int8 (x is repeated once per part along K)
    max_rows: int

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        # x: [M, K] -> [M, N]
        if self.parts > 1:
            x = torch.cat([x] * self.parts, dim=1)  # [M, K * parts] (cat: ~5x cheaper than repeat)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, GROUP_SIZE, self.scales_and_zeros.to(x.dtype))
        return out if out_dtype is None else out.to(out_dtype)

    def dequantize(self) -> torch.Tensor:
        k = self.scales_and_zeros.shape[0] * GROUP_SIZE // self.parts
        eye = torch.eye(k, dtype=self.scales_and_zeros.dtype)
        return self.matmul(eye).float().t().contiguous()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))


_CHUNK_ROWS = 1024  # rows quantized at a time: temporaries stay in cache (LM head 0.5 s, not 2.5 s)


def quantize_int4(weight: torch.Tensor, max_rows: int) -> QuantizedWeight:
    """Asymmetric 4-bit codes per group of 32: 16 levels from the group's min to its max."""
    return _by_row_chunks(weight, _int4_codes, max_rows)


def quantize_int8(weight: torch.Tensor, max_rows: int) -> QuantizedWeight:
    """Symmetric 8-bit codes per group of 32 (GGUF's Q8_0): a ``Q8Weight`` where heron's kernel
    loads (and the shape fits its blocks of 16 outputs), else two 4-bit halves in a ``PackedWeight``."""
    if q8_gemm() is not None and weight.shape[0] % Q8_BLOCK_OUTPUTS == 0:
        chunks = [_q8_blocks(weight[i:i + _CHUNK_ROWS]) for i in range(0, weight.shape[0], _CHUNK_ROWS)]
        return Q8Weight(codes=torch.cat([c for c, _ in chunks]),
                        scales=torch.cat([s for _, s in chunks]), max_rows=max_rows)
    return _by_row_chunks(weight, _int8_codes, max_rows)


def _by_row_chunks(weight: torch.Tensor, codes_of, max_rows: int) -> PackedWeight:
    """Quantize ``_CHUNK_ROWS`` rows at a time (rows are independent in every format; the
    262,144-row Gemma LM head took 2.4 s in one piece)."""
    chunks = [codes_of(weight[i:i + _CHUNK_ROWS]) for i in range(0, weight.shape[0], _CHUNK_ROWS)]
    return PackedWeight(packed=torch.cat([c.packed for c in chunks]),
                        scales_and_zeros=torch.cat([c.scales_and_zeros for c in chunks], dim=1),
                        parts=chunks[0].parts, max_rows=max_rows)


def _q8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of rows in ``Q8Weight``'s layout: (codes [N / 16, K / 4, 16, 4] uint8, scales
    [N / 16, K / 32, 16] float16)."""
    n, k = weight.shape
    w = weight.detach().float().view(n, k // GROUP_SIZE, GROUP_SIZE)  # [N, G, 32]
    scale = (w.abs().amax(dim=2) / 127).clamp(min=2 ** -24).half()  # [N, G]
    codes = torch.round(w / scale.float()[..., None]).clamp(-127, 127) + 128  # [N, G, 32] in 1..255
    blocks = n // Q8_BLOCK_OUTPUTS
    codes = codes.to(torch.uint8).view(blocks, Q8_BLOCK_OUTPUTS, k // 4, 4).permute(0, 2, 1, 3)
    return codes.contiguous(), scale.view(blocks, Q8_BLOCK_OUTPUTS, -1).permute(0, 2, 1).contiguous()


def _int4_codes(weight: torch.Tensor) -> PackedWeight:
    n, k = weight.shape
    w = weight.detach().float().view(n, k // GROUP_SIZE, GROUP_SIZE)  # [N, G, 32]
    low, high = w.amin(dim=2), w.amax(dim=2)  # [N, G]
    step = ((high - low) / 15).clamp(min=1e-12).to(weight.dtype)
    zero = (low + 8 * step.float()).to(weight.dtype)
    code0 = zero.float() - 8 * step.float()  # [N, G]: the value of code 0, after rounding
    codes = torch.round((w - code0[..., None]) / step.float()[..., None]).clamp(0, 15)
    return _pack(codes.view(n, k), step, zero, parts=1)


def _int8_codes(weight: torch.Tensor) -> PackedWeight:
    n, k = weight.shape
    w = weight.detach().float().view(n, k // GROUP_SIZE, GROUP_SIZE)  # [N, G, 32]
    scale = (w.abs().amax(dim=2) / 127).clamp(min=1e-12).to(weight.dtype)  # [N, G]
    codes = torch.round(w / scale.float()[..., None]).clamp(-127, 127).to(torch.int32) + 128
    hi, lo = (codes >> 4).view(n, k), (codes & 15).view(n, k)  # each 0..15
    steps = torch.cat((scale * 16, scale), dim=1)  # [N, 2G]: hi groups, then lo groups
    zeros = torch.cat((torch.zeros_like(scale), scale * 8), dim=1)
    return _pack(torch.cat((hi, lo), dim=1), steps, zeros, parts=2)


def _pack(codes: torch.Tensor, steps: torch.Tensor, zeros: torch.Tensor, parts: int) -> PackedWeight:
    # codes: [N, K'] in 0..15; steps, zeros: [N, K' / 32]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    scales_and_zeros = torch.stack((steps, zeros), dim=-1).transpose(0, 1).contiguous()
    return PackedWeight(packed=packed, scales_and_zeros=scales_and_zeros, parts=parts, max_rows=0)


_QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}


def can_quantize(weight: torch.Tensor) -> bool:
    """Whether PyTorch's CPU int4 kernel takes this [N, K] weight."""
    if weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype not in (
            torch.float32, torch.bfloat16, torch.float16):
        return False
    n, k = weight.shape
    return k % GROUP_SIZE == 0 and n % 16 == 0


def default_max_rows(quantized: QuantizedWeight) -> int:
    """How many rows a quantized copy serves by default. heron's int8 kernel serves every batch:
    on the 2-core Cascade Lake box it beats oneDNN at every row count (4096 x 640 at 2,048 rows:
    28.8 ms against 73.6 ms in float32 and 241 ms in bf16) except where AMX tiles do bf16 GEMMs
    (not measured: there large batches go to oneDNN). PyTorch's int4 kernel only wins below
    ``QUANTIZED_MAX_ROWS``."""
    if isinstance(quantized, Q8Weight) and _q8_beats_onednn():
        return sys.maxsize
    return QUANTIZED_MAX_ROWS


def _q8_beats_onednn() -> bool:
    """The AVX-512 VNNI build of the int8 kernel does, but not where AMX tiles do bf16 GEMMs;
    its AVX2 and portable builds are not measured against oneDNN for large batches."""
    flags = cpu_flags()
    return selected_variant() == "avx512" and "avx512_vnni" in flags and "amx_bf16" not in flags


def quantize_model(model: nn.Module, method: str, max_rows: int | None = None) -> int:
    """Give every projection and the LM head a ``method`` copy serving up to ``max_rows`` rows
    (default: ``default_max_rows``); returns the bytes added."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {method!r}; choose from {', '.join(QUANTIZATION_METHODS)}")
    if method == "none":
        return 0
    added, skipped = 0, 0
    targets = [m for m in model.modules() if isinstance(m, (Linear, LMHead))]
    for module in track(targets, f"preparing weights ({method})", unit="projection"):
        if not can_quantize(module.weight):
            skipped += 1
            continue
        quantized = _QUANTIZERS[method](module.weight, max_rows or 0)
        if max_rows is None:  # the default depends on which kind of copy the CPU got
            quantized.max_rows = default_max_rows(quantized)
        module.quantized = quantized
        added += module.quantized.nbytes
    if skipped:
        logger.info("%d projections stay float only (shape or device unsupported by %s)", skipped, method)
    return added
