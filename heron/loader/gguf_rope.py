"""RoPE scaling of a GGUF file, in Hugging Face terms (``rope_scaling`` of the config).

llama.cpp's converter keeps a model's RoPE scaling in two ways, both of which transformers'
GGUF path ignores for the families heron serves (the model then rotates like an unscaled one):

- linear and YaRN: metadata ``{arch}.rope.scaling.type`` / ``.factor`` /
  ``.original_context_length`` / ``.yarn_attn_factor`` / ``.yarn_beta_fast`` / ``.yarn_beta_slow``,
  mapped back to the HF keys they came from;
- Llama 3.1 / 3.2 ("llama3"): no metadata, but a tensor ``rope_freqs.weight`` that holds, per
  frequency, the divisor the scaling applies::

      divisor_i = 1                            wavelength_i < original / high_freq_factor
                = factor                       wavelength_i > original / low_freq_factor
                = 1 / ((1 - s) / factor + s)   between,
      s = (original / wavelength_i - low_freq_factor) / (high_freq_factor - low_freq_factor)

  The HF parameters are read back from the divisors: ``factor`` is the largest, and with
  ``low_freq_factor = 1``, ``high_freq_factor = 4`` (every Llama 3.x release; only the ratios
  to ``original`` matter) each divisor between 1 and ``factor`` gives ``original``. The
  parameters found must give back every stored divisor (else ValueError), so the model served
  rotates exactly as the file says, and its config equals the original's.

Gemma 3's sliding layers take their own base (``{arch}.rope.freq_base_swa``, default 10000).
"""

from __future__ import annotations

import math
from typing import Any

import gguf
import numpy as np

from heron.loader.gguf_file import GGUFFile

ROPE_FREQS_TENSOR = "rope_freqs.weight"
_LLAMA3_LOW, _LLAMA3_HIGH = 1.0, 4.0
_LLAMA3_DEFAULT_ORIGINAL = 8192  # when no divisor lies between the bands, any original fits
_RTOL = 1e-5  # stored float32 divisors vs the ones the parameters found give
# GGUF rope.scaling key suffix -> HF rope_scaling key (linear / YaRN)
_SCALING_KEYS = {"factor": "factor", "original_context_length": "original_max_position_embeddings",
                 "yarn_attn_factor": "attention_factor", "yarn_beta_fast": "beta_fast",
                 "yarn_beta_slow": "beta_slow"}


def rope_config(gguf_file: GGUFFile, config: dict[str, Any]) -> dict[str, Any]:
    """Config entries for the file's RoPE scaling: ``rope_scaling`` and, for Gemma 3,
    ``rope_local_base_freq``; empty when the file rotates plainly."""
    arch = gguf_file.architecture
    out: dict[str, Any] = {}
    scaling = _metadata_scaling(gguf_file.metadata, arch) or _llama3_scaling(gguf_file, config)
    if scaling is not None:
        out["rope_scaling"] = scaling
    swa_base = gguf_file.metadata.get(f"{arch}.rope.freq_base_swa")
    if swa_base is not None:
        out["rope_local_base_freq"] = float(swa_base)
    return out


def _metadata_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"GGUF RoPE scaling {kind!r} is not supported (linear, yarn, llama3)")
    scaling: dict[str, Any] = {"rope_type": kind}
    for suffix, key in _SCALING_KEYS.items():
        value = metadata.get(f"{arch}.rope.scaling.{suffix}")
        if value is not None:
            scaling[key] = value
    if "factor" not in scaling:
        raise ValueError(f"GGUF RoPE scaling {kind!r} without {arch}.rope.scaling.factor")
    return scaling


def _llama3_scaling(gguf_file: GGUFFile, config: dict[str, Any]) -> dict[str, Any] | None:
    info = next((t for t in gguf_file.tensors if t.name == ROPE_FREQS_TENSOR), None)
    if info is None:
        return None
    divisors = _read_float32(gguf_file, info)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return llama3_from_divisors(divisors, float(config.get("rope_theta", 10000.0)), int(head_dim))


def _read_float32(gguf_file: GGUFFile, info: Any) -> np.ndarray:
    if info.ggml_type == gguf.GGMLQuantizationType.F32:
        return np.fromfile(gguf_file.path, dtype="<f4", count=info.nbytes // 4, offset=info.offset)
    return gguf_file.dequantized(info).numpy()


def llama3_from_divisors(divisors: np.ndarray, base: float, head_dim: int) -> dict[str, Any] | None:
    """The llama3 ``rope_scaling`` whose per-frequency divisors are ``divisors`` (see the module
    docstring); None when they are all 1."""
    divisors = divisors.astype(np.float64)
    if divisors.shape != (head_dim // 2,):
        raise ValueError(f"{ROPE_FREQS_TENSOR} has shape {divisors.shape}, expected "
                         f"({head_dim // 2},) for head size {head_dim}")
    if np.all(divisors == 1.0):
        return None
    factor = float(divisors.max())
    wavelength = _wavelengths(base, head_dim)
    medium = (divisors > 1.0 + _RTOL) & (divisors < factor * (1 - _RTOL))
    original = _LLAMA3_DEFAULT_ORIGINAL
    if medium.any():
        smooth = (1 / divisors[medium] - 1 / factor) / (1 - 1 / factor)
        originals = wavelength[medium] * (_LLAMA3_LOW + (_LLAMA3_HIGH - _LLAMA3_LOW) * smooth)
        original = int(round(float(np.median(originals))))
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": _LLAMA3_LOW,
               "high_freq_factor": _LLAMA3_HIGH, "original_max_position_embeddings": original}
    expected = llama3_divisors(scaling, base, head_dim)
    if not np.allclose(expected, divisors, rtol=_RTOL, atol=0.0):
        raise ValueError(f"{ROPE_FREQS_TENSOR} does not hold llama3 RoPE scaling (closest: "
                         f"{scaling}); heron cannot serve this file's RoPE")
    return scaling


def llama3_divisors(scaling: dict[str, Any], base: float, head_dim: int) -> np.ndarray:
    """[head_dim // 2] float64: what llama.cpp's converter stores as ``rope_freqs`` for these
    llama3 parameters."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = _wavelengths(base, head_dim)
    smooth = (original / wavelength - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < original / high, 1.0,
                    np.where(wavelength > original / low, factor, between))


def _wavelengths(base: float, head_dim: int) -> np.ndarray:
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return 2 * math.pi * base ** exponents
