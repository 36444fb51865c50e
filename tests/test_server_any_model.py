"""End to end: `heron serve MODEL` with a model directory (a tiny random Llama with its own
character-level tokenizer) answers exactly what the offline LLM computes for that model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from heron import LLM, SamplingParams
from tests.server_utils import RemoteServer
from tests.tiny_models import save_char_tokenizer

PROMPTS = ["Hello", "The quick brown fox"]
VOCAB = 512


def save_tiny_llama(path: Path) -> Path:
    """A random 2-layer Llama (float32), weights spread so greedy choices are far from ties."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    save_char_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[RemoteServer]:
    with RemoteServer([str(model_dir), "--kv-cache-memory", "16MiB"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), kv_cache_memory=16 << 20)


def test_model_is_listed_under_its_path(server: RemoteServer, model_dir: Path) -> None:
    models = httpx.get(server.url("/v1/models")).json()["data"]
    assert [(m["id"], m["root"], m["max_model_len"]) for m in models] == [
        (str(model_dir), str(model_dir), 1024)
    ]


def test_completions_equal_offline_llm(server: RemoteServer, model_dir: Path, llm: LLM) -> None:
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = llm.generate(PROMPTS, params, use_tqdm=False)
    r = server.client().completions.create(
        model=str(model_dir),
        prompt=PROMPTS,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in r.choices] == [e.outputs[0].text for e in expected]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert r.usage.completion_tokens == 24


def test_chat_equals_offline_llm_chat(server: RemoteServer, model_dir: Path, llm: LLM) -> None:
    messages = [{"role": "user", "content": "Hi!"}]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = llm.chat(messages, params, use_tqdm=False)[0]
    r = server.client().chat.completions.create(
        model=str(model_dir),
        messages=messages,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].message.content == expected.outputs[0].text
    assert (
        r.usage.prompt_tokens
        == len(expected.prompt_token_ids)
        == len("<s><user>Hi!\n<assistant>") - 2
    )


def test_seeded_sampling_equals_offline_llm(
    server: RemoteServer, model_dir: Path, llm: LLM
) -> None:
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=2, ignore_eos=True)
    expected = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]
    r = server.client().completions.create(
        model=str(model_dir),
        prompt=PROMPTS[0],
        max_tokens=8,
        temperature=1.0,
        seed=7,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in r.choices] == [o.text for o in expected.outputs]
