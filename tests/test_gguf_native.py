"""GGUF files served from their own blocks (heron/loader/gguf_native.py): the only copy of each
quantized tensor, the same model as transformers builds from the same file.

Tiny random models are written as GGUF files whose 2D tensors take every block format heron
reads: Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 quantized from the model's weights by gguf-py, and
Q2_K / Q3_K / Q4_K / Q5_K / Q6_K / IQ4_NL / IQ4_XS as random blocks of model-like scales (gguf-py
cannot quantize those; transformers dequantizes whatever blocks the file holds, so it is the
same model either way).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from heron import LLM, SamplingParams
from heron.kernels.cpu.gguf import BLOCK_FORMATS
from heron.layers.gguf_weight import GGUFWeight
from heron.layers.linear import Embedding, Linear, LMHead
from tests.model_harness import argmax_continuation
from tests.test_gguf_kernels import random_blocks

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 2, 300
# Gemma 3's head size: 256, which its query scaling (query_pre_attn_scalar, not in a GGUF file)
# equals in every Gemma 3 model, as heron (like llama.cpp) and transformers' default assume.
GEMMA_HEAD_DIM = 256
PROMPTS = [[1, 17, 250, 3, 99], [1, 5], [1, 200, 201, 202, 7, 8, 9, 10, 11, 12, 13]]
# checkpoint tensor -> block format (tensors not listed are F32)
FORMATS = {"token_embd": "Q8_0", "attn_q": "Q4_K", "attn_k": "Q5_0", "attn_v": "Q8_0",
           "attn_output": "Q5_K", "ffn_gate": "Q4_0", "ffn_up": "Q6_K", "ffn_down": "Q4_K",
           "output": "Q6_K"}
# the second layer's own formats: those of Q3_K_M files and of older ones
LAYER1_FORMATS = {"attn_q": "IQ4_XS", "attn_k": "Q2_K", "attn_output": "Q3_K", "ffn_gate": "Q4_1",
                  "ffn_up": "IQ4_NL", "ffn_down": "Q5_1"}


def _hf_model(arch: str) -> transformers.PreTrainedModel:
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  max_position_embeddings=256, rms_norm_eps=1e-6)
    config = {"llama": lambda: transformers.LlamaConfig(**common, tie_word_embeddings=False),
              "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True),
              "gemma3": lambda: transformers.Gemma3TextConfig(**common, head_dim=GEMMA_HEAD_DIM,
                                                               sliding_window=4)}[arch]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.05 * torch.randn_like(param))
    return model


def _llama_cpp_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter stores llama's q/k rows with rotary pairs adjacent."""
    return array.reshape(heads, 2, array.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(array.shape)


def _gguf_name(arch: str, hf_name: str) -> str | None:
    table = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in table:
        return table[hf_name]
    parts = hf_name.split(".")  # model.layers.<i>.<module>.<leaf>.<weight|bias>
    renames = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
    if arch == "gemma3":  # the sandwich norms
        renames["post_attention_layernorm"] = "post_attention_norm"
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{renames[module]}.{parts[-1]}" if module in renames else None


def _tensor_data(arch: str, hf_name: str, gguf_name: str, value: np.ndarray, seed: int):
    """(array, raw ggml type or None) as llama.cpp would store the tensor."""
    if arch == "gemma3" and "norm" in gguf_name:  # stored as 1 + w
        value = value + 1
    if arch == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
        value = _llama_cpp_rows(value, HEADS if "attn_q" in gguf_name else KV_HEADS)
    kind = gguf_name.split(".")[-2]
    fmt = None
    if value.ndim == 2:
        fmt = LAYER1_FORMATS.get(kind) if gguf_name.startswith("blk.1.") else None
        fmt = fmt or FORMATS.get(kind)
    if fmt is None:
        return value.astype(np.float32), None
    qtype = gguf.GGMLQuantizationType[fmt]
    if fmt in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        return gguf.quants.quantize(value, qtype), qtype
    rows, k = value.shape
    if fmt == "IQ2_XXS":  # fp16 d | 8 x (4 grid indices, 4 x 7 sign bits and a 4-bit scale)
        blocks = np.random.default_rng(seed).integers(0, 256, size=(rows * k // 256, 66), dtype=np.uint8)
        blocks[:, 0:2] = np.array([1e-4], dtype=np.float16).view(np.uint8)
        return blocks.reshape(rows, -1), qtype
    return random_blocks(fmt, rows, k, seed=seed, scale="model"), qtype


def write_gguf(path: Path, arch: str, model: transformers.PreTrainedModel) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if arch == "gemma3":
        writer.add_key_length(GEMMA_HEAD_DIM)
        writer.add_value_length(GEMMA_HEAD_DIM)
        writer.add_sliding_window(4)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([1] * VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for seed, (hf_name, param) in enumerate(model.state_dict().items()):
        name = _gguf_name(arch, hf_name)
        if name is None or (hf_name == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        data, qtype = _tensor_data(arch, hf_name, name, param.detach().float().numpy(), seed)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def tiny_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(f"gguf-{request.param}") / f"tiny-{request.param}.gguf"
    write_gguf(path, request.param, _hf_model(request.param))
    return path


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "heron-cache"
    monkeypatch.setenv("HERON_CACHE_DIR", str(root))
    return root


def _greedy(llm: LLM, n: int = 16) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _transformers_greedy(path: Path, n: int = 16) -> list[list[int]]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    return [argmax_continuation(hf, prompt, n) for prompt in PROMPTS]


def test_float32_greedy_tokens_equal_transformers_on_the_same_file(tiny_file: Path) -> None:
    llm = LLM(str(tiny_file), dtype="float32", skip_tokenizer_init=True, kv_cache_memory="64MiB")
    assert llm.engine.quantization == "gguf"
    weights = [m.quantized for m in llm.engine.model.modules() if isinstance(m.quantized if hasattr(
        m, "quantized") else None, GGUFWeight)]
    assert weights and all(w.exact for w in weights)
    assert _greedy(llm) == _transformers_greedy(tiny_file)


def test_the_file_blocks_are_the_only_copy(tiny_file: Path, cache_dir: Path) -> None:
    """Every quantized tensor is read in place from one mapping of the file; what the model
    owns besides is norms, biases and rotary tables (no weights); nothing is written to the
    cache but config and tokenizer."""
    llm = LLM(str(tiny_file), dtype="bfloat16", skip_tokenizer_init=True, kv_cache_memory="64MiB")
    model = llm.engine.model
    reader = gguf.GGUFReader(str(tiny_file))
    quantized_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type.name in BLOCK_FORMATS)
    float_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type.name not in BLOCK_FORMATS)
    parts: dict[int, int] = {}  # address -> bytes, each part once (a tied head shares its table)
    for module in model.modules():
        weight = getattr(module, "quantized", None)
        if isinstance(module, (Linear, LMHead, Embedding)) and isinstance(weight, GGUFWeight):
            assert module.weight.device.type == "meta"  # its float weight holds no memory
            parts |= {part.data.data_ptr(): part.data.numel() for part in weight.parts}
    assert sum(parts.values()) == quantized_bytes  # every quantized tensor, once, as stored
    assert max(parts) - min(parts) < tiny_file.stat().st_size  # all inside one map of the file
    owned = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
                if t.device.type != "meta")
    assert owned <= float_bytes + 256 * 1024  # norms and biases (in bf16), rotary tables
    assert not list(cache_dir.glob("v*/*/prepared/*"))


@pytest.mark.slow
def test_default_model_float32_greedy_equals_transformers_on_the_same_file() -> None:
    """The default model (Gemma 3 270M Q4_K_M: Q5_0, Q8_0, Q4_K, Q6_K tensors) served from its
    blocks in float32: transformers' greedy tokens, 4 prompts x 32 tokens."""
    from heron.bench.accuracy import greedy_tokens, transformers_greedy
    from heron.loader.default_model import default_gguf_path

    llm = LLM(dtype="float32")
    assert llm.engine.quantization == "gguf"
    prompts, ours = greedy_tokens(llm)
    assert len(prompts) == 4 and all(len(tokens) == 32 for tokens in ours)
    assert ours == transformers_greedy(default_gguf_path(), prompts)


@pytest.mark.slow
def test_a_format_the_kernels_do_not_read_is_dequantized_and_said(tmp_path: Path, caplog,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """IQ2_XXS (not among the formats heron's kernels read): that module gets float weights,
    the log says so, and the model is still transformers' model of the file."""
    import logging

    monkeypatch.setitem(FORMATS, "ffn_up", "IQ2_XXS")
    path = tmp_path / "tiny-iq2_xxs.gguf"
    write_gguf(path, "llama", _hf_model("llama"))
    with caplog.at_level(logging.WARNING, logger="heron.loader.gguf_native"):
        llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, kv_cache_memory="64MiB")
    assert "type IQ2_XXS are dequantized" in caplog.text
    model = llm.engine.model
    up = model.model.layers[0].mlp.gate_up_proj
    assert up.quantized is None and up.weight.device.type == "cpu"  # gate (Q4_0) and up: float
    assert isinstance(model.model.layers[0].mlp.down_proj.quantized, GGUFWeight)
    assert _greedy(llm) == _transformers_greedy(path)
