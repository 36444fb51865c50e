"""From files on disk to a model, its config and its generation defaults (the tokenizer is
``heron.tokenizer``'s).

``ModelConfig.model`` names the source:

- ``None``: the embedded default model (Gemma 3 270M GGUF, see ``default_model``);
- a directory: a Hugging Face model directory (config.json, *.safetensors, tokenizer files);
- a ``*.gguf`` file: config, tokenizer and weights all come from the file (cached, see ``gguf``);
- anything else is taken for a Hugging Face Hub id and fetched with ``snapshot_download``
  (ValueError when it is neither on disk nor downloadable).

``load_format="dummy"`` skips the weight files: the model gets small random weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heron.config import ModelConfig
from heron.loader.default_model import DEFAULT_MODEL_NAME, locate_default_model
from heron.loader.gguf import GGUFModel
from heron.loader.safetensors import (
    count_safetensors,
    find_safetensors_files,
    iter_safetensors,
    load_dir_config,
    read_generation_config,
)
from heron.progress import track

if TYPE_CHECKING:  # imported where used: the API process loads the tokenizer without them
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from heron.loader.plain_config import AnyModelConfig
    from heron.models.base import CausalLM
    from heron.models.registry import ModelClass

__all__ = ["LoadedModel", "ModelSource", "build_model", "checkpoint_names", "generation_config_of",
           "hf_reference_path", "load_hf_config", "load_model", "model_display_name",
           "resolve_source"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
_DUMMY_RANGE = 1e-3  # dummy weights are uniform in [-_DUMMY_RANGE, _DUMMY_RANGE]


@dataclass
class LoadedModel:
    """A model with its weights in place, its HF config and HF generation_config defaults."""

    model: CausalLM
    hf_config: AnyModelConfig
    generation_config: dict[str, Any]


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives on disk: a GGUF file or a Hugging Face directory."""

    path: Path
    gguf_sha256: str | None = None  # known up front for the default model

    @property
    def is_gguf(self) -> bool:
        return self.path.is_file()

    @cached_property
    def gguf(self) -> GGUFModel:
        """The GGUF file and its cache entry (one per source: the metadata is read once)."""
        return GGUFModel(self.path, sha256=self.gguf_sha256)


def resolve_source(name: str | None, *, download_weights: bool = True) -> ModelSource:
    """Turn ``--model`` (or ``--tokenizer``) into files on disk; see the module docstring."""
    if name is None:
        default = locate_default_model()
        return ModelSource(default.path, gguf_sha256=default.sha256)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{name!r} is a file but not a .gguf file; pass a GGUF file or a "
                             "Hugging Face model directory")
        return ModelSource(path)
    if path.suffix.lower() == ".gguf" or name.startswith(("/", ".", "~")) or not _HUB_ID.match(name):
        raise ValueError(f"model {name!r} not found: no such file or directory")
    return ModelSource(_download(name, download_weights))


