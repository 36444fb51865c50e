"""GGUF quantized blocks as weights: matmul and row lookup straight from the blocks
(``gguf_matmul.c``), one library per kernel variant (see ``isa``).

A weight is one or more *segments*: ``[rows, row_bytes]`` uint8 tensors of one ggml type
each (a view of the memory-mapped file), stacked along the output dimension.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from heron.kernels.cpu.build import load_library, per_variant

# ggml types the kernels read (gguf.GGMLQuantizationType values): elements and bytes per block.
BLOCK_FORMATS = {"Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24),
                 "Q8_0": (8, 32, 34), "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144),
                 "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210), "IQ4_NL": (20, 32, 18),
                 "IQ4_XS": (23, 256, 136)}
# Float rows the kernels also read (a part of a fused weight whose other parts are quantized).
FLOAT_FORMATS = {"F32": (0, 1, 4), "F16": (1, 1, 2), "BF16": (30, 1, 2)}
TYPE_IDS = {type_id for type_id, _, _ in (*BLOCK_FORMATS.values(), *FLOAT_FORMATS.values())}
_ERRORS = {-1: "K is not a whole number of blocks (or a row's bytes do not match)",
           -2: "out of memory", -3: "a ggml type the kernel does not read",
           -4: "a row id out of range"}


class Segment(ctypes.Structure):
    """``heron_gguf_segment`` of kernels_gguf.h."""

    _fields_ = [("data", ctypes.c_void_p), ("rows", ctypes.c_int64), ("row_bytes", ctypes.c_int64),
                ("type", ctypes.c_int64), ("row_ids", ctypes.c_void_p)]


@dataclass(frozen=True)
class BlockRows:
    """Rows of one GGUF tensor in its block format: ``data`` [rows, row_bytes] uint8; row i is
    stored row ``row_ids[i]`` where given (int64 [rows])."""

    data: torch.Tensor
    ggml_type: int
    row_ids: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    def struct(self) -> Segment:
        rows, row_bytes = self.data.shape
        ids = None if self.row_ids is None else self.row_ids.data_ptr()
        return Segment(self.data.data_ptr(), rows, row_bytes, self.ggml_type, ids)


def segment_array(parts: Sequence[BlockRows]) -> ctypes.Array[Segment]:
    """The C array of ``parts`` (its pointers stay valid while the tensors live)."""
    return (Segment * len(parts))(*(p.struct() for p in parts))


class GGUFKernels:
    """The entry points of one variant's ``gguf_matmul`` library."""

    def __init__(self, lib: ctypes.CDLL, variant: str) -> None:
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self.variant = variant
        self._matmul = lib.heron_gguf_matmul
        self._matmul.argtypes = [ptr, i64, cint, i64, i64, ptr, i64, ptr, i64, cint, cint]
        self._rows = lib.heron_gguf_rows
        self._rows.argtypes = [ptr, i64, ptr, i64, ptr, cint]
        self._check = lib.heron_gguf_check
        self._check.argtypes = [ptr, i64, i64]
        self._loop = lib.heron_gguf_matmul_loop
        self._loop.argtypes = [*self._matmul.argtypes, i64, ctypes.POINTER(ctypes.c_double)]
        for fn in (self._matmul, self._rows, self._check, self._loop):
            fn.restype = ctypes.c_int

    def check(self, segments: ctypes.Array[Segment], k: int) -> None:
        """Raise ValueError where the kernel cannot read these segments for K = ``k``."""
        _raise(self._check(segments, len(segments), k), "gguf_check")

    def matmul(self, x: torch.Tensor, segments: ctypes.Array[Segment], n: int, exact: bool,
               out_dtype: torch.dtype) -> torch.Tensor:
        """x [M, K] float32 / bf16 @ W^T -> [M, n] in ``out_dtype`` (float32 or bf16)."""
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        if x.stride(-1) != 1:
            x = x.contiguous()
        m, k = x.shape
        out = torch.empty(m, n, dtype=out_dtype)
        _raise(self._matmul(x.data_ptr(), x.stride(0), x.dtype == torch.bfloat16, m, k, segments,
                            len(segments), out.data_ptr(), n, out_dtype == torch.bfloat16, exact),
               "gguf_matmul")
        return out

    def seconds_per_call(self, x: torch.Tensor, segments: ctypes.Array[Segment], n: int,
                         exact: bool, calls: int) -> float:
        """``matmul(x, ...)`` (bf16 out) ``calls`` times in a row, timed in C: seconds per call."""
        x = x.contiguous()
        m, k = x.shape
        out = torch.empty(m, n, dtype=torch.bfloat16)
        seconds = ctypes.c_double()
        _raise(self._loop(x.data_ptr(), x.stride(0), x.dtype == torch.bfloat16, m, k, segments,
                          len(segments), out.data_ptr(), n, True, exact, calls,
                          ctypes.byref(seconds)), "gguf_matmul")
        return seconds.value / calls

    def rows(self, segment: Segment, k: int, ids: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The dequantized rows ``ids`` [n] of one segment -> [n, K] float32 or bf16."""
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty(ids.numel(), k, dtype=out_dtype)
        _raise(self._rows(ctypes.byref(segment), k, ids.data_ptr(), ids.numel(), out.data_ptr(),
                          out_dtype == torch.bfloat16), "gguf_rows")
        return out


def _raise(status: int, name: str) -> None:
    if status:
        raise ValueError(f"{name}: {_ERRORS.get(status, f'status {status}')}")


@per_variant
def gguf_kernels(variant: str) -> GGUFKernels | None:
    """The kernels of ``variant`` (default: the selected one); None where kernels are off."""
    lib = load_library("gguf_matmul", ("gguf_matmul",), variant)
    return None if lib is None else GGUFKernels(lib, variant)
