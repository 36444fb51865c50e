"""Linear layers: fused projections, the LM head, and an optional quantized copy for small batches.

A fused weight is the row-wise concatenation of its shards::

    qkv_proj.weight: [q_size + kv_size + kv_size, hidden]
                      |-- shard 0 --|-- 1 --|-- 2 --|

The weight loader fills one shard at a time from the checkpoint's separate tensors.

Every projection goes through ``linear()``: a layer may carry a weight-only quantized copy of
its weight (``heron.layers.quant``) which serves batches of at most ``max_rows`` rows, where
decode is bound by memory bandwidth; larger batches (prefill) use the float weight. On CPUs
without native bf16 that float weight is kept in float32 under bf16 activations
(``keep_float32_weights``): there float32 GEMMs are the fast ones.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class QuantizedWeight:
    """A quantized copy of an [N, K] weight; serves ``x @ w.T`` for batches of ``max_rows`` or fewer."""

    max_rows: int

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x: [M, K] -> [M, N] in ``out_dtype`` (default: x's dtype)."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight the codes stand for as the kernel reads them, [N, K] float32."""
        raise NotImplementedError

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` [n] of the weight -> [n, K] in ``dtype`` (an embedding lookup)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           quantized: QuantizedWeight | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``; x: [M, in] -> [M, out] in ``out_dtype`` (default x's), through
    ``quantized`` when M is small."""
    if quantized is not None and x.dim() == 2 and x.shape[0] <= quantized.max_rows:
        out = quantized.matmul(x, out_dtype)
        return out if bias is None else out + bias
    if weight.dtype != x.dtype:  # float32 weights under bf16 activations (keep_float32_weights)
        return F.linear(x.to(weight.dtype), weight, bias).to(out_dtype or x.dtype)
    out = F.linear(x, weight, bias)
    return out if out_dtype is None else out.to(out_dtype)


def use_only_quantized(module: Linear | LMHead | Embedding, quantized: QuantizedWeight) -> None:
    """Make ``quantized`` the module's only weight (it serves every batch): its float ``weight``
    becomes a meta tensor, shape and dtype kept, no memory, and any use of it outside the
    quantized path fails loudly instead of computing with garbage."""
    if quantized.max_rows != sys.maxsize:
        raise ValueError("only a quantized weight that serves every batch can be the only copy")
    module.quantized = quantized
    weight: torch.Tensor = module.weight
    module.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"),
                                 requires_grad=False)


# What adds LoRA adapters' products to a projection's output: (x, base output) -> output.
LoRAHook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Linear(nn.Linear):
    """``nn.Linear`` that may hold a quantized copy of its weight (set by ``quantize_model``)
    and LoRA adapters beside it (``lora``, set by ``heron.layers.lora.attach_lora``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.quantized: QuantizedWeight | None = None
        self.lora: LoRAHook | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, self.bias, self.quantized)
        return out if self.lora is None else self.lora(x, out)


def keep_float32_weights(model: nn.Module) -> int:
    """Turn every bf16 projection weight that still serves some batches (not the LM head, which
    is the embedding when tied) into float32: large batches then run float32 GEMMs, the x casts
    costing little next to them. For CPUs without native bf16 matmuls; returns the bytes added."""
    added = 0
    for module in model.modules():
        if not isinstance(module, Linear) or module.weight.dtype != torch.bfloat16:
            continue
        if module.quantized is not None and module.quantized.max_rows == sys.maxsize:
            continue  # its quantized copy serves every batch: the float weight is never read
        added += module.weight.numel() * 2
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()
    return added


class MergedLinear(Linear):
    """One ``Linear`` standing for several (q/k/v, or gate/up) that share an input."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = tuple(output_sizes)

    @property
    def num_shards(self) -> int:
        return len(self.output_sizes)

    def shard_view(self, param_name: str, shard: int) -> torch.Tensor:
        """The rows of ``weight`` or ``bias`` that shard ``shard`` occupies (a view)."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of range for {self.num_shards} shards")
        start = sum(self.output_sizes[:shard])
        return getattr(self, param_name).data.narrow(0, start, self.output_sizes[shard])

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split this layer's output ``[..., sum(sizes)]`` back into per-shard views."""
        return out.split(self.output_sizes, dim=-1)


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose table may be a ``QuantizedWeight`` (GGUF blocks, set by the loader),
    whose rows are dequantized as they are looked up, in the table's dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.quantized: QuantizedWeight | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is None:
            return super().forward(ids)
        rows = self.quantized.rows(ids.reshape(-1), self.weight.dtype)  # [n, dim]
        return rows.view(*ids.shape, self.embedding_dim)


class LMHead(nn.Module):
    """hidden -> float32 logits over the vocabulary, optionally soft-capped.

    Tied heads share the embedding's weight (the same Parameter, so the loader sees it once, under
    the embedding's name); untied heads own ``lm_head.weight``.
    """

    def __init__(self, hidden_size: int, vocab_size: int, tied_to: nn.Embedding | None = None,
                 softcap: float | None = None) -> None:
        super().__init__()
        self.weight = tied_to.weight if tied_to is not None else nn.Parameter(
            torch.empty(vocab_size, hidden_size))
        self.softcap = softcap
        self.quantized: QuantizedWeight | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, None, self.quantized, torch.float32)  # [N, vocab]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
