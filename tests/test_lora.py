"""LoRA adapters (heron.lora, heron.loader.lora, heron.layers.lora, heron.engine.lora): a PEFT
adapter saved by ``peft`` runs beside heron's base projections and gives transformers + peft's
logits, per row of a mixed batch, never in the one-call decode step, never sharing prefix-cache
blocks with another adapter or the base model; what heron cannot honour is refused by name."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from heron.config import ModelConfig
from heron.engine.kv_cache import KVCacheManager
from heron.engine.request import Request
from heron.layers.lora import AdapterWeights
from heron.loader import load_model
from heron.loader.lora import load_adapter
from heron.lora import LoRARequest
from heron.sampling_params import SamplingParams
from tests.gguf_files import synthetic_vocab, write_gguf
from tests.model_harness import (
    PagedSession,
    hf_logits,
    load_heron_model,
    make_hf_model,
    prompt_and_greedy_logits,
)

ATOL = RTOL = 1e-4  # as the model reference tests (tests/test_gguf_families.py)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),  # biases on q/k/v
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=32),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**SMALL, "num_hidden_layers": 3}, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=8, layer_types=["sliding_attention", "full_attention",
                                       "sliding_attention"], final_logit_softcapping=30.0),
}


def save_adapter(hf: torch.nn.Module, path: Path, seed: int, r: int = 8, alpha: float = 16,
                 targets: list[str] | None = None, **options: object) -> torch.nn.Module:
    """A random PEFT LoRA adapter on a copy of ``hf`` (B not zero), saved at ``path`` as peft
    saves it; returns the PEFT model (transformers + the adapter: the reference)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or PROJECTIONS,
                             init_lora_weights=False, **options)
    model = peft.get_peft_model(copy.deepcopy(hf), config)
    with torch.no_grad():  # a visible effect: products of the size of the base outputs
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.5 / param.shape[1] ** 0.5)
    model.save_pretrained(path)
    return model.eval()


def heron_adapter(model: torch.nn.Module, path: Path, name: str = "a", lora_id: int = 1,
                  max_rank: int = 16) -> AdapterWeights:
    return load_adapter(LoRARequest(name, lora_id, str(path)), model, max_rank).weights


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    hf = make_hf_model(FAMILIES[request.param](), seed=3)
    directory = tmp_path_factory.mktemp(request.param)
    model = load_heron_model(hf, directory / "base")
    model.enable_lora()
    return hf, model, directory


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_logits_equal_peft(family, rslora: bool) -> None:
    """heron + a PEFT adapter over a 40-token prompt and 3 greedy steps = transformers + peft,
    and far from the base model's logits (the adapter does something)."""
    hf, model, directory = family
    path = directory / f"adapter-{rslora}"
    reference = save_adapter(hf, path, seed=1, use_rslora=rslora)
    logits, tokens = prompt_and_greedy_logits(model, hf.config.vocab_size,
                                              lora=heron_adapter(model, path))
    torch.testing.assert_close(logits, hf_logits(reference, tokens), atol=ATOL, rtol=RTOL)
    assert (logits - hf_logits(hf, tokens)).abs().max() > 0.1

