"""Rotary position embeddings (RoPE), "rotate half" layout as in Hugging Face checkpoints.

For a head vector split into halves ``x = [x1 | x2]`` and angle ``pos * inv_freq``::

    rope(x) = [x1 * cos - x2 * sin | x2 * cos + x1 * sin]

``rope_type`` variants only change ``inv_freq`` (and, for YaRN, scale cos/sin):
default, linear, llama3, yarn. Parameters are read from the HF config in either the
transformers 5 form (``config.rope_parameters``, possibly per layer type) or the 4.x
form (``rope_theta`` + ``rope_scaling``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from heron.layers.norm import cpu_kernel_for, rms_norm_heads

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# The types whose original_max_position_embeddings a top-level config field of that name
# overrides, as transformers' standardize_rope_params does.
_PRETRAINED_LENGTH_TYPES = ("llama3", "yarn", "longrope")


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The RoPE parameters of ``config`` (for ``layer_type`` where they differ per layer type)."""
    params = getattr(config, "rope_parameters", None)
    if params:
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            params = params[layer_type]
        out = dict(params)
    else:  # transformers 4.x: rope_theta + rope_scaling (+ Gemma 3's rope_local_base_freq)
        if layer_type == "sliding_attention" and hasattr(config, "rope_local_base_freq"):
            return {"rope_type": "default", "rope_theta": float(config.rope_local_base_freq)}
        out = dict(getattr(config, "rope_scaling", None) or {})
        out.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    out["rope_type"] = out.get("rope_type", out.get("type", "default"))
    if "partial_rotary_factor" not in out and getattr(config, "partial_rotary_factor", None):
        out["partial_rotary_factor"] = config.partial_rotary_factor
    top_level = getattr(config, "original_max_position_embeddings", None)
    if top_level is not None and out["rope_type"] in _PRETRAINED_LENGTH_TYPES:
        out["original_max_position_embeddings"] = top_level  # transformers: it wins (Phi-3 style)
    out.setdefault("original_max_position_embeddings",
                   top_level or getattr(config, "max_position_embeddings", None))
    return out


