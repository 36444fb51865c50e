"""Hugging Face directories with the config.json variants published models use, through
``heron.LLM`` against transformers (float32).

Each config is written as published checkpoints write it (transformers 4.x keys:
``rope_scaling``, ``rope_theta``, ``rope_local_base_freq``, ``sliding_window_pattern``), and
the reference model is what transformers builds from that very file. Each case bundles several
variants; every prompt set has one prompt past the sliding window (8) and past
``original_max_position_embeddings`` (32). Settings heron cannot run must stop the load with an
error naming them. Vision-language checkpoints (Gemma 3 4B+, Mistral Small 3.1) are served
text-only: their reference is transformers' vision-language model on the same text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import heron
from heron.engine.core import resolve_dtype
from tests.model_harness import argmax_continuation, auto_model_class, make_hf_model

LOGPROB_ATOL = 2e-4
PROMPT_LENS = (40, 7)  # 40: past every window and every original_max_position_embeddings
NEW_TOKENS = 16
SIZES = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, num_hidden_layers=2, rms_norm_eps=1e-6, bos_token_id=1,
             eos_token_id=2)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def _llama(**fields: Any) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SIZES,
            "max_position_embeddings": 128, "hidden_act": "silu", "rope_theta": 10000.0,
            "tie_word_embeddings": False, **fields}


def _mistral(**fields: Any) -> dict[str, Any]:
    return {**_llama(**fields), "architectures": ["MistralForCausalLM"], "model_type": "mistral"}


def _qwen2(**fields: Any) -> dict[str, Any]:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **SIZES,
            "max_position_embeddings": 128, "hidden_act": "silu", "rope_theta": 1000000.0,
            "tie_word_embeddings": True, **fields}


def _qwen3(**fields: Any) -> dict[str, Any]:
    return {**_qwen2(head_dim=32, attention_bias=False, **fields),
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}


def _gemma3(**fields: Any) -> dict[str, Any]:
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **SIZES,
            "num_hidden_layers": 3, "max_position_embeddings": 256, "head_dim": 32,
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 24,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 8,
            "sliding_window_pattern": 2, "attn_logit_softcapping": None,
            "final_logit_softcapping": None, **fields}


def _mpt(attn: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    attn_config = {"alibi": True, "alibi_bias_max": 8, "attn_type": "multihead_attention",
                   "clip_qkv": None, "qk_ln": False, "prefix_lm": False, "softmax_scale": None,
                   "attn_uses_sequence_id": False, **(attn or {})}
    return {"architectures": ["MptForCausalLM"], "model_type": "mpt", "d_model": 96,
            "n_heads": 6, "n_layers": 2, "expansion_ratio": 4, "max_seq_len": 128,
            "vocab_size": 256, "no_bias": True, "norm_type": "low_precision_layernorm",
            "logit_scale": None, "attn_config": attn_config, **fields}


# Vision towers of vision-language checkpoints (4 image tokens); heron skips their weights.
SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
          "vision_use_head": False}
PIXTRAL = {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "head_dim": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14}


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "architectures"}


def _gemma3_vision(**fields: Any) -> dict[str, Any]:
    """Gemma 3 4B-IT's config.json: the text model under text_config (4.x keys), a SigLIP tower."""
    return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
            "mm_tokens_per_image": 4, "text_config": _text_config(_gemma3(**fields)),
            "vision_config": SIGLIP}


