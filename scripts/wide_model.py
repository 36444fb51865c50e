"""A random-weight Qwen2-shaped model whose widths are multiples of 256, for the K-quant formats
llama.cpp only writes there (Q2_K, Q3_K: the anchors' second model, 896 wide, falls back to
Q4_0 / Q5_0 / Q3_K in its Q2_K file, with no Q2_K tensor).

    python scripts/wide_model.py OUT_DIR [SECOND_MODEL_HF_DIR]

writes OUT_DIR as an HF directory (hidden 1024, FFN 2816, 12 layers, 16 heads / 2 KV heads,
tied embeddings, the second model's real Qwen2 tokenizer). Then, with llama.cpp's sources and
build (the anchors' `llama-server.sh` leaves both under ~/.cache/heron-anchors/src/):

    python <llama.cpp>/convert_hf_to_gguf.py OUT_DIR --outtype f16 --outfile f16.gguf
    <llama.cpp>/build/bin/llama-quantize f16.gguf q2_k.gguf Q2_K 2

(on 2026-12-07: 48 Q2_K, 24 Q3_K, 12 Q4_K tensors and a Q6_K embedding / LM head, 182 MB).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

DEFAULT_SOURCE = Path.home() / ".cache" / "heron-anchors" / "second-model" / "hf"
LAYERS = 12


def main() -> None:
    out = Path(sys.argv[1])
    source = Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_SOURCE
    config = AutoConfig.from_pretrained(source)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 1024, 2816, LAYERS
    config.num_attention_heads, config.num_key_value_heads = 16, 2
    config.layer_types, config.max_window_layers = config.layer_types[:LAYERS], LAYERS
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    for path in source.iterdir():  # the tokenizer's files
        if path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy(path, out / path.name)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
