"""Tiny random-weight models built from transformers configs, saved to a directory heron loads."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 512


def _common(**extra: object) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)


CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_common()),
    "mistral": lambda: transformers.MistralConfig(**_common(sliding_window=None)),
    "qwen2": lambda: transformers.Qwen2Config(**_common()),
    "qwen3": lambda: transformers.Qwen3Config(**_common(head_dim=16)),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **_common(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                  layer_types=["sliding_attention", "full_attention"])),
    "mpt": lambda: transformers.MptConfig(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2,
                                          expansion_ratio=4, max_seq_len=1024,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


def save_tiny_model(arch: str, path: Path, seed: int = 0) -> Path:
    """Build a random ``arch`` model (float32) and save it with save_pretrained; returns the path."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_weights(model)
    model.save_pretrained(path)
    return path


def _spread_weights(model: torch.nn.Module) -> None:
    """Random init gives near-flat logits; widen them so greedy choices are far from ties."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
