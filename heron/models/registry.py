"""Hugging Face ``architectures`` names -> heron model classes, imported on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from heron.models.base import CausalLM

    # A model class: built from its (transformers or plain) config alone.
    ModelClass = Callable[[Any], CausalLM]

# architecture name -> (module, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("heron.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("heron.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("heron.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("heron.models.llama", "Qwen3ForCausalLM"),
    "Gemma3ForCausalLM": ("heron.models.gemma3", "Gemma3ForCausalLM"),
    # vision-language checkpoints, served text-only
    "Gemma3ForConditionalGeneration": ("heron.models.gemma3", "Gemma3ForConditionalGeneration"),
    "Mistral3ForConditionalGeneration": ("heron.models.llama", "Mistral3ForConditionalGeneration"),
    "MptForCausalLM": ("heron.models.mpt", "MptForCausalLM"),
    # cross-encoders: the family's decoder and a ``score`` head (heron.models.score_head)
    "LlamaForSequenceClassification": ("heron.models.score_head", "LLAMA"),
    "MistralForSequenceClassification": ("heron.models.score_head", "MISTRAL"),
    "Qwen2ForSequenceClassification": ("heron.models.score_head", "QWEN2"),
    "Qwen3ForSequenceClassification": ("heron.models.score_head", "QWEN3"),
}


def supported_architectures() -> list[str]:
    """The HF architecture names heron can run, sorted."""
    return sorted(_MODELS)


def get_model_class(architectures: list[str]) -> ModelClass:
    """The class for the first supported name in ``architectures`` (a config's field)."""
    for name in architectures or []:
        if name in _MODELS:
            module_name, class_name = _MODELS[name]
            return getattr(importlib.import_module(module_name), class_name)
    raise ValueError(f"unsupported model architecture(s) {list(architectures or [])}; "
                     f"supported: {', '.join(supported_architectures())}")