def yarn_context_length(config: Any) -> int | None:
    """The context YaRN stretches the RoPE of ``config`` to: ``original_max_position_embeddings
    x factor`` (the largest over its layer types), None without YaRN. Qwen2.5 / Qwen3 enable
    YaRN with ``max_position_embeddings`` left at the pre-trained length (32768), so that field
    alone would cap their context at a quarter of what the scaling is for."""
    layer_types = getattr(config, "layer_types", None) or []
    lengths = []
    for layer_type in {None, *layer_types}:
        params = rope_parameters(config, layer_type)
        if params["rope_type"] == "yarn" and params.get("original_max_position_embeddings"):
            original = params["original_max_position_embeddings"]
            factor = params.get("factor") or config.max_position_embeddings / original
            lengths.append(int(original * factor))
    return max(lengths, default=None)


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    """[dim // 2] float32: ``base ** (-2i / dim)``."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (base ** exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, a smooth ramp between the bands."""
    factor, old_len = params["factor"], params["original_max_position_embeddings"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(base: float, dim: int, params: dict[str, Any],
                   max_positions: int | None) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; scale cos/sin."""
    old_len = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_positions / old_len
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = _base_inv_freq(base, dim)
    keep = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    inv_freq = extrapolation / factor * (1 - keep) + extrapolation * keep
    return inv_freq, float(attention_factor)


def compute_inv_freq(params: dict[str, Any], rotary_dim: int,
                     max_positions: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2] float32, cos/sin scale) for one set of RoPE parameters."""
    rope_type, base = params["rope_type"], float(params["rope_theta"])
    if rope_type == "default":
        return _base_inv_freq(base, rotary_dim), 1.0
    if rope_type == "linear":
        return _base_inv_freq(base, rotary_dim) / params["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(_base_inv_freq(base, rotary_dim), params), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(base, rotary_dim, params, max_positions)
    raise ValueError(f"RoPE scaling rope_type {rope_type!r} (the config's rope_scaling / "
                     f"rope_parameters) is not supported; supported: "
                     f"{', '.join(SUPPORTED_ROPE_TYPES)}")


TABLE_STEP = 1024  # RotaryEmbedding's cos / sin tables grow by this many positions at a time


def _max_position(positions: torch.Tensor) -> int:
    return int(positions.max()) if positions.numel() else -1


def _table_size(positions: torch.Tensor) -> int:
    """Positions 0 .. the largest in ``positions``, rounded up to a multiple of TABLE_STEP."""
    return (_max_position(positions) // TABLE_STEP + 1) * TABLE_STEP


class RotaryEmbedding(nn.Module):
    """RoPE for one set of parameters. ``cos_sin(positions)`` once per step, ``apply`` per layer."""

    def __init__(self, head_dim: int, params: dict[str, Any], max_positions: int | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq, self.scaling = compute_inv_freq(params, self.rotary_dim, max_positions)
        # A plain attribute, not a buffer: it must stay float32 whatever dtype the model is cast to.
        self._inv_freq = inv_freq  # [rotary_dim // 2]
        self._tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, rotary_dim // 2] in ``dtype``.

        Looked up in tables of the positions seen so far (grown in steps of ``TABLE_STEP``
        positions; an elementwise computation, so the same values as computing them for these
        positions alone). Per decode step that is two indexing calls instead of seven tensor
        operations, each of which, after the weights stream through the caches, runs from cold
        code: in a served c=1 run these took 3-4 % of the engine's time, the lookups 0.2 %
        (py-spy). Memory: 2 x positions x rotary_dim / 2 values, e.g. 16 MiB in bf16 for 32K
        positions at a head dim of 256, about 1 % of what the KV cache of those positions takes."""
        key = (dtype, positions.device)
        if key in self._tables:
            cos, sin = self._tables[key]
            if positions.device.type == "cpu":  # no extra call: CPU indexing raises past the end
                try:
                    return cos[positions][:, None, :], sin[positions][:, None, :]
                except IndexError:  # a position past the tables: grow them
                    pass
            elif _max_position(positions) < cos.shape[0]:  # on CUDA it would be a device assert
                return cos[positions][:, None, :], sin[positions][:, None, :]
        cos, sin = self._tables[key] = self._compute(_table_size(positions), dtype, positions.device)
        return cos[positions][:, None, :], sin[positions][:, None, :]

    def _compute(self, size: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [size, rotary_dim // 2] in ``dtype`` for positions 0 .. size - 1."""
        inv_freq = self._inv_freq.to(device)
        angles = torch.arange(size, device=device)[:, None].float() * inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos.to(dtype), sin.to(dtype)

    def rotate(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, num_heads, head_dim] -> rotated copy of the same shape."""
        if self.rotary_dim == self.head_dim:
            return _rotate(x, *cos_sin)
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        return torch.cat((_rotate(rot, *cos_sin), rest), dim=-1)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, scaling={self.scaling}"


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, R]; cos, sin: [T, 1, R / 2]
    x1, x2 = x.chunk(2, dim=-1)  # [T, H, R / 2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def norm_and_rotate(x: torch.Tensor, scale: torch.Tensor | None, eps: float,
                    rope: RotaryEmbedding, cos_sin: tuple[torch.Tensor, torch.Tensor],
                    unit_offset: bool = True) -> torch.Tensor:
    """Per-head RMS norm (``rms_norm_heads``; ``scale`` None: none), then ``rope.rotate``: the
    q/k path of every decoder, q and k heads side by side in ``x``.
    x [T, heads, D] -> [T, heads, D]; one compiled call on CPU in bfloat16."""
    kernel = cpu_kernel_for(x)
    cos, sin = cos_sin
    if (kernel is not None and rope.rotary_dim == rope.head_dim == x.shape[-1] and x.stride(2) == 1
            and x.stride(1) == x.shape[2] and cos.dtype == torch.bfloat16 and cos.is_contiguous()
            and sin.is_contiguous()):
        return kernel.qk_norm_rope(x, scale, eps, cos, sin, unit_offset)
    if scale is not None:
        x = rms_norm_heads(x, scale, eps, unit_offset)
    return rope.rotate(x, cos_sin)
