"""Gemma 3 text decoder (``Gemma3ForCausalLM``): the default model's architecture.

    x = embed(ids) * sqrt(hidden)
    per layer:  x += post_attn_norm(attn(input_norm(x)))
                x += post_ff_norm(mlp(pre_ff_norm(x)))
    logits = softcap(final_norm(x) @ embed.T)

Norms are Gemma RMSNorms (``x * (1 + w)``); q and k get a per-head norm before RoPE.
Layers are local (sliding window, RoPE base ``rope_local_base_freq``) or global (full
attention, ``rope_theta`` plus any scaling), as listed in ``config.layer_types``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
SLIDING, FULL = "sliding_attention", "full_attention"


def gemma3_layer_types(config: Any) -> list[str]:
    """``config.layer_types``, or the older every-Nth-layer-is-global pattern."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if len(layer_types) != config.num_hidden_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries for "
                             f"{config.num_hidden_layers} layers")
        return list(layer_types)
    pattern = getattr(config, "sliding_window_pattern", None) or 6
    return [SLIDING if (i + 1) % pattern else FULL for i in range(config.num_hidden_layers)]


def _check_supported(config: Any) -> None:
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError("Gemma 3 with attn_logit_softcapping is not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("Gemma 3 with use_bidirectional_attention is not supported")


class Gemma3Attention(nn.Module):
    """Fused q/k/v, per-head q/k Gemma norms, RoPE, paged attention (local or global)."""

    def __init__(self, config: Any, layer_idx: int, sliding_window: int | None) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = MergedLinear(config.hidden_size, [q_size, kv_size, kv_size], bias=bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=True)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=True)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, layer_idx,
                              scale=config.query_pre_attn_scalar ** -0.5,
                              sliding_window=sliding_window)
        self.head_norms = HeadNorms(self.q_norm, self.k_norm, self.num_heads, self.num_kv_heads)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cos_sin: CosSin,
                ctx: ForwardContext) -> torch.Tensor:
        num_tokens, heads = x.shape[0], self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) * D]: q heads, k heads, v heads side by side
        qk = qkv[:, :heads * self.head_dim].view(num_tokens, heads, self.head_dim)  # [T, H + Hkv, D]
        v = qkv[:, heads * self.head_dim:]  # [T, Hkv * D]
        # q and k get their own norm weights but one norm call and one rotation.
        qk = norm_and_rotate(qk, self.head_norms.scale(), self.q_norm.eps, rope, cos_sin)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        return self.o_proj(self.attn(q.flatten(1), k.flatten(1), v, ctx))  # [T, hidden]


class Gemma3DecoderLayer(nn.Module):
    """Sandwich-norm block: each sublayer's input and output are normalised.

    The layer takes the residual stream ``x`` and ``input_layernorm(x)`` already computed, and
    returns its new stream with ``next_norm`` of it (the next layer's input norm, or the final
    norm): every "add the sublayer's normalised output, normalise again" is one
    ``add_rms_norm`` call.
    """

    def __init__(self, config: Any, layer_idx: int, layer_type: str) -> None:
        super().__init__()
        self.layer_type = layer_type
        window = config.sliding_window if layer_type == SLIDING else None
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps, unit_offset=True)
        self.self_attn = Gemma3Attention(config, layer_idx, window)
        self.post_attention_layernorm = RMSNorm(hidden, eps, unit_offset=True)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps, unit_offset=True)
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_activation)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, unit_offset=True)

    def forward(self, x: torch.Tensor, normed: torch.Tensor, rope: RotaryEmbedding, cos_sin: CosSin,
                ctx: ForwardContext, next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        # x, normed: [T, hidden]; normed = input_layernorm(x)
        h = self.self_attn(normed, rope, cos_sin, ctx)
        x, normed = add_rms_norm(x, h, self.post_attention_layernorm, self.pre_feedforward_layernorm)
        h = self.mlp(normed)
        return add_rms_norm(x, h, self.post_feedforward_layernorm, next_norm)

    def decoder_layer(self, next_norm: RMSNorm) -> DecoderLayer:
        attn, mlp = self.self_attn, self.mlp
        return DecoderLayer(
            qkv=attn.qkv_proj, o=attn.o_proj, gate_up=mlp.gate_up_proj, down=mlp.down_proj,
            attn=attn.attn, rope=self.layer_type, head_norms=attn.head_norms.scale(),
            post_attn=self.post_attention_layernorm, pre_ff=self.pre_feedforward_layernorm,
            post_ff=self.post_feedforward_layernorm, next_norm=next_norm)


class Gemma3TextModel(nn.Module):
    """Scaled embedding, decoder layers, final norm; one RoPE table per layer type."""

    embed_scale: torch.Tensor  # [] buffer in the model dtype

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        # HF multiplies by sqrt(hidden) rounded to the model dtype; a buffer follows that dtype.
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5), persistent=False)
        self.layer_types = gemma3_layer_types(config)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i, t)
                                    for i, t in enumerate(self.layer_types))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)
        max_pos = getattr(config, "max_position_embeddings", None)
        self.rotary = nn.ModuleDict({
            t: RotaryEmbedding(config.head_dim, rope_parameters(config, t), max_pos)
            for t in sorted(set(self.layer_types))})
        self.fused_decode: FusedDecode | None = None  # set by CausalLM.prepare_decode

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        x = x * self.embed_scale.to(x.dtype)
        rotary = cast(Mapping[str, RotaryEmbedding], self.rotary)
        cos_sin = {t: rope.cos_sin(positions, x.dtype) for t, rope in rotary.items()}
        if self.fused_decode is not None and self.fused_decode.applies_to(x, ctx):
            return self.fused_decode(x, cos_sin, ctx.attn_metadata)  # the layers below in one call
        layers = cast(Sequence[Gemma3DecoderLayer], self.layers)
        x, normed = add_rms_norm(x, None, None, layers[0].input_layernorm)
        for layer, next_norm in zip(layers, next_norms(layers, self.norm), strict=True):
            t = layer.layer_type
            x, normed = layer(x, normed, rotary[t], cos_sin[t], ctx, next_norm)
        return normed

    def decoder_stack(self) -> DecoderStack:
        """The layers by data, for the one-call decode step."""
        layers = cast(Sequence[Gemma3DecoderLayer], self.layers)
        return describe_stack(layers, self.norm, cast(Mapping[str, RotaryEmbedding], self.rotary),
                              layers[0].mlp.act)


class Gemma3ForCausalLM(CausalLM):
    """Gemma 3 text-only causal LM; the LM head is tied to the embedding unless the config says not."""

    def __init__(self, config: Any) -> None:
        _check_supported(config)
        model = Gemma3TextModel(config)
        kv = KVShape(config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
        super().__init__(config, "model", model, model.embed_tokens, kv,
                         hidden_size=config.hidden_size, tie_default=True,
                         stacked=QKV_STACKED + GATE_UP_STACKED,
                         softcap=getattr(config, "final_logit_softcapping", None))


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """Gemma 3 4B / 12B / 27B, vision-language checkpoints: their language model alone (the
    config's ``text_config``), which is the whole model for text; the vision weights are skipped."""

    def __init__(self, config: Any) -> None:
        super().__init__(config.get_text_config())
        self.serve_text_only()
