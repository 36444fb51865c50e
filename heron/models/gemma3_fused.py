"""A decode step of a Gemma 3 stack as one compiled call (``heron/kernels/cpu/fused_decode.c``).

When every token of a step is a decode (the common case while requests generate), the model's
forward hands the embedded tokens to ``FusedDecode`` instead of running its layers as modules.
The C code calls the same kernels in the same order as the modules do, so the hidden states are
identical; what goes away is the ~20 Python and PyTorch operator calls per layer, each of which
runs from cold caches right after a projection has streamed its weights through them.

``FusedDecode.build`` returns None, and the modules keep serving, wherever the path does not
apply: not CPU bfloat16, a projection that is neither an int8 copy (``Q8Weight``) nor GGUF blocks
(``GGUFWeight``) or that has a bias, shapes the kernels do not take, or a kernel that did not
build. The C structures below mirror the structs of ``fused_decode.c`` field for field;
``build`` fills them once, from the model's weights and the runner's KV cache tensors, which
must stay in place from then on.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch

from heron.kernels.cpu import Elementwise, fused_decode
from heron.layers.activation import kernel_name
from heron.layers.attention import AttentionMetadata
from heron.layers.gguf_weight import GGUFWeight
from heron.layers.quant import Q8Weight

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _Matrix(ctypes.Structure):
    _fields_ = [("codes", _ptr), ("scales", _ptr), ("segments", _ptr), ("num_segments", _i64),
                ("exact", _i64), ("out_features", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Matrix), ("o", _Matrix), ("gate_up", _Matrix), ("down", _Matrix),
                ("qk_scale", _ptr), ("post_attn_scale", _ptr), ("pre_ff_scale", _ptr),
                ("post_ff_scale", _ptr), ("next_scale", _ptr), ("kv_cache", _ptr),
                ("sliding_window", _i64), ("rope", _i64)]


class _Model(ctypes.Structure):
    _fields_ = [("num_layers", _i64), ("hidden", _i64), ("num_heads", _i64), ("num_kv_heads", _i64),
                ("head_dim", _i64), ("intermediate", _i64), ("num_blocks", _i64),
                ("block_size", _i64), ("eps", _f32), ("attn_scale", _f32), ("activation", _i64),
                ("input_scale", _ptr), ("layers", ctypes.POINTER(_Layer))]


class _Batch(ctypes.Structure):
    _fields_ = [("num_tokens", _i64), ("x", _ptr), ("cos", _ptr * 2), ("sin", _ptr * 2),
                ("slots", _ptr), ("block_tables", _ptr), ("table_stride", _i64),
                ("seq_lens", _ptr), ("out", _ptr)]


class FusedDecode:
    """A Gemma 3 stack's weights and KV cache as the C kernel sees them; call it per decode step."""

    def __init__(self, fn: Any, model: _Model, rope_types: Sequence[str], max_rows: int,
                 keep_alive: list[object]) -> None:
        self._fn = fn
        self._model = model
        self._model_ref = ctypes.byref(model)
        self.rope_types = tuple(rope_types)  # which cos/sin table is index 0, 1
        self.max_rows = max_rows  # the smallest row limit of the int8 copies
        self._keep_alive = keep_alive  # tensors and structs the pointers above point into

    @classmethod
    def build(cls, model: Any, kv_caches: Sequence[torch.Tensor]) -> FusedDecode | None:
        """The fused path for ``model`` over ``kv_caches``, or None where it does not apply."""
        if not _applies(model, kv_caches):
            return None
        fn = fused_decode()
        if fn is None:
            return None
        rope_types = sorted(model.rotary.keys())
        keep: list[object] = []
        layers = (_Layer * len(model.layers))()
        norms = [layer.input_layernorm for layer in model.layers[1:]] + [model.norm]
        for i, (layer, next_norm) in enumerate(zip(model.layers, norms)):
            layers[i] = _layer_struct(layer, next_norm, kv_caches[i], rope_types, keep)
        first = model.layers[0]
        attn = first.self_attn
        cache_shape = kv_caches[0].shape  # [2, num_blocks, block_size, Hkv, D]
        struct = _Model(
            num_layers=len(model.layers), hidden=model.norm.weight.shape[0],
            num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim,
            intermediate=first.mlp.down_proj.in_features, num_blocks=cache_shape[1],
            block_size=cache_shape[2], eps=model.norm.eps, attn_scale=attn.attn.scale,
            activation=Elementwise.ACTIVATIONS.index(kernel_name(first.mlp.act)),
            input_scale=_kept(first.input_layernorm.scale(), keep), layers=layers)
        keep.append(layers)
        max_rows = min(p.quantized.max_rows for p in _projections(model))
        return cls(fn, struct, rope_types, max_rows, keep)

    def __call__(self, x: torch.Tensor, cos_sin: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 meta: AttentionMetadata) -> torch.Tensor:
        """x [B, hidden] bf16 (scaled embeddings, one token per request) -> final_norm of the last
        layer's output [B, hidden]; writes every layer's new K/V into the cache."""
        num_tokens = x.shape[0]
        out = torch.empty_like(x)
        tables, seq_lens = meta.decode_block_tables, meta.decode_seq_lens
        tables = tables if tables.is_contiguous() else tables.contiguous()
        rope = ([cos_sin[t] for t in self.rope_types] * 2)[:2]  # one table: both entries the same
        batch = _Batch(num_tokens=num_tokens, x=x.data_ptr(),
                       cos=(_ptr * 2)(rope[0][0].data_ptr(), rope[1][0].data_ptr()),
                       sin=(_ptr * 2)(rope[0][1].data_ptr(), rope[1][1].data_ptr()),
                       slots=meta.slot_mapping.data_ptr(), block_tables=tables.data_ptr(),
                       table_stride=tables.shape[1], seq_lens=seq_lens.data_ptr(), out=out.data_ptr())
        status = self._fn(self._model_ref, ctypes.byref(batch))
        if status:
            raise RuntimeError(f"fused_decode failed (status {status})")
        return out

    def applies_to(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this step can take the fused path: decodes only, within the row limit."""
        return meta.decode_only and x.shape[0] <= self.max_rows and x.is_contiguous()


def _projections(model: Any) -> list[Any]:
    return [p for layer in model.layers for p in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                 layer.mlp.gate_up_proj, layer.mlp.down_proj)]


def _applies(model: Any, kv_caches: Sequence[torch.Tensor]) -> bool:
    """The shapes, dtypes and weights the C kernels take (``model``: a Gemma 3 stack, read by
    attribute name)."""
    attn = model.layers[0].self_attn
    norms = [model.norm] + [n for layer in model.layers for n in (
        layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
        layer.post_feedforward_layernorm, layer.self_attn.q_norm, layer.self_attn.k_norm)]
    return (model.norm.weight.device.type == "cpu"
            and model.embed_tokens.weight.dtype == torch.bfloat16
            and all(c.dtype == torch.bfloat16 and c.is_contiguous() for c in kv_caches)
            and len(kv_caches) == len(model.layers) and 1 <= len(model.rotary) <= 2
            and all(r.rotary_dim == r.head_dim for r in model.rotary.values())
            and attn.head_dim % 32 == 0 and attn.head_dim <= 1024
            and attn.num_heads // attn.num_kv_heads <= 16 and model.norm.weight.shape[0] <= 16384
            and kernel_name(model.layers[0].mlp.act) is not None
            and all(n.unit_offset and n.eps == model.norm.eps for n in norms)
            and all(isinstance(p.quantized, (Q8Weight, GGUFWeight)) and p.bias is None
                    for p in _projections(model)))


def _kept(tensor: torch.Tensor, keep: list[object]) -> int:
    """The address of ``tensor``, which ``keep`` holds for as long as the struct lives."""
    keep.append(tensor)
    return tensor.data_ptr()


def _matrix(proj: Any, keep: list[object]) -> _Matrix:
    q = proj.quantized
    if isinstance(q, GGUFWeight):
        keep.append(q)  # its segment array and the file's rows it points into
        return _Matrix(segments=ctypes.addressof(q.segments), num_segments=len(q.segments),
                       exact=q.exact, out_features=proj.out_features)
    return _Matrix(codes=_kept(q.codes, keep), scales=_kept(q.scales, keep),
                   out_features=proj.out_features)


def _layer_struct(layer: Any, next_norm: Any, kv_cache: torch.Tensor, rope_types: list[str],
                  keep: list[object]) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    return _Layer(
        qkv=_matrix(attn.qkv_proj, keep), o=_matrix(attn.o_proj, keep),
        gate_up=_matrix(mlp.gate_up_proj, keep), down=_matrix(mlp.down_proj, keep),
        qk_scale=_kept(attn._qk_scale(), keep),
        post_attn_scale=_kept(layer.post_attention_layernorm.scale(), keep),
        pre_ff_scale=_kept(layer.pre_feedforward_layernorm.scale(), keep),
        post_ff_scale=_kept(layer.post_feedforward_layernorm.scale(), keep),
        next_scale=_kept(next_norm.scale(), keep), kv_cache=_kept(kv_cache, keep),
        sliding_window=attn.attn.sliding_window or 0, rope=rope_types.index(layer.layer_type))
