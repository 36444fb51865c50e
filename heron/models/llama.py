"""Llama-family decoders: Llama 2/3, Mistral, Qwen2, Qwen3 (one architecture, config flags).

    embed -> N x [x += attn(norm(x)); x += mlp(norm(x))] -> norm -> lm_head (maybe tied)

Differences between the families are flags, read from the HF config:
  - Qwen2: bias on q/k/v (``LlamaVariant.qkv_bias``); Llama: ``attention_bias`` / ``mlp_bias``.
  - Qwen3: RMSNorm over each head of q and k before RoPE (``LlamaVariant.qk_norm``).
  - Mistral / Qwen2 / Qwen3: a sliding window where the config enables it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from heron.layers.activation import act_and_mul, get_activation
from heron.layers.attention import Attention, ForwardContext
from heron.layers.linear import Embedding, Linear, MergedLinear
from heron.layers.norm import RMSNorm
from heron.layers.rotary import RotaryEmbedding, rope_parameters
from heron.models.base import GATE_UP_STACKED, QKV_STACKED, CausalLM, KVShape

CosSin = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LlamaVariant:
    """What sets a family apart from plain Llama."""

    qkv_bias: bool = False  # Qwen2: q/k/v projections always carry a bias
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k


def layer_sliding_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window (None: full attention), from whichever fields the config has."""
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return [None] * num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if hasattr(config, "max_window_layers"):  # Qwen2/3 under transformers 4.x
        return [window if i >= config.max_window_layers else None for i in range(num_layers)]
    return [window] * num_layers  # Mistral: every layer


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads_of(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


class LlamaAttention(nn.Module):
    """Fused q/k/v projection, optional per-head q/k norm, RoPE, paged attention, output proj."""

    def __init__(self, config: Any, variant: LlamaVariant, layer_idx: int,
                 sliding_window: int | None) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = kv_heads_of(config)
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = MergedLinear(config.hidden_size, [q_size, kv_size, kv_size],
                                     bias=bias or variant.qkv_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if variant.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if variant.qk_norm else None
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, layer_idx,
                              sliding_window=sliding_window)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cos_sin: CosSin,
                ctx: ForwardContext) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))  # [T, H*D], [T, Hkv*D], [T, Hkv*D]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.rotate(q, cos_sin), rope.rotate(k, cos_sin)  # [T, H, D], [T, Hkv, D]
        out = self.attn(q.flatten(1), k.flatten(1), v, ctx)  # [T, H*D]
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))`` with gate and up fused into one matmul."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], bias=bias)
        self.down_proj = Linear(size, config.hidden_size, bias=bias)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.act))  # [T, hidden]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: attention then MLP, each added to the residual stream."""

    def __init__(self, config: Any, variant: LlamaVariant, layer_idx: int,
                 sliding_window: int | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, variant, layer_idx, sliding_window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cos_sin: CosSin,
                ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cos_sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's ``model.`` prefix)."""

    def __init__(self, config: Any, variant: LlamaVariant) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        windows = layer_sliding_windows(config)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, variant, i, windows[i])
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(head_dim_of(config), rope_parameters(config),
                                      getattr(config, "max_position_embeddings", None))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, self.rotary, cos_sin, ctx)
        return self.norm(x)


class LlamaForCausalLM(CausalLM):
    """Llama 2/3 (incl. llama3 RoPE scaling); the base of the Mistral and Qwen classes below."""

    variant = LlamaVariant()

    def __init__(self, config: Any) -> None:
        model = LlamaModel(config, self.variant)
        kv = KVShape(config.num_hidden_layers, kv_heads_of(config), head_dim_of(config))
        super().__init__(config, "model", model, model.embed_tokens, kv,
                         hidden_size=config.hidden_size, tie_default=False,
                         stacked=QKV_STACKED + GATE_UP_STACKED)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama plus an optional sliding window on every layer (from the config)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5: biases on q/k/v; sliding window per layer where enabled."""

    variant = LlamaVariant(qkv_bias=True)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: per-head RMSNorm on q and k; ``attention_bias`` from the config."""

    variant = LlamaVariant(qk_norm=True)
