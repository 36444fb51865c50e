"""Llama-family decoders: Llama 2/3, Mistral, Qwen2, Qwen3 (one architecture, config flags).

    embed -> N x [x += attn(norm(x)); x += mlp(norm(x))] -> norm -> lm_head (maybe tied)

Differences between the families are flags, read from the HF config:
  - Qwen2: bias on q/k/v (``LlamaVariant.qkv_bias``); Llama: ``attention_bias`` / ``mlp_bias``,
    or heron's ``qkv_bias`` (a GGUF of a llamafied Qwen: biases on q/k/v only).
  - Qwen3: RMSNorm over each head of q and k before RoPE (``LlamaVariant.qk_norm``).
  - Mistral / Qwen2 / Qwen3: a sliding window where the config enables it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from heron.layers.attention import Attention, ForwardContext
from heron.layers.linear import Embedding, Linear, MergedLinear
from heron.layers.mlp import GatedMLP
from heron.layers.norm import HeadNorms, RMSNorm, add_rms_norm
from heron.layers.rotary import RotaryEmbedding, norm_and_rotate, rope_parameters
from heron.models.base import GATE_UP_STACKED, QKV_STACKED, CausalLM, KVShape
from heron.models.fused_decode import (
    DecoderLayer,
    DecoderStack,
    FusedDecode,
    describe_stack,
    next_norms,
)

CosSin = tuple[torch.Tensor, torch.Tensor]
ROPE_KEY = "default"  # the one RoPE table, as the fused decode step names it


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
    """Fused q/k/v projection, optional per-head q/k norm, RoPE, paged attention, output proj.
    q and k are normalised (Qwen3) and rotated in one call over their adjacent heads."""

    def __init__(self, config: Any, variant: LlamaVariant, layer_idx: int,
                 sliding_window: int | None) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = kv_heads_of(config)
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = bias or variant.qkv_bias or bool(getattr(config, "qkv_bias", False))
        self.qkv_proj = MergedLinear(config.hidden_size, [q_size, kv_size, kv_size], bias=qkv_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=bias)
        self.eps = config.rms_norm_eps
        self.head_norms: HeadNorms | None = None
        if variant.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, self.eps)
            self.k_norm = RMSNorm(self.head_dim, self.eps)
            self.head_norms = HeadNorms(self.q_norm, self.k_norm, self.num_heads, self.num_kv_heads)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, layer_idx,
                              sliding_window=sliding_window)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cos_sin: CosSin,
                ctx: ForwardContext) -> torch.Tensor:
        num_tokens, heads = x.shape[0], self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) * D]: q heads, k heads, v heads side by side
        qk = qkv[:, :heads * self.head_dim].view(num_tokens, heads, self.head_dim)  # [T, H + Hkv, D]
        v = qkv[:, heads * self.head_dim:]  # [T, Hkv * D]
        scale = None if self.head_norms is None else self.head_norms.scale()
        qk = norm_and_rotate(qk, scale, self.eps, rope, cos_sin, unit_offset=False)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        return self.o_proj(self.attn(q.flatten(1), k.flatten(1), v, ctx))  # [T, hidden]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: attention then MLP, each added to the residual stream.

    The layer takes the residual stream ``x`` and ``input_layernorm(x)`` already computed, and
    returns its new stream with ``next_norm`` of it (the next layer's input norm, or the final
    norm): every "add the sublayer's output, normalise" is one ``add_rms_norm`` call.
    """

    def __init__(self, config: Any, variant: LlamaVariant, layer_idx: int,
                 sliding_window: int | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, variant, layer_idx, sliding_window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            bias=bool(getattr(config, "mlp_bias", False)))

    def forward(self, x: torch.Tensor, normed: torch.Tensor, rope: RotaryEmbedding,
                cos_sin: CosSin, ctx: ForwardContext,
                next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        # x, normed: [T, hidden]; normed = input_layernorm(x)
        h = self.self_attn(normed, rope, cos_sin, ctx)
        x, normed = add_rms_norm(x, h, None, self.post_attention_layernorm)
        return add_rms_norm(x, self.mlp(normed), None, next_norm)

    def decoder_layer(self, next_norm: RMSNorm) -> DecoderLayer:
        attn, mlp = self.self_attn, self.mlp
        return DecoderLayer(
            qkv=attn.qkv_proj, o=attn.o_proj, gate_up=mlp.gate_up_proj, down=mlp.down_proj,
            attn=attn.attn, rope=ROPE_KEY,
            head_norms=None if attn.head_norms is None else attn.head_norms.scale(),
            post_attn=None, pre_ff=self.post_attention_layernorm, post_ff=None,
            next_norm=next_norm)


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
        self.fused_decode: FusedDecode | None = None  # set by CausalLM.prepare_decode

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        if self.fused_decode is not None and self.fused_decode.applies_to(x, ctx):
            return self.fused_decode(x, {ROPE_KEY: cos_sin}, ctx.attn_metadata)  # all layers
        layers = cast(Sequence[LlamaDecoderLayer], self.layers)
        x, normed = add_rms_norm(x, None, None, layers[0].input_layernorm)
        for layer, next_norm in zip(layers, next_norms(layers, self.norm), strict=True):
            x, normed = layer(x, normed, self.rotary, cos_sin, ctx, next_norm)
        return normed

    def decoder_stack(self) -> DecoderStack:
        """The layers by data, for the one-call decode step."""
        layers = cast(Sequence[LlamaDecoderLayer], self.layers)
        return describe_stack(layers, self.norm, {ROPE_KEY: self.rotary}, layers[0].mlp.act)


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


class Mistral3ForConditionalGeneration(MistralForCausalLM):
    """Mistral Small 3.1 / 3.2, vision-language checkpoints: their Mistral language model alone
    (the config's ``text_config``), which is the whole model for text; the vision weights are
    skipped."""

    def __init__(self, config: Any) -> None:
        text_config = config.get_text_config()
        if text_config.model_type != "mistral":
            raise ValueError(f"Mistral3ForConditionalGeneration with a {text_config.model_type!r} "
                             "text model is not supported; its text model must be 'mistral'")
        super().__init__(text_config)
        self.serve_text_only()
