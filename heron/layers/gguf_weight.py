"""A weight that is the GGUF file's own blocks: the only copy, multiplied in place.

A GGUF model's quantized tensors (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
IQ4_NL, IQ4_XS) stay in the memory-mapped file; a projection holds views of their rows
(``BlockRows``), one per checkpoint tensor it fuses (q / k / v may be different formats), and
heron's kernels (``heron.kernels.cpu.gguf``) read the blocks for every batch size::

    qkv_proj: GGUFWeight(parts=[q rows: Q5_0 [1024, 440 B], k rows: Q5_0 [256, 440 B],
                                v rows: Q8_0 [256, 680 B]])       out = x @ [q | k | v]^T

Two modes, fixed per model: ``exact`` (float32 activations: x @ dequantize(W)^T up to float
rounding, the numbers transformers computes from the same file) and int8 (activations
quantized per row and group of 8; llama.cpp uses 32; see gguf_matmul.c for the bound).
An embedding looks its rows up from the same blocks (``rows``), and a tied LM head multiplies
with the same object.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence

import torch

from heron.kernels.cpu.gguf import BlockRows, GGUFKernels, Segment, gguf_kernels, segment_array
from heron.layers.linear import QuantizedWeight


class GGUFWeight(QuantizedWeight):
    """An [N, K] weight as GGUF rows of blocks, N = the parts' rows stacked."""

    def __init__(self, parts: Sequence[BlockRows], in_features: int, exact: bool,
                 kernels: GGUFKernels | None = None, mapped: bool = True) -> None:
        self.parts = tuple(parts)
        self.mapped = mapped  # the parts are views of the mapped file (else a copy in memory)
        self.in_features = in_features
        self.out_features = sum(part.rows for part in self.parts)
        self.exact = exact
        self.max_rows = sys.maxsize  # the kernels serve every batch size
        found = kernels or gguf_kernels()
        if found is None:
            raise RuntimeError("GGUF weights need heron's CPU kernels (a C compiler)")
        self._kernels: GGUFKernels = found
        self._segments = segment_array(self.parts)  # points into the parts' tensors
        self._kernels.check(self._segments, in_features)

    @property
    def segments(self) -> ctypes.Array[Segment]:
        """The parts as the C kernels take them (valid while this weight lives)."""
        return self._segments

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [M, K] -> [M, N] in ``out_dtype`` (default x's)."""
        out_dtype = out_dtype or x.dtype
        kernel_dtype = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
        out = self._kernels.matmul(x, self._segments, self.out_features, self.exact, kernel_dtype)
        return out if kernel_dtype == out_dtype else out.to(out_dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized rows ``ids`` [n] -> [n, K] in ``dtype`` (an embedding lookup)."""
        if len(self.parts) != 1:
            raise ValueError("row lookup reads a single GGUF tensor")
        kernel_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
        out = self._kernels.rows(self._segments[0], self.in_features, ids, kernel_dtype)
        return out if kernel_dtype == dtype else out.to(dtype)

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32: the values gguf.quants.dequantize gives (rows in served order)."""
        return torch.cat([self._kernels.rows(segment, self.in_features, torch.arange(part.rows),
                                             torch.float32)
                          for segment, part in zip(self._segments, self.parts)])

    @property
    def nbytes(self) -> int:
        """Bytes of the file this weight reads (mapped, not copied)."""
        return sum(part.data.numel() for part in self.parts)
