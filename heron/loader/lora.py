"""A PEFT LoRA adapter from disk, checked against the base model it is to run beside.

A directory as ``peft`` saves it::

    adapter_config.json          r, lora_alpha, use_rslora, target_modules, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight  [r, in]
                                 base_model.model.<module>.lora_B.weight  [out, r]

``<module>`` is a checkpoint name (``model.layers.0.self_attn.q_proj``); the model's
``WeightMapping`` places it on heron's module (``qkv_proj``, shard 0), as the weight loader
does for the base weights. The scale is ``lora_alpha / r`` (``use_rslora``: ``/ sqrt(r)``),
folded into B. Only safetensors are read (an ``adapter_model.bin`` is a pickle: refused).
Whatever the adapter would change besides the projections (DoRA, ``modules_to_save``, biases,
embedding or LM head targets, per-module ranks) is refused by name, never ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from heron.layers.lora import AdapterWeights, LoRAPair, lora_targets
from heron.lora import LoRARequest
from heron.models.base import WeightMapping

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": 0, ".lora_B.weight": 1}

# adapter_config.json fields whose non-default value changes what the adapter computes in
# ways this reader does not do: field -> the values that are fine.
_MUST_BE_OFF: dict[str, tuple[Any, ...]] = {
    "use_dora": (None, False),
    "modules_to_save": (None, []),
    "fan_in_fan_out": (None, False),
    "lora_bias": (None, False),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "layer_replication": (None, []),
    "use_qalora": (None, False),
    "alora_invocation_tokens": (None, []),
    "use_bdlora": (None, False, {}),
    "arrow_config": (None, {}),
}
_NOT_PROJECTIONS = ("embed", "lm_head", "wte", "output")


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
    where = f"LoRA adapter {request.lora_name!r} ({request.lora_path})"
    directory = Path(request.lora_path).expanduser()
    config = _read_config(directory, where)
    rank, scale = check_config(config, max_rank, where)
    tensors = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    mapping: WeightMapping = getattr(model, "weight_mapping", WeightMapping())
    weights = _fit(tensors, model, mapping, rank, scale, where, device or torch.device("cpu"))
    return LoRAAdapter(request, rank, scale, weights)


def _read_config(directory: Path, where: str) -> dict[str, Any]:
    if not directory.is_dir():
        raise ValueError(f"{where}: no such directory")
    if not (directory / CONFIG_FILE).is_file():
        raise ValueError(f"{where}: no {CONFIG_FILE} (a PEFT adapter directory has one)")
    if not (directory / WEIGHTS_FILE).is_file():
        if (directory / PICKLE_FILE).is_file():
            raise ValueError(f"{where}: {PICKLE_FILE} is a pickle, which heron does not load; "
                             f"save the adapter as {WEIGHTS_FILE} (safe_serialization=True)")
        raise ValueError(f"{where}: no {WEIGHTS_FILE}")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: {CONFIG_FILE} is not readable JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{where}: {CONFIG_FILE} is not a JSON object")
    return config


def check_config(config: dict[str, Any], max_rank: int, where: str) -> tuple[int, float]:
    """The adapter's rank and scale; ValueError naming the first field heron cannot honour."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type {peft_type!r} is not supported (LORA only)")
    for name, fine in _MUST_BE_OFF.items():
        value = config.get(name)
        if value not in fine:
            raise ValueError(f"{where}: {name}={value!r} is not supported")
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(f"{where}: bias={bias!r} is not supported (only 'none')")
    targets = config.get("target_modules") or []
    bad = [t for t in ([targets] if isinstance(targets, str) else targets)
           if any(word in str(t) for word in _NOT_PROJECTIONS)]
    if bad:
        raise ValueError(f"{where}: target_modules {bad[0]!r} is not supported "
                         "(projections only: no embedding or LM head)")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{where}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise ValueError(f"{where}: rank r={rank} exceeds max_lora_rank={max_rank} "
                         "(raise --max-lora-rank)")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    divisor = math.sqrt(rank) if config.get("use_rslora") else rank
    return rank, float(alpha) / divisor


def _fit(tensors: dict[str, torch.Tensor], model: nn.Module, mapping: WeightMapping, rank: int,
         scale: float, where: str, device: torch.device) -> AdapterWeights:
    """The adapter's tensors as pairs on heron's modules, each shape checked."""
    from heron.loader.weights import resolve

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