def _mistral3_vision(text: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mistral Small 3.1's config.json, a Pixtral tower; untied: its language_model.lm_head
    weight is loaded. (The published file leaves the top-level tie_word_embeddings out, which
    transformers 5 reads as tied; it is written here so that the reference agrees.)"""
    return {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
            "image_token_index": 10, "multimodal_projector_bias": False,
            "projector_hidden_act": "gelu", "spatial_merge_size": 2, "vision_feature_layer": -1,
            "text_config": text or _text_config(_mistral(head_dim=32, sliding_window=None)),
            "vision_config": PIXTRAL, "tie_word_embeddings": False}


# transformers 4.52-4.57 saved vision-language models under these prefixes instead.
LAYOUT_4_52 = {"language_model.model.": "model.language_model.",
               "language_model.lm_head.": "lm_head.", "vision_tower.": "model.vision_tower.",
               "multi_modal_projector.": "model.multi_modal_projector."}


@dataclass(frozen=True)
class Case:
    config: dict[str, Any]
    torch_dtype: torch.dtype = torch.float32  # the checkpoint's dtype (and config torch_dtype)
    max_shard_size: str | None = None  # set: several shards and model.safetensors.index.json
    prefixes: dict[str, str] | None = None  # set: tensor names renamed by prefix after saving


CASES: dict[str, Callable[[], Case]] = {
    # YaRN without original_max_position_embeddings: transformers takes max_position_embeddings
    # (32), so the model's context is 32 x 4; biases on attention and MLP; gelu-tanh; head_dim 32
    # with hidden 64 / 4 heads; tied embeddings.
    "llama_yarn_no_original": lambda: Case(_llama(
        max_position_embeddings=32, rope_scaling={"type": "yarn", "factor": 4.0},
        attention_bias=True, mlp_bias=True, hidden_act="gelu_pytorch_tanh", head_dim=32,
        tie_word_embeddings=True)),
    "llama_yarn_mscale_bf16_shards": lambda: Case(
        _llama(rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 1.0}),
        torch_dtype=torch.bfloat16, max_shard_size="40KB"),
    "llama_yarn_attention_factor": lambda: Case(_llama(rope_scaling={
        **YARN, "attention_factor": 0.8, "beta_fast": 16, "beta_slow": 2, "truncate": False})),
    # A top-level original_max_position_embeddings (Phi-3 style) overrides rope_scaling's.
    "llama_yarn_top_level_original": lambda: Case(_llama(
        original_max_position_embeddings=16, rope_scaling=dict(YARN))),
    "llama3_rope_scaling": lambda: Case(_llama(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    # Mistral-Nemo's head_dim (not hidden / heads) with Mistral 7B v0.1's window, float16 file.
    "mistral_head_dim_window_fp16": lambda: Case(_mistral(head_dim=32, sliding_window=8),
                                                 torch_dtype=torch.float16),
    # Qwen2.5: a window in the config but use_sliding_window false (it must stay off, here
    # smaller than the prompt); YaRN as its README enables it (original = max_position).
    "qwen2_window_off_yarn": lambda: Case(_qwen2(
        use_sliding_window=False, sliding_window=8, max_window_layers=1,
        max_position_embeddings=32, rope_scaling={"type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 32})),
    # Qwen3 head_dim 32 (hidden 64 / 4 heads), the window on layers >= max_window_layers.
    "qwen3_head_dim_window_bf16_shards": lambda: Case(
        _qwen3(use_sliding_window=True, sliding_window=8, max_window_layers=1),
        torch_dtype=torch.bfloat16, max_shard_size="40KB"),
    # Gemma 3 4B's 4.x config: linear x8 on global layers only, rope_local_base_freq on local
    # ones, every 2nd layer global, query_pre_attn_scalar != head_dim, null softcaps, untied.
    "gemma3_published_4x": lambda: Case(_gemma3(tie_word_embeddings=False)),
    "mpt_clip_qkv": lambda: Case(_mpt(attn={"clip_qkv": 0.5})),
    # Vision-language checkpoints served text-only: the language model of each, the vision
    # weights skipped, in the layout of the published files and in transformers 4.52's.
    "gemma3_vision_language_bf16": lambda: Case(_gemma3_vision(), torch_dtype=torch.bfloat16),
    "gemma3_vision_language_4_52_layout": lambda: Case(_gemma3_vision(), prefixes=LAYOUT_4_52),
    "mistral3_vision_language_shards": lambda: Case(_mistral3_vision(), max_shard_size="40KB"),
    "mistral3_vision_language_4_52_layout": lambda: Case(_mistral3_vision(),
                                                         prefixes=LAYOUT_4_52),
}


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _write_checkpoint(case: Case, path: Path) -> torch.nn.Module:
    """Save a random model of ``case.config`` as published (config.json as given); returns
    transformers' float32 model of that directory."""
    (path / "src").mkdir(parents=True)
    (path / "src" / "config.json").write_text(json.dumps(case.config))
    hf = make_hf_model(transformers.AutoConfig.from_pretrained(path / "src"), seed=1)
    out = path / "model"
    hf.to(case.torch_dtype).save_pretrained(out, max_shard_size=case.max_shard_size or "1GB")
    torch_dtype = str(case.torch_dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps({**case.config, "torch_dtype": torch_dtype}))
    assert (out / "model.safetensors.index.json").is_file() == (case.max_shard_size is not None)
    reference = auto_model_class(hf.config).from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager").eval()
    if case.prefixes:
        _rename_weights(out, case.prefixes)
    return reference


def _rename_weights(directory: Path, prefixes: dict[str, str]) -> None:
    from safetensors.torch import load_file, save_file

    def renamed(name: str) -> str:
        old = next((p for p in prefixes if name.startswith(p)), "")
        return prefixes.get(old, "") + name[len(old):]

    for path in directory.glob("*.safetensors"):
        weights = {renamed(name): tensor for name, tensor in load_file(path).items()}
        save_file(weights, path, metadata={"format": "pt"})


def _llm(path: Path, dtype: str = "float32") -> heron.LLM:
    return heron.LLM(str(path), dtype=dtype, skip_tokenizer_init=True, block_size=4,
                     kv_cache_memory="8MiB", max_num_batched_tokens=12)


def _assert_logprobs(hf: torch.nn.Module, prompt: list[int], output: heron.RequestOutput,
                     atol: float) -> None:
    """Every prompt and sampled top-5 log-probability against transformers' on the same text."""
    tokens = prompt + list(output.outputs[0].token_ids)
    with torch.no_grad():
        reference = hf(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].log_softmax(-1)
    entries = list(output.prompt_logprobs or [])[1:] + list(output.outputs[0].logprobs or [])
    assert len(entries) == len(tokens) - 1
    for i, entry in enumerate(entries):
        assert entry is not None and len(entry) >= 5
        for token, logprob in entry.items():
            assert abs(logprob.logprob - float(reference[i, token])) <= atol, (i, token)


@pytest.mark.parametrize("name", list(CASES))
def test_published_config_matches_transformers(name: str, tmp_path: Path) -> None:
    case = CASES[name]()
    hf = _write_checkpoint(case, tmp_path)
    llm = _llm(tmp_path / "model")
    prompts = _prompts(hf.config.get_text_config().vocab_size)
    params = heron.SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                                  logprobs=5, prompt_logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert list(output.outputs[0].token_ids) == argmax_continuation(hf, prompt, NEW_TOKENS)
        _assert_logprobs(hf, prompt, output, LOGPROB_ATOL)


@pytest.mark.parametrize(("config", "expected"), [
    (_qwen2(max_position_embeddings=32768, rope_scaling={  # Qwen2.5's README
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}), 131072),
    (_qwen3(max_position_embeddings=40960, rope_scaling={**YARN, "factor": 4.0,  # Qwen3's
                                                         "original_max_position_embeddings": 32768}),
     131072),
    (_llama(max_position_embeddings=163840, rope_scaling={  # DeepSeek style: already scaled
        **YARN, "factor": 40.0, "original_max_position_embeddings": 4096}), 163840),
    (_llama(max_position_embeddings=4096, rope_scaling={"type": "yarn", "factor": 2.0}), 8192),
    (_gemma3(max_position_embeddings=131072), 131072),  # linear: the field is already scaled
    (_mpt(), 128),
])
def test_yarn_extends_the_context_length(config: dict[str, Any], expected: int,
                                         tmp_path: Path) -> None:
    from heron.engine.core import _model_max_len

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _model_max_len(transformers.AutoConfig.from_pretrained(tmp_path)) == expected


def test_generation_config_eos_list_stops_on_each(tmp_path: Path) -> None:
    """generation_config.json's eos_token_id list (Llama 3 / Qwen2.5 Instruct style) beside a
    single config.json eos: greedy generation stops at whichever listed token comes first."""
    hf = _write_checkpoint(Case(_qwen2(use_sliding_window=False, sliding_window=8)), tmp_path)
    prompts = _prompts(hf.config.vocab_size)
    free = [argmax_continuation(hf, p, NEW_TOKENS) for p in prompts]
    first = next(t for t in free[0][1:] if t not in free[1])  # only the first prompt makes it
    second = next(t for t in free[1][1:] if t not in free[0])  # only the second one
    config_eos = next(t for t in range(3, 320) if t not in free[0] + free[1])
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "eos_token_id": config_eos}))
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [first, second], "do_sample": False}))
    llm = _llm(tmp_path / "model")
    params = heron.SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for output, continuation, eos in zip(outputs, free, (first, second), strict=True):
        end = continuation.index(eos) + 1
        completion = output.outputs[0]
        assert list(completion.token_ids) == continuation[:end]
        assert (completion.finish_reason, completion.stop_reason) == ("stop", None)  # EOS: None