def _download(repo_id: str, weights: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = _HUB_PATTERNS if weights else [p for p in _HUB_PATTERNS if p != "*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # no network, unknown repo, gated repo...: all the same to the user
        raise ValueError(
            f"model {repo_id!r} is not a local directory or .gguf file, and could not be found in "
            f"the local Hugging Face cache or downloaded from the Hub ({type(err).__name__}: {err})"
        ) from err


def model_display_name(model_config: ModelConfig) -> str:
    """The name the API shows: ``--model`` as given, or "gemma-3-270m" for the default."""
    return DEFAULT_MODEL_NAME if model_config.model is None else model_config.model


def load_hf_config(model_config: ModelConfig) -> PretrainedConfig:
    """The model's transformers config, without touching weights (fast once cached)."""
    return config_of(resolve_source(model_config.model, download_weights=False))


def config_of(source: ModelSource) -> PretrainedConfig:
    return source.gguf.config() if source.is_gguf else load_dir_config(source.path)


def generation_config_of(source: ModelSource, hf_config: AnyModelConfig) -> dict[str, Any]:
    if source.is_gguf:
        return source.gguf.generation_config()
    return read_generation_config(source.path, hf_config)


def load_model(model_config: ModelConfig, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Build the model for ``hf_config.architectures`` on ``device`` in ``dtype`` and load it."""
    dummy = model_config.load_format == "dummy"
    source = resolve_source(model_config.model, download_weights=not dummy)
    loaded = build_model(source, device, dtype)
    if dummy:
        _init_dummy(loaded.model, model_config.seed)
    else:  # raises on missing weights
        count, weights = _iter_weights(source, loaded.model, dtype)
        _load_weights(loaded.model, track(weights, "reading tensors", count, unit="tensor"))
    return loaded


def build_model(source: ModelSource, device: torch.device, dtype: torch.dtype,
                hf_config: AnyModelConfig | None = None) -> LoadedModel:
    """The model of ``source`` (or of ``hf_config`` when given) in eval mode, its parameters
    allocated but not filled."""
    hf_config = config_of(source) if hf_config is None else hf_config
    with _building(device, dtype):
        model = _model_class(hf_config)(hf_config)
    model.eval()
    return LoadedModel(model=model, hf_config=hf_config,
                       generation_config=generation_config_of(source, hf_config))


def hf_reference_path(model_config: ModelConfig) -> str:
    """A directory ``transformers.AutoModelForCausalLM.from_pretrained`` loads the same weights
    from: the HF directory itself, or for a GGUF its cache entry (config.json plus the
    dequantized model.safetensors, prepared here if missing)."""
    source = resolve_source(model_config.model)
    if not source.is_gguf:
        return str(source.path)
    source.gguf.config()  # the entry's config.json
    source.gguf.prepare_weights()
    return str(source.gguf.cache.directory)


def _iter_weights(source: ModelSource, model: nn.Module,
                  dtype: torch.dtype) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    """How many tensors (for a GGUF file: about) and the ``(name, tensor)`` pairs."""
    if source.is_gguf:  # only the tensors the model has a place for, already in its dtype
        names = checkpoint_names(model)
        source.gguf.report_unused(names, type(model).__name__)
        return len(names), source.gguf.weights(names, dtype)
    files = find_safetensors_files(source.path)
    return count_safetensors(files), iter_safetensors(files)


def checkpoint_names(model: nn.Module) -> list[str]:
    """The checkpoint tensor names ``model`` loads: its parameters, fused ones split back
    into their sources (``qkv_proj`` -> ``q_proj``, ``k_proj``, ``v_proj``)."""
    from heron.loader.weights import WeightMapping

    mapping: WeightMapping = getattr(model, "weight_mapping", WeightMapping())
    names = []
    for name, _ in model.named_parameters():
        rules = [rule for rule in mapping.stacked if f".{rule.target}." in name]
        names += [name.replace(f".{rule.target}.", f".{rule.source}.", 1) for rule in rules] or [name]
    return names


def _model_class(hf_config: AnyModelConfig) -> ModelClass:
    from heron.models.registry import get_model_class

    return get_model_class(list(getattr(hf_config, "architectures", None) or []))


def _load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    from heron.loader.weights import load_weights

    load_weights(model, weights)


@contextmanager
def _building(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Construct modules directly on ``device`` in ``dtype``, skipping ``torch.nn.init``.

    Every parameter is overwritten right after (checkpoint or dummy weights), so the default
    random initialisation is wasted time (seconds for a 270M model on CPU).
    """
    import torch
    from torch import nn

    skipped = {name: fn for name, fn in vars(nn.init).items()
               if callable(fn) and name.endswith("_") and not name.startswith("_")}
    previous_dtype = torch.get_default_dtype()
    try:
        for name in skipped:
            setattr(nn.init, name, _keep_tensor)
        torch.set_default_dtype(dtype)
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous_dtype)
        for name, fn in skipped.items():
            setattr(nn.init, name, fn)


def _keep_tensor(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


def _init_dummy(model: nn.Module, seed: int) -> None:
    """Small uniform random weights, the same for the same seed (for benchmarks and tests)."""
    import torch

    with torch.no_grad():
        for index, param in enumerate(model.parameters()):
            generator = torch.Generator(device="cpu").manual_seed(seed + index)
            values = torch.empty(param.shape, dtype=torch.float32).uniform_(
                -_DUMMY_RANGE, _DUMMY_RANGE, generator=generator)
            param.copy_(values)
