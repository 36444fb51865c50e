"""A PEFT LoRA adapter from disk, checked against the base model it is to run beside.

A directory as ``peft`` saves it::

    adapter_config.json          r, lora_alpha, use_rslora, target_modules, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight  [r, in]
                                 base_model.model.<module>.lora_B.weight  [out, r]

``<module>`` is a checkpoint name (``model.layers.0.self_attn.q_proj``); the model's
``WeightMapping`` places it on heron's module (``qkv_proj``, shard 0), as the weight loader
does for the base weights. The scale (``heron.lora.adapter_config``, which also refuses what
heron does not honour) is folded into B. Every tensor must be a lora_A / lora_B pair on one
of the model's projections, of the shape the projection takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch import nn

from heron.layers.lora import AdapterWeights, LoRAPair, lora_targets
from heron.loader.weights import resolve
from heron.lora import LoRARequest
from heron.lora.adapter_config import WEIGHTS_FILE, check_adapter
from heron.models.base import WeightMapping

_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": 0, ".lora_B.weight": 1}


@dataclass(frozen=True)
class LoRAAdapter:
    """An adapter read and checked: its pairs by heron module name, ready for ``LoRALayer``s."""

    request: LoRARequest
    rank: int
    scale: float
    weights: AdapterWeights

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for pairs in self.weights.values() for p in pairs if p is not None)


def load_adapter(request: LoRARequest, model: nn.Module, max_rank: int,
                 device: torch.device | None = None) -> LoRAAdapter:
    """Read ``request``'s PEFT directory and fit it to ``model``; ValueError says what is wrong
    (the field or tensor named)."""
    checked = check_adapter(request, max_rank)
    where = checked.where
    tensors = load_file(str(checked.directory / WEIGHTS_FILE), device="cpu")
    mapping: WeightMapping = getattr(model, "weight_mapping", WeightMapping())
    weights = _fit(tensors, model, mapping, checked.rank, checked.scale, where,
                   device or torch.device("cpu"))
    return LoRAAdapter(request, checked.rank, checked.scale, weights)


def _fit(tensors: dict[str, torch.Tensor], model: nn.Module, mapping: WeightMapping, rank: int,
         scale: float, where: str, device: torch.device) -> AdapterWeights:
    """The adapter's tensors as pairs on heron's modules, each shape checked."""
    targets = lora_targets(model)
    found: dict[tuple[str, int], list[torch.Tensor | None]] = {}
    for key, tensor in tensors.items():
        module, which = _split_key(key, where)
        param, shard = resolve(f"{module}.weight", mapping)
        name = param.removesuffix(".weight")
        if name not in targets:
            raise ValueError(f"{where}: {key} targets {module!r}, which is not a projection of "
                             f"{type(model).__name__} (only its Linear layers take adapters)")
        expected = _expected_shape(targets[name], shard, which, rank)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{where}: {key} has shape {tuple(tensor.shape)}, the base model "
                             f"expects {expected}")
        found.setdefault((name, shard or 0), [None, None])[which] = tensor
    weights: dict[str, list[LoRAPair | None]] = {}
    for (name, shard), (a, b) in sorted(found.items()):
        if a is None or b is None:
            raise ValueError(f"{where}: {name} has lora_{'B' if a is None else 'A'} only")
        pairs = weights.setdefault(name, [None] * _num_shards(targets[name]))
        pairs[shard] = LoRAPair(a.to(device, torch.float32).contiguous(),
                                (b.to(torch.float32) * scale).to(device).contiguous())
    if not weights:
        raise ValueError(f"{where}: {WEIGHTS_FILE} holds no lora_A / lora_B weights")
    return {name: tuple(pairs) for name, pairs in weights.items()}


def _split_key(key: str, where: str) -> tuple[str, int]:
    """``base_model.model.<module>.lora_A.weight`` -> (module, 0 for A / 1 for B)."""
    for suffix, which in _SUFFIXES.items():
        if key.endswith(suffix):
            return key.removesuffix(suffix).removeprefix(_PREFIX), which
    if "lora_embedding" in key:
        raise ValueError(f"{where}: {key}: embedding targets are not supported")
    if "lora_magnitude_vector" in key:
        raise ValueError(f"{where}: {key}: DoRA (use_dora) is not supported")
    raise ValueError(f"{where}: unexpected tensor {key} (only lora_A / lora_B weights are read)")


def _num_shards(module: nn.Linear) -> int:
    return len(getattr(module, "output_sizes", (module.out_features,)))


def _expected_shape(module: nn.Linear, shard: int | None, which: int,
                    rank: int) -> tuple[int, int]:
    sizes = getattr(module, "output_sizes", (module.out_features,))
    if which == 0:
        return rank, module.in_features
    return sizes[shard or 0], rank
