"""A tiny random-weight Llama, built from a transformers config and saved where heron loads it."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 512


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """Build a random float32 Llama (2 layers, GQA) with save_pretrained; returns the path."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init gives near-flat logits; widen them, away from ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return path
