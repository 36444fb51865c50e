"""A decode step of a whole decoder stack as one compiled call (``heron/kernels/cpu/fused_decode.c``).

When every token of a step is a decode (the common case while requests generate), a model's
forward hands the embedded tokens to ``FusedDecode`` instead of running its layers as modules.
The C code calls the same kernels in the same order as the modules do, so the hidden states are
identical; what goes away is the ~20 Python and PyTorch operator calls per layer, each of which
runs from cold caches right after a projection has streamed its weights through them.

A model describes its layers by data (``DecoderStack``: which norms sit where and how they
round, q/k norms, a q/k/v bias, RoPE tables, sliding windows, the attention scale, the MLP's
activation), so Llama, Mistral, Qwen2, Qwen3 and Gemma 3 share this one path; each model file
says how its modules map onto it (``decoder_stack``).

``FusedDecode.build`` returns None, and the modules keep serving, wherever the path does not
apply: not CPU bfloat16, a projection that is neither an int8 copy (``Q8Weight``) nor GGUF blocks
(``GGUFWeight``), a bias other than the q/k/v one, shapes the kernels do not take, or a kernel
that did not build. The C structures below mirror the structs of ``fused_decode.c`` field for
field; ``build`` fills them once, from the model's weights and the runner's KV cache tensors,
which must stay in place from then on.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from heron.kernels.cpu import Elementwise, fused_decode
from heron.layers.activation import Activation, kernel_name
from heron.layers.attention import Attention, AttentionMetadata, ForwardContext
from heron.layers.gguf_weight import GGUFWeight
from heron.layers.linear import Linear
from heron.layers.norm import RMSNorm
from heron.layers.quant import Q8Weight
from heron.layers.rotary import RotaryEmbedding

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer as the fused step runs it, for the layer's input ``n = norm(x)``:

        qkv = n @ Wqkv^T (+ qkv_bias); q, k = rope(head_norm(q), head_norm(k))
        x = x + post_attn(o_proj(attention(q, cache)));     n = pre_ff(x)
        x = x + post_ff(down(act(gate(n)) * up(n)));        n = next_norm(x)

    A norm that is None is not there (Llama has no post norms; ``head_norms`` None: no q/k norm).
    """

    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    attn: Attention
    rope: str  # the key of this layer's RoPE table in ``DecoderStack.rotary``
    head_norms: torch.Tensor | None  # [H + Hkv, D] float32 multipliers, q heads first
    post_attn: RMSNorm | None
    pre_ff: RMSNorm
    post_ff: RMSNorm | None
    next_norm: RMSNorm  # the next layer's input norm, or the stack's final norm


@dataclass(frozen=True)
class DecoderStack:
    """A model's decoder layers by data; the fused step computes ``final_norm(layers(x))``."""

    layers: Sequence[DecoderLayer]
    input_norm: RMSNorm  # the first layer's
    rotary: Mapping[str, RotaryEmbedding]
    activation: Activation  # the MLP's, applied to gate before the product with up

    def norms(self) -> list[RMSNorm]:
        return [self.input_norm] + [n for layer in self.layers for n in (
            layer.post_attn, layer.pre_ff, layer.post_ff, layer.next_norm) if n is not None]

    def projections(self) -> list[Linear]:
        return [p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]


class DescribedLayer(Protocol):
    """A model's decoder layer that says what it is (``decoder_layer``)."""

    input_layernorm: RMSNorm

    def decoder_layer(self, next_norm: RMSNorm) -> DecoderLayer: ...


def next_norms(layers: Sequence[DescribedLayer], final_norm: RMSNorm) -> list[RMSNorm]:
    """What follows each layer: the next layer's input norm, the final norm after the last."""
    return [layer.input_layernorm for layer in layers[1:]] + [final_norm]


def describe_stack(layers: Sequence[DescribedLayer], final_norm: RMSNorm,
                   rotary: Mapping[str, RotaryEmbedding], activation: Activation) -> DecoderStack:
    """A stack of described layers, for ``FusedDecode.build``."""
    return DecoderStack(
        layers=[layer.decoder_layer(n) for layer, n in zip(layers, next_norms(layers, final_norm))],
        input_norm=layers[0].input_layernorm, rotary=rotary, activation=activation)


