"""Hugging Face model directories: config.json, *.safetensors shards, generation_config.json.

Weights are streamed one tensor at a time from memory-mapped shards, under the names the
checkpoint uses (``model.layers.0.self_attn.q_proj.weight``); mapping them onto heron's
modules is the model's job (``heron.loader.weights.load_weights``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from heron.loader.plain_config import AnyModelConfig

INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# Token ids a generation_config.json may carry; they are what heron uses from it by default.
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_NOT_DEFAULTS = ("transformers_version", "_from_model_config", "_commit_hash")


def load_dir_config(model_dir: Path) -> PretrainedConfig:
    """The model's ``config.json`` as a transformers config object."""
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json, so it is not a Hugging Face model directory")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def find_safetensors_files(model_dir: Path) -> list[Path]:
    """Shards listed by ``model.safetensors.index.json``, else every ``*.safetensors`` file."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} lists shards that are not there: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weight files in {model_dir}")
    return files


def count_safetensors(files: Iterable[Path]) -> int:
    """How many tensors the files hold (their headers only are read)."""
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as shard:
            total += len(shard.keys())
    return total


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of every file, one at a time (CPU, mmap)."""
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as shard:
            for name in shard.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, shard.get_tensor(name)


def read_generation_config(model_dir: Path, hf_config: AnyModelConfig) -> dict[str, Any]:
    """``generation_config.json`` as a dict, or the token ids of ``config.json`` when absent."""
    path = model_dir / GENERATION_CONFIG_FILE
    if path.is_file():
        raw: dict[str, Any] = json.loads(path.read_text())
        return {k: v for k, v in raw.items() if k not in _NOT_DEFAULTS}
    return generation_config_from_model_config(hf_config)


def generation_config_from_model_config(hf_config: AnyModelConfig) -> dict[str, Any]:
    """The bos/eos/pad token ids the model config states (what transformers would derive)."""
    values = {key: getattr(hf_config, key, None) for key in _TOKEN_ID_KEYS}
    return {key: value for key, value in values.items() if value is not None}