def test_float16_checkpoint_with_dtype_auto(tmp_path: Path) -> None:
    """``torch_dtype: float16`` does not make heron compute in float16 (whose range a model's
    activations can overflow): auto is bfloat16 where the CPU has fast bf16, else float32;
    the float16 weights convert exactly, and the log-probabilities stay near float32's."""
    hf = _write_checkpoint(Case(_qwen3(), torch_dtype=torch.float16), tmp_path)
    llm = heron.LLM(str(tmp_path / "model"), skip_tokenizer_init=True, kv_cache_memory="8MiB")
    expected = resolve_dtype("auto", torch.device("cpu"))
    assert expected in (torch.bfloat16, torch.float32)
    assert llm.engine.info.dtype == str(expected).removeprefix("torch.")
    prompt = _prompts(hf.config.vocab_size)[0]
    params = heron.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=5,
                                  prompt_logprobs=5)
    output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    _assert_logprobs(hf, prompt, output, 1.0 if expected == torch.bfloat16 else LOGPROB_ATOL)


def test_float16_dtype_refuses_weights_past_its_range(tmp_path: Path) -> None:
    """``dtype="float16"`` on a bfloat16 checkpoint with a weight past 65504: a silent cast
    would make it inf and every logit NaN; the load stops and names the weight."""
    from safetensors.torch import load_file, save_file

    _write_checkpoint(Case(_llama(), torch_dtype=torch.bfloat16), tmp_path)
    path = tmp_path / "model" / "model.safetensors"
    weights = load_file(path)
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = -1e5
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj.weight' holds values "
                                         r"past float16's range \(\|x\| up to 9.984e\+04"):
        heron.LLM(str(tmp_path / "model"), dtype="float16", skip_tokenizer_init=True,
                  kv_cache_memory="8MiB")


