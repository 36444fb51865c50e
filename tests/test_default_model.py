"""The embedded default model (Gemma 3 270M, Q4_K_M GGUF) against transformers loading the same file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from heron import LLM, SamplingParams
from heron.loader.default_model import default_gguf_path
from tests.model_harness import argmax_continuation

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5,",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    # float32 weights as loaded (no int8 copies): token-for-token equality with transformers
    return LLM(dtype="float32", quantization="none")


@pytest.fixture(scope="module")
def reference() -> transformers.PreTrainedModel:
    path = Path(default_gguf_path())
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_greedy_tokens_equal_transformers(llm: LLM, reference: transformers.PreTrainedModel) -> None:
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out in outs:
        ref = argmax_continuation(reference, list(out.prompt_token_ids), 24)
        assert list(out.outputs[0].token_ids) == ref, out.prompt
        assert out.outputs[0].text == llm.get_tokenizer().decode(out.outputs[0].token_ids)


def test_prompt_starts_with_bos(llm: LLM) -> None:
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)[0]
    assert out.prompt_token_ids[0] == 2  # <bos>


def test_chat_uses_gemma_turn_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    out = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    expected = "<bos><start_of_turn>user\nSay hello.<end_of_turn>\n<start_of_turn>model\n"
    assert tok.decode(out.prompt_token_ids, skip_special_tokens=False) == expected
    assert out.outputs[0].finish_reason in ("stop", "length")
    assert len(out.outputs[0].token_ids) <= 8
