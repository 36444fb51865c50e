"""A PEFT LoRA adapter's directory and ``adapter_config.json``, checked without reading a
tensor (no torch: the server checks its ``--lora-modules`` before it starts the engine).

The scale is ``lora_alpha / r`` (``use_rslora``: ``lora_alpha / sqrt(r)``). Only safetensors
are read (an ``adapter_model.bin`` is a pickle: refused). Whatever the adapter would change
besides the projections' low-rank products (DoRA, ``modules_to_save``, biases, embedding or LM
head targets, per-module ranks or alphas, ...) is refused by name, never ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heron.lora import LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

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
class CheckedAdapter:
    """An adapter directory whose files and config heron can serve."""

    directory: Path
    where: str  # how messages name it: "LoRA adapter 'name' (path)"
    rank: int
    scale: float


def check_adapter(request: LoRARequest, max_rank: int) -> CheckedAdapter:
    """``request``'s directory and config, checked; ValueError naming the file or field."""
    where = f"LoRA adapter {request.lora_name!r} ({request.lora_path})"
    directory = Path(request.lora_path).expanduser()
    config = _read_config(directory, where)
    rank, scale = check_config(config, max_rank, where)
    return CheckedAdapter(directory, where, rank, scale)


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
