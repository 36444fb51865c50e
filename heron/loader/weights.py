"""The generic weight loader: Hugging Face tensor names in, a model's parameters filled.

A model file declares only a ``WeightMapping`` (as its ``weight_mapping`` attribute): which
checkpoint prefixes it renames (``language_model.model.`` -> ``model.``), which checkpoint
modules it fuses (``q_proj``/``k_proj``/``v_proj`` -> shards of ``qkv_proj``) and which
checkpoint tensors it does not use. Every other tensor name must equal a parameter name.

    checkpoint                                   model
    model.layers.0.self_attn.q_proj.weight  ->  model.layers.0.self_attn.qkv_proj.weight, shard 0
    model.layers.0.self_attn.k_proj.weight  ->  model.layers.0.self_attn.qkv_proj.weight, shard 1
    model.norm.weight                       ->  model.norm.weight
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from heron.layers.linear import MergedLinear
from heron.models.base import WeightMapping

# Never weights: the rotary tables some older checkpoints carry.
_ALWAYS_IGNORED = (r"\.inv_freq$",)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 provided: Iterable[str] = ()) -> None:
    """Copy HF-named tensors into ``model`` (casting dtype and device); ``provided`` names
    parameters that are in place already (a GGUF file's blocks, ``gguf_native``).

    Raises ValueError on an unexpected name, a shape mismatch, a tensor given twice, or a
    parameter (or shard of a fused one) that the checkpoint never provided.
    """
    mapping: WeightMapping = getattr(model, "weight_mapping", WeightMapping())
    ignored = re.compile("|".join(_ALWAYS_IGNORED + mapping.ignored))
    params = dict(model.named_parameters())
    loaded: set[tuple[str, int | None]] = {(name, None) for name in provided}
    with torch.no_grad():
        for name, tensor in weights:
            renamed = mapping.renamed(name)  # a vision-language checkpoint's language model
            if ignored.search(renamed):
                continue
            param_name, shard = resolve(renamed, mapping)
            if param_name not in params:
                raise ValueError(f"unexpected weight {name!r}: {type(model).__name__} has no "
                                 f"parameter {param_name!r}")
            if (param_name, shard) in loaded:
                raise ValueError(f"weight {name!r} given twice")
            _copy(_target(model, param_name, shard, params), tensor, name)
            loaded.add((param_name, shard))
    _check_complete(model, params, loaded)


def resolve(name: str, mapping: WeightMapping) -> tuple[str, int | None]:
    """Checkpoint name -> (parameter name, shard index or None)."""
    for rule in mapping.stacked:
        needle = f".{rule.source}."
        if needle in name:
            return name.replace(needle, f".{rule.target}.", 1), rule.shard
    return name, None


def _target(model: nn.Module, param_name: str, shard: int | None,
            params: dict[str, nn.Parameter]) -> torch.Tensor:
    if shard is None:
        return params[param_name].data
    module_name, _, leaf = param_name.rpartition(".")
    module = model.get_submodule(module_name)
    if not isinstance(module, MergedLinear):
        raise ValueError(f"{module_name!r} is not a fused layer; cannot load shard {shard} into it")
    return module.shard_view(leaf, shard)


def _copy(target: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                         f"the model expects {tuple(target.shape)}")
    target.copy_(tensor)
    if target.dtype == torch.float16 and tensor.dtype != torch.float16:
        _check_float16_range(target, tensor, name)


def _check_float16_range(target: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    """A bfloat16 / float32 value past float16's range turns into inf when cast, and the model
    into NaN logits: refuse it (``--dtype float16`` on such a checkpoint)."""
    if not bool(torch.isfinite(target).all()) and bool(torch.isfinite(tensor).all()):
        largest = float(tensor.abs().max())
        raise ValueError(f"weight {name!r} holds values past float16's range (|x| up to "
                         f"{largest:.4g} > 65504): load this checkpoint in bfloat16 or float32")


def _check_complete(model: nn.Module, params: dict[str, nn.Parameter],
                    loaded: set[tuple[str, int | None]]) -> None:
    missing = []
    for param_name in params:
        module_name, _, _ = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        shards: Sequence[int | None] = [None]
        if isinstance(module, MergedLinear) and (param_name, None) not in loaded:
            shards = range(module.num_shards)  # a fused module loaded shard by shard
        missing += [(param_name, s) for s in shards if (param_name, s) not in loaded]
    if missing:
        shown = ", ".join(n if s is None else f"{n} (shard {s})" for n, s in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"checkpoint is missing {len(missing)} weight(s) for "
                         f"{type(model).__name__}: {shown}{more}")