class _Matrix(ctypes.Structure):
    _fields_ = [("codes", _ptr), ("scales", _ptr), ("segments", _ptr), ("num_segments", _i64),
                ("exact", _i64), ("out_features", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Matrix), ("o", _Matrix), ("gate_up", _Matrix), ("down", _Matrix),
                ("qkv_bias", _ptr), ("qk_scale", _ptr), ("post_attn_scale", _ptr),
                ("pre_ff_scale", _ptr), ("post_ff_scale", _ptr), ("next_scale", _ptr),
                ("kv_cache", _ptr), ("sliding_window", _i64), ("rope", _i64), ("attn_scale", _f32)]


class _Model(ctypes.Structure):
    _fields_ = [("num_layers", _i64), ("hidden", _i64), ("num_heads", _i64), ("num_kv_heads", _i64),
                ("head_dim", _i64), ("intermediate", _i64), ("num_blocks", _i64),
                ("block_size", _i64), ("eps", _f32), ("unit_offset", _i64), ("activation", _i64),
                ("input_scale", _ptr), ("layers", ctypes.POINTER(_Layer))]


class _Batch(ctypes.Structure):
    _fields_ = [("num_tokens", _i64), ("x", _ptr), ("cos", _ptr * 2), ("sin", _ptr * 2),
                ("slots", _ptr), ("block_tables", _ptr), ("table_stride", _i64),
                ("seq_lens", _ptr), ("out", _ptr)]


CosSinTables = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


class FusedDecode:
    """A decoder stack's weights and KV cache as the C kernel sees them; call it per decode step."""

    def __init__(self, fn: Any, model: _Model, rope_keys: Sequence[str], max_rows: int,
                 keep_alive: list[object]) -> None:
        self._fn = fn
        self._model = model
        self._model_ref = ctypes.byref(model)
        self.rope_keys = tuple(rope_keys)  # which cos/sin table is index 0, 1
        self.max_rows = max_rows  # the smallest row limit of the int8 copies
        self._keep_alive = keep_alive  # tensors and structs the pointers above point into

    @classmethod
    def build(cls, stack: DecoderStack, kv_caches: Sequence[torch.Tensor]) -> FusedDecode | None:
        """The fused path for ``stack`` over ``kv_caches``, or None where it does not apply."""
        if not _applies(stack, kv_caches):
            return None
        fn = fused_decode()
        if fn is None:
            return None
        rope_keys = sorted(stack.rotary.keys())
        keep: list[object] = []
        layers = (_Layer * len(stack.layers))()
        for i, layer in enumerate(stack.layers):
            layers[i] = _layer_struct(layer, kv_caches[i], rope_keys, keep)
        first = stack.layers[0]
        cache_shape = kv_caches[0].shape  # [2, num_blocks, block_size, Hkv, D]
        struct = _Model(
            num_layers=len(stack.layers), hidden=stack.input_norm.weight.shape[0],
            num_heads=first.attn.num_heads, num_kv_heads=first.attn.num_kv_heads,
            head_dim=first.attn.head_dim, intermediate=first.down.in_features,
            num_blocks=cache_shape[1], block_size=cache_shape[2], eps=stack.input_norm.eps,
            unit_offset=int(stack.input_norm.unit_offset),
            activation=Elementwise.ACTIVATIONS.index(kernel_name(stack.activation)),
            input_scale=_kept(stack.input_norm.scale(), keep), layers=layers)
        keep.append(layers)
        max_rows = min(_quantized(p).max_rows for p in stack.projections())
        return cls(fn, struct, rope_keys, max_rows, keep)

    def __call__(self, x: torch.Tensor, cos_sin: CosSinTables,
                 meta: AttentionMetadata) -> torch.Tensor:
        """x [B, hidden] bf16 (embedded tokens, one per request) -> final_norm of the last
        layer's output [B, hidden]; writes every layer's new K/V into the cache."""
        num_tokens = x.shape[0]
        out = torch.empty_like(x)
        tables, seq_lens = meta.decode_block_tables, meta.decode_seq_lens
        tables = tables if tables.is_contiguous() else tables.contiguous()
        rope = ([cos_sin[key] for key in self.rope_keys] * 2)[:2]  # one table: both the same
        batch = _Batch(num_tokens=num_tokens, x=x.data_ptr(),
                       cos=(_ptr * 2)(rope[0][0].data_ptr(), rope[1][0].data_ptr()),
                       sin=(_ptr * 2)(rope[0][1].data_ptr(), rope[1][1].data_ptr()),
                       slots=meta.slot_mapping.data_ptr(), block_tables=tables.data_ptr(),
                       table_stride=tables.shape[1], seq_lens=seq_lens.data_ptr(), out=out.data_ptr())
        status = self._fn(self._model_ref, ctypes.byref(batch))
        if status:
            raise RuntimeError(f"fused_decode failed (status {status})")
        return out

    def applies_to(self, x: torch.Tensor, ctx: ForwardContext) -> bool:
        """Whether this step can take the fused path: decodes only, within the row limit, and
        no row with a LoRA adapter (the C step runs the base projections only)."""
        return (ctx.attn_metadata.decode_only and ctx.lora is None
                and x.shape[0] <= self.max_rows and x.is_contiguous())