# Settings heron cannot run: the load stops with an error naming the setting.
UNSUPPORTED: dict[str, tuple[dict[str, Any], str]] = {
    "dynamic_ntk": (_llama(rope_scaling={"type": "dynamic", "factor": 2.0}),
                    r"rope_type 'dynamic' \(the config's rope_scaling"),
    "longrope": (_llama(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                      "long_factor": [2.0] * 8,
                                      "original_max_position_embeddings": 32}),
                 "rope_type 'longrope'"),
    "gemma3_attn_softcap": (_gemma3(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    "mpt_qk_ln": (_mpt(attn={"qk_ln": True}), r"attn_config.qk_ln=True"),
    "mpt_no_alibi": (_mpt(attn={"alibi": False}), "without ALiBi"),
    "mpt_multiquery": (_mpt(attn={"attn_type": "multiquery_attention"}),
                       "attn_config.attn_type='multiquery_attention'"),
    "mpt_biases": (_mpt(no_bias=False), "no_bias=False"),
    "mpt_logit_scale": (_mpt(logit_scale="inv_sqrt_d_model"), "logit_scale='inv_sqrt_d_model'"),
    "mpt_rmsnorm": (_mpt(norm_type="rmsnorm"), "norm_type='rmsnorm'"),
    "mpt_glu": (_mpt(ffn_config={"ffn_type": "mptglu"}), "ffn_config.ffn_type='mptglu'"),
    # Ministral 3's text model (position-dependent query scaling) is not Mistral's.
    "mistral3_ministral3_text": (_mistral3_vision({**_text_config(_mistral()),
                                                   "model_type": "ministral3"}),
                                 "Mistral3ForConditionalGeneration with a 'ministral3' text model"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_setting_fails_at_load(name: str, tmp_path: Path) -> None:
    config, message = UNSUPPORTED[name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        heron.LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, load_format="dummy",
                  kv_cache_memory="8MiB")
