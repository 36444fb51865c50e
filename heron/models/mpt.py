"""MPT (``MptForCausalLM``, mosaicml/mpt-7b style): ALiBi instead of positions, no biases.

    x = wte(ids)
    per block:  x += out_proj(attn(Wqkv(norm_1(x))))     ALiBi bias slope[h] * (k_pos - q_pos)
                x += down_proj(gelu(up_proj(norm_2(x))))
    logits = norm_f(x) @ wte.T                             (tied unless the config says not)

LayerNorms have a weight and no bias, as in Hugging Face's MPT.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from heron.layers.attention import Attention, ForwardContext
from heron.layers.linear import Embedding, Linear
from heron.models.base import CausalLM, KVShape


def mpt_alibi_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> torch.Tensor:
    """[num_heads] float32: ``2 ** -(i * alibi_bias_max / n)`` for i = 1..n, n the next power of 2.

    When ``num_heads`` is not a power of two, the odd-indexed slopes come first, then the
    even-indexed ones, truncated to ``num_heads`` (MPT's ordering).
    """
    padded = 2 ** math.ceil(math.log2(num_heads))
    exponents = torch.arange(1, padded + 1, dtype=torch.float32) * (alibi_bias_max / padded)
    slopes = 1.0 / torch.pow(2.0, exponents)
    if padded != num_heads:
        slopes = torch.cat((slopes[1::2], slopes[::2]))[:num_heads]
    return slopes


# Settings transformers' MPT ignores (it would load such a checkpoint and compute something
# else than the model, or fail on the weights' shapes): heron refuses them by name.
_PLAIN_NORMS = ("layernorm", "low_precision_layernorm")
_PLAIN_FFNS = (None, "mptmlp")


def _check_supported(config: Any) -> None:
    attn = config.attn_config
    if not attn.alibi:
        raise ValueError("MPT without ALiBi (learned positions) is not supported")
    for flag in ("qk_ln", "prefix_lm", "attn_uses_sequence_id"):
        if getattr(attn, flag, False):
            raise ValueError(f"MPT with attn_config.{flag}=True is not supported")
    attn_type = getattr(attn, "attn_type", "multihead_attention")
    if attn_type != "multihead_attention":
        raise ValueError(f"MPT with attn_config.attn_type={attn_type!r} is not supported "
                         "(multihead_attention only)")
    if not getattr(config, "no_bias", True):
        raise ValueError("MPT with no_bias=False (biases on projections and norms) is not supported")
    if getattr(config, "logit_scale", None) is not None:
        raise ValueError(f"MPT with logit_scale={config.logit_scale!r} is not supported")
    norm_type = getattr(config, "norm_type", "low_precision_layernorm")
    if norm_type not in _PLAIN_NORMS:
        raise ValueError(f"MPT with norm_type={norm_type!r} is not supported "
                         f"({', '.join(_PLAIN_NORMS)} only)")
    ffn = getattr(config, "ffn_config", None) or {}
    ffn_type = ffn.get("ffn_type") if isinstance(ffn, dict) else getattr(ffn, "ffn_type", None)
    if ffn_type not in _PLAIN_FFNS:
        raise ValueError(f"MPT with ffn_config.ffn_type={ffn_type!r} is not supported (mptmlp only)")


class MptAttention(nn.Module):
    """Fused Wqkv (no bias), optional clamp, ALiBi paged attention, output projection."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        hidden = config.d_model
        self.num_heads = config.n_heads
        self.head_dim = hidden // self.num_heads
        attn_config = config.attn_config
        self.clip_qkv = attn_config.clip_qkv
        self.Wqkv = Linear(hidden, 3 * hidden, bias=False)
        self.out_proj = Linear(hidden, hidden, bias=False)
        slopes = mpt_alibi_slopes(self.num_heads, attn_config.alibi_bias_max)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_heads, layer_idx,
                              scale=attn_config.softmax_scale, alibi_slopes=slopes)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv = self.Wqkv(x)  # [T, 3 * hidden]
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = qkv.chunk(3, dim=-1)  # [T, hidden] each
        return self.out_proj(self.attn(q, k, v, ctx))


class MptMLP(nn.Module):
    """``down(gelu(up(x)))`` with exact GELU."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        inner = config.expansion_ratio * config.d_model
        self.up_proj = Linear(config.d_model, inner, bias=False)
        self.down_proj = Linear(inner, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class MptBlock(nn.Module):
    """Pre-norm block with bias-free LayerNorms."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.norm_1 = nn.LayerNorm(config.d_model, eps=eps, bias=False)
        self.attn = MptAttention(config, layer_idx)
        self.norm_2 = nn.LayerNorm(config.d_model, eps=eps, bias=False)
        self.ffn = MptMLP(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), ctx)
        return x + self.ffn(self.norm_2(x))


class MptModel(nn.Module):
    """Token embedding, blocks, final norm (HF's ``transformer.`` prefix)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.wte = Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(MptBlock(config, i) for i in range(config.n_layers))
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        x = self.wte(input_ids)  # [T, hidden]
        for block in self.blocks:
            x = block(x, ctx)
        return self.norm_f(x)


class MptForCausalLM(CausalLM):
    """MPT causal LM. ``positions`` are unused: ALiBi reads positions from the paged metadata."""

    def __init__(self, config: Any) -> None:
        _check_supported(config)
        transformer = MptModel(config)
        kv = KVShape(config.n_layers, config.n_heads, config.d_model // config.n_heads)
        super().__init__(config, "transformer", transformer, transformer.wte, kv,
                         hidden_size=config.d_model, tie_default=True)
