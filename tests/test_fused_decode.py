"""The fused decode step (heron/models/fused_decode.py): the same hidden states and K/V writes, to
the bit, as the model's modules, for every family that describes its layers (Gemma 3, Llama with
llama3 RoPE, Mistral with a sliding window, Qwen2 with its q/k/v bias, Qwen3 with q/k norms);
and the modules wherever it does not apply."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers

from heron.kernels.cpu import fused_decode
from heron.kernels.cpu.gguf import BLOCK_FORMATS, BlockRows
from heron.layers.gguf_weight import GGUFWeight
from heron.layers.linear import use_only_quantized
from heron.layers.quant import quantize_model
from tests.model_harness import PagedSession, load_heron_model, make_hf_model
from tests.test_gguf_kernels import random_blocks


def needs_kernel(test: Callable[..., None]) -> Callable[..., None]:
    """Skips where heron's kernels do not build; they build on every CPU (an avx512, avx2 or
    portable variant), so with a C compiler a skip is a failure (tests/conftest.py)."""
    skip = pytest.mark.skipif(fused_decode() is None,
                              reason="heron's kernels did not build (no C compiler?)")
    return pytest.mark.cpu_features()(skip(test))


def _gemma3_config() -> transformers.PretrainedConfig:
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}
    return transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=6,
        query_pre_attn_scalar=24, max_position_embeddings=256, rope_parameters=rope,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=30.0)


LLAMA_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "gemma3": _gemma3_config,
    "llama3": lambda: transformers.LlamaConfig(
        **LLAMA_SHAPE, head_dim=32, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": lambda: transformers.MistralConfig(**LLAMA_SHAPE, head_dim=32, sliding_window=6),
    "qwen2": lambda: transformers.Qwen2Config(**{**LLAMA_SHAPE, "hidden_size": 128},
                                              tie_word_embeddings=True),  # head_dim 32
    "qwen3": lambda: transformers.Qwen3Config(**LLAMA_SHAPE, head_dim=32),
}


def _model(tmp_path, family: str = "gemma3", quantization: str = "int8"):
    model = load_heron_model(make_hf_model(CONFIGS[family](), seed=3), tmp_path).to(torch.bfloat16)
    quantize_model(model, quantization)
    return model


def _gemma3(tmp_path, quantization: str = "int8"):
    return _model(tmp_path, "gemma3", quantization)


def _decode_both_ways(model, session: PagedSession, chunks: dict[int, list[int]]):
    """One decode step with the fused path and once more from the same cache with the modules."""
    before = [cache.clone() for cache in session.kv_caches]
    tokens = {req: list(t) for req, t in session.tokens.items()}
    fused = session.step(chunks)
    fused_caches = [cache.clone() for cache in session.kv_caches]
    for cache, saved in zip(session.kv_caches, before):
        cache.copy_(saved)
    session.tokens = tokens
    plan, model.model.fused_decode = model.model.fused_decode, None
    try:
        modules = session.step(chunks)
    finally:
        model.model.fused_decode = plan
    return fused, fused_caches, modules


@needs_kernel
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_fused_decode_equals_the_modules_bit_for_bit(tmp_path, family: str) -> None:
    model = _model(tmp_path, family)
    attn = model.model.layers[0].self_attn
    if family == "qwen2":  # the bias and the q/k norms the path must apply are not neutral
        assert attn.qkv_proj.bias.abs().min() > 0
    if family == "qwen3":
        assert not torch.equal(attn.q_norm.weight, torch.ones_like(attn.q_norm.weight))
    session = PagedSession(model, num_blocks=48, block_size=4, dtype=torch.bfloat16)
    assert model.prepare_decode(session.kv_caches)
    gen = torch.Generator().manual_seed(0)
    prompts = {0: 3, 1: 9, 2: 14}  # past the sliding window (6) and across block boundaries
    session.step({req: torch.randint(0, 256, (n,), generator=gen).tolist() for req, n in prompts.items()})
    for _ in range(6):
        chunks = {req: [int(torch.randint(0, 256, (1,), generator=gen))] for req in prompts}
        fused, fused_caches, modules = _decode_both_ways(model, session, chunks)
        for req in prompts:
            assert torch.equal(fused[req], modules[req])
        for mine, theirs in zip(fused_caches, session.kv_caches):
            assert torch.equal(mine, theirs)


@needs_kernel
def test_steps_with_a_prompt_chunk_take_the_modules(tmp_path, monkeypatch) -> None:
    model = _gemma3(tmp_path)
    session = PagedSession(model, num_blocks=48, block_size=4, dtype=torch.bfloat16)
    assert model.prepare_decode(session.kv_caches)
    session.step({0: [5, 6, 7]})
    calls = []
    plan = model.model.fused_decode
    monkeypatch.setattr(type(plan), "__call__", lambda self, *a: calls.append(1))
    session.step({0: [8], 1: [1, 2, 3, 4]})  # a decode next to a prefill: not fused
    assert calls == []


def test_no_fused_path_without_int8_copies(tmp_path) -> None:
    model = _gemma3(tmp_path, quantization="none")
    session = PagedSession(model, num_blocks=16, block_size=4, dtype=torch.bfloat16)
    assert not model.prepare_decode(session.kv_caches)
    assert model.model.fused_decode is None
    logits = session.step({0: [3, 4, 5]})[0]
    assert logits.shape == (3, 256) and torch.isfinite(logits).all()


def _on_gguf_blocks(tmp_path, family: str):
    """A model whose projections, embedding and tied head are GGUF blocks of mixed formats
    (q/k/v three formats in one fused weight), as a GGUF file loads (``gguf_native``)."""
    config = CONFIGS[family]()
    config.intermediate_size = 256  # Q6_K rows: 256 per block
    model = load_heron_model(make_hf_model(config, seed=5), tmp_path).to(torch.bfloat16)
    formats = {"qkv_proj": ("Q5_0", "Q8_0", "Q4_0"), "o_proj": ("Q4_0",),
               "gate_up_proj": ("Q5_0", "Q8_0"), "down_proj": ("Q6_K",)}
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in formats:
            sizes = getattr(module, "output_sizes", (module.out_features,))
            _set_blocks(module, [(fmt, rows) for fmt, rows in zip(formats[leaf], sizes)], seed=len(name))
    embed = model.model.embed_tokens
    _set_blocks(embed, [("Q8_0", 256)], seed=1)
    model.lm_head.weight, model.lm_head.quantized = embed.weight, embed.quantized
    return model


def _set_blocks(module, parts, seed: int) -> None:
    k = module.weight.shape[1]
    rows = [BlockRows(torch.from_numpy(random_blocks(fmt, n, k, seed=seed + i, scale="normal")),
                      BLOCK_FORMATS[fmt][0]) for i, (fmt, n) in enumerate(parts)]
    use_only_quantized(module, GGUFWeight(rows, k, exact=False))


@needs_kernel
@pytest.mark.parametrize("family", ["gemma3", "qwen2"])  # the default and the second model's
def test_fused_decode_on_gguf_blocks_equals_the_modules_bit_for_bit(tmp_path, family: str) -> None:
    model = _on_gguf_blocks(tmp_path, family)
    assert model.model.layers[0].self_attn.qkv_proj.weight.device.type == "meta"  # no float copy
    session = PagedSession(model, num_blocks=48, block_size=4, dtype=torch.bfloat16)
    assert model.prepare_decode(session.kv_caches)
    gen = torch.Generator().manual_seed(1)
    prompts = {0: 4, 1: 11}
    session.step({req: torch.randint(0, 256, (n,), generator=gen).tolist() for req, n in prompts.items()})
    for _ in range(4):
        chunks = {req: [int(torch.randint(0, 256, (1,), generator=gen))] for req in prompts}
        fused, fused_caches, modules = _decode_both_ways(model, session, chunks)
        for req in prompts:
            assert torch.equal(fused[req], modules[req]) and torch.isfinite(fused[req]).all()
        for mine, theirs in zip(fused_caches, session.kv_caches):
            assert torch.equal(mine, theirs)