def _applies(stack: DecoderStack, kv_caches: Sequence[torch.Tensor]) -> bool:
    """The shapes, dtypes and weights the C kernels take."""
    first = stack.layers[0].attn
    norms = stack.norms()
    hidden = stack.input_norm.weight.shape[0]
    same_shape = all((layer.attn.num_heads, layer.attn.num_kv_heads, layer.attn.head_dim,
                      layer.down.in_features) == (first.num_heads, first.num_kv_heads,
                                                  first.head_dim, stack.layers[0].down.in_features)
                     for layer in stack.layers)
    return (stack.input_norm.weight.device.type == "cpu"
            and stack.input_norm.weight.dtype == torch.bfloat16
            and all(c.dtype == torch.bfloat16 and c.is_contiguous() for c in kv_caches)
            and len(kv_caches) == len(stack.layers) and 1 <= len(stack.rotary) <= 2 and same_shape
            and all(r.rotary_dim == r.head_dim == first.head_dim for r in stack.rotary.values())
            and first.head_dim % 32 == 0 and first.head_dim <= 1024
            and first.alibi_slopes is None
            and first.num_heads // first.num_kv_heads <= 16 and hidden <= 16384
            and kernel_name(stack.activation) is not None
            and all(n.unit_offset == stack.input_norm.unit_offset and n.eps == stack.input_norm.eps
                    for n in norms)
            and all(_bias_ok(layer) for layer in stack.layers)
            and all(isinstance(p.quantized, (Q8Weight, GGUFWeight)) for p in stack.projections()))


def _bias_ok(layer: DecoderLayer) -> bool:
    """No bias but the q/k/v one, and that one in bf16 (as the module path adds it)."""
    bias = layer.qkv.bias
    return (layer.o.bias is None and layer.gate_up.bias is None and layer.down.bias is None
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous())))


def _kept(tensor: torch.Tensor | None, keep: list[object]) -> int | None:
    """The address of ``tensor`` (None: NULL), which ``keep`` holds while the struct lives."""
    if tensor is None:
        return None
    keep.append(tensor)
    return tensor.data_ptr()


def _scale(norm: RMSNorm | None, keep: list[object]) -> int | None:
    return None if norm is None else _kept(norm.scale(), keep)


def _quantized(proj: Linear) -> Q8Weight | GGUFWeight:
    q = proj.quantized
    assert isinstance(q, (Q8Weight, GGUFWeight)), "checked by _applies"
    return q


def _matrix(proj: Linear, keep: list[object]) -> _Matrix:
    q = _quantized(proj)
    if isinstance(q, GGUFWeight):
        keep.append(q)  # its segment array and the file's rows it points into
        return _Matrix(segments=ctypes.addressof(q.segments), num_segments=len(q.segments),
                       exact=q.exact, out_features=proj.out_features)
    return _Matrix(codes=_kept(q.codes, keep), scales=_kept(q.scales, keep),
                   out_features=proj.out_features)


def _layer_struct(layer: DecoderLayer, kv_cache: torch.Tensor, rope_keys: list[str],
                  keep: list[object]) -> _Layer:
    return _Layer(
        qkv=_matrix(layer.qkv, keep), o=_matrix(layer.o, keep),
        gate_up=_matrix(layer.gate_up, keep), down=_matrix(layer.down, keep),
        qkv_bias=_kept(layer.qkv.bias, keep), qk_scale=_kept(layer.head_norms, keep),
        post_attn_scale=_scale(layer.post_attn, keep), pre_ff_scale=_scale(layer.pre_ff, keep),
        post_ff_scale=_scale(layer.post_ff, keep), next_scale=_scale(layer.next_norm, keep),
        kv_cache=_kept(kv_cache, keep), sliding_window=layer.attn.sliding_window or 0,
        rope=rope_keys.index(layer.rope), attn_scale=layer.attn.scale)
