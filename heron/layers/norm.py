"""Normalisation layers shared by the model files."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from heron.kernels.cpu import Elementwise, elementwise


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in float32.

    ``unit_offset=False`` (Llama, Qwen, Mistral): ``w * to_dtype(x / rms(x))``.
    ``unit_offset=True`` (Gemma): ``to_dtype(x / rms(x) * (1 + w))``, weights stored as offsets
    from one (initialised to zero), as in Gemma checkpoints.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self._scale: tuple[tuple[int, int], torch.Tensor] | None = None

    def scale(self) -> torch.Tensor:
        """[dim] float32: ``1 + w`` (Gemma) or ``w``; cached until the weight changes."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._scale is None or self._scale[0] != key:
            w = self.weight.detach().float()
            self._scale = (key, 1.0 + w if self.unit_offset else w)
        return self._scale[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]
        if self.unit_offset:
            return F.rms_norm(x.float(), (x.shape[-1],), self.scale(), self.eps).to(x.dtype)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"


def rms_norm_heads(x: torch.Tensor, scale: torch.Tensor, eps: float,
                   unit_offset: bool = True) -> torch.Tensor:
    """Per-head RMS norm with a per-head multiplier: x [T, heads, D], scale [heads, D] float32,
    rounded as ``RMSNorm`` rounds for ``unit_offset``.

    Lets q and k, adjacent in a fused qkv output, be normalised in one call with their own weights.
    """
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if unit_offset:
        return normed.mul_(scale).to(x.dtype)
    return scale.to(x.dtype) * normed.to(x.dtype)


class HeadNorms:
    """q's and k's per-head norm multipliers stacked, [H + Hkv, D] float32 (q heads first), as
    one ``norm_and_rotate`` call over the adjacent q and k of a fused qkv output takes them;
    rebuilt when a weight changes."""

    def __init__(self, q_norm: RMSNorm, k_norm: RMSNorm, num_heads: int, num_kv_heads: int) -> None:
        self.q_norm, self.k_norm = q_norm, k_norm
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self._cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def scale(self) -> torch.Tensor:
        q_scale, k_scale = self.q_norm.scale(), self.k_norm.scale()
        cached = self._cached
        if cached is None or cached[0] is not q_scale or cached[1] is not k_scale:
            stacked = torch.cat((q_scale.expand(self.num_heads, -1),
                                 k_scale.expand(self.num_kv_heads, -1)))
            self._cached = cached = (q_scale, k_scale, stacked)
        return cached[2]


def add_rms_norm(x: torch.Tensor, h: torch.Tensor | None, post: RMSNorm | None,
                 pre: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The step between two sublayers: ``x = x + post(h)`` (Gemma's sandwich norm; ``post``
    None: ``x + h``, Llama's), then ``(x, pre(x))``.

    With ``h`` None only ``pre(x)`` is computed (the first layer's input norm). On CPU in
    bfloat16 this is one compiled call instead of ~12 operator calls.
    x, h: [T, hidden].
    """
    kernel = cpu_kernel_for(x)
    if (kernel is not None and x.dim() == 2 and x.stride(1) == 1
            and (h is None or h.stride(1) == 1)
            and (post is None or (post.unit_offset == pre.unit_offset and post.eps == pre.eps))):
        post_scale = None if h is None or post is None else post.scale()
        return kernel.add_rms_norm(x, h, post_scale, pre.scale(), pre.eps, pre.unit_offset)
    if h is not None:
        x = x + (h if post is None else post(h))
    return x, pre(x)


def cpu_kernel_for(x: torch.Tensor) -> Elementwise | None:
    """heron's compiled small ops where they apply to ``x``: a bfloat16 tensor on CPU."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return None
    return elementwise()
