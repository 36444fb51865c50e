"""LoRA adapters as vLLM users name them: ``LoRARequest(name, int_id, path)``.

    llm = LLM(model, enable_lora=True)
    llm.generate(prompts, params, lora_request=LoRARequest("sql", 1, "/adapters/sql"))

The adapter is a PEFT directory (``adapter_config.json`` and ``adapter_model.safetensors``);
reading it is ``heron.loader.lora``, applying it beside the base projections
``heron.layers.lora``, keeping loaded adapters ``heron.engine.lora``. This module is light
(no torch): the server names adapters with it.
"""

from __future__ import annotations

import msgspec

__all__ = ["LoRARequest"]


class LoRARequest(msgspec.Struct, frozen=True):
    """One adapter: ``lora_name`` (what a request's ``model`` field names), ``lora_int_id``
    (its identity in the engine: one id, one adapter; at least 1), ``lora_path`` (the PEFT
    directory), ``base_model_name`` (the model it adapts, as ``/v1/models`` lists its parent;
    None: the served model)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be at least 1, got {self.lora_int_id}")
        if not self.lora_path:
            raise ValueError(f"LoRA adapter {self.lora_name!r} needs a lora_path")

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def path(self) -> str:
        return self.lora_path
