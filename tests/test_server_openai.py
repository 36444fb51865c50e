"""End to end: the `openai` SDK against a real `heron serve` (the default model)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from heron.config import ModelConfig
from heron.tokenizer import Tokenizer, load_tokenizer
from tests.server_utils import DEFAULT_MODEL_NAME, RemoteServer

pytestmark = pytest.mark.slow

MODEL = DEFAULT_MODEL_NAME
MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that translates English to Italian.",
    },
    {
        "role": "user",
        "content": "Translate the following sentence from English to Italian: I love programming.",
    },
]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    with RemoteServer(["--served-model-name", MODEL, "--kv-cache-memory", "256MiB"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(ModelConfig())


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


# ---- chat -----------------------------------------------------------------------------------------


def test_chat_usage_and_length(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(chat_prompt_ids(tokenizer, MESSAGES))
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    assert choice.message.content and len(tokenizer.encode(choice.message.content, False)) <= 6


def test_chat_equals_completion_of_rendered_prompt(
    client: openai.OpenAI, tokenizer: Tokenizer
) -> None:
    """The chat endpoint is the template plus the completions path: same tokens, same text."""
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0
    )
    comp = client.completions.create(
        model=MODEL, prompt=chat_prompt_ids(tokenizer, MESSAGES), max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content == comp.choices[0].text
    assert chat.usage.prompt_tokens == comp.usage.prompt_tokens


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_n2_greedy_and_streamed(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, n=2
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content
    assert r.usage.completion_tokens == 8
    texts = {0: "", 1: ""}
    roles: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, n=2, stream=True
    ):
        for c in chunk.choices:
            if c.delta.role:
                roles[c.index] = c.delta.role
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    assert finish == {0: "length", 1: "length"}
    assert texts == {0: r.choices[0].message.content, 1: r.choices[1].message.content}


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] <= 0.0
        # Greedy: the chosen token is the most likely one.
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(values[0], abs=1e-5)
        assert entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_chat_stop_string(client: openai.OpenAI) -> None:
    base = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    text = base.choices[0].message.content
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    cut = text[: text.index(stop)]
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stop=[stop]
    )
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop  # vLLM's extra field
    assert r.usage.completion_tokens < 12
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stop=stop, stream=True
        )
        if c.choices
    )
    assert streamed == cut


def test_chat_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0)
    a = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    assert a == b
    # n choices are seeded seed, seed + 1, ...: reproducible as a set, and not all alike.
    pair = [
        c.message.content for c in client.chat.completions.create(seed=99, n=2, **kwargs).choices
    ]
    again = [
        c.message.content for c in client.chat.completions.create(seed=99, n=2, **kwargs).choices
    ]
    assert pair == again
    assert pair[0] != pair[1]


def test_chat_include_stop_str_in_output(client: openai.OpenAI) -> None:
    base = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    text = base.choices[0].message.content
    stop = text.split()[2]
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stop=[stop],
        extra_body={"include_stop_str_in_output": True},
    )
    assert r.choices[0].message.content == text[: text.index(stop) + len(stop)]


def test_chat_continue_final_message(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": "Io amo"}]
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=3,
        temperature=0,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    )
    rendered = tokenizer.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert rendered.endswith("Io amo")
    assert r.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


def test_logit_bias_forces_a_token(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    (paris,) = tokenizer.encode(" Paris", add_special_tokens=False)
    r = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logit_bias={str(paris): 100}
    )
    assert r.choices[0].text == " Paris" * 3


# ---- completions ----------------------------------------------------------------------------------


def test_completion_usage_stream_and_non_stream(
    client: openai.OpenAI, tokenizer: Tokenizer
) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.model_dump() == r.usage.model_dump()


def test_completion_prompt_forms(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    batch = client.completions.create(
        model=MODEL, prompt=[PROMPT, "1, 2, 3,"], max_tokens=4, temperature=0, n=2
    )
    id_batch = client.completions.create(
        model=MODEL, prompt=[ids, ids], max_tokens=4, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == by_text.choices[0].text
    assert batch.choices[2].text != batch.choices[0].text
    assert batch.usage.prompt_tokens == len(ids) + len(tokenizer.encode("1, 2, 3,"))
    assert batch.usage.completion_tokens == 16
    assert [c.text for c in id_batch.choices] == [by_text.choices[0].text] * 2


def test_completion_echo_and_logprobs(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    choice = r.choices[0]
    assert choice.text == PROMPT + plain.choices[0].text
    lp = choice.logprobs
    n_prompt = len(tokenizer.encode(PROMPT))
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0.0 for v in lp.token_logprobs[1:])
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert lp.tokens[0] == "<bos>" and lp.text_offset[:2] == [0, 0]  # bos takes no room in the text
    for token, offset in zip(lp.tokens[1:], lp.text_offset[1:], strict=True):
        assert choice.text[offset : offset + len(token)] == token
    # Greedy completion tokens are the most likely ones.
    for token, value, top in zip(
        lp.tokens[n_prompt:], lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:], strict=True
    ):
        assert max(top.values()) == pytest.approx(value, abs=1e-5) and top[token] == pytest.approx(
            value, abs=1e-5
        )


def test_completion_stop_token_ids_and_ignore_eos(
    client: openai.OpenAI, tokenizer: Tokenizer
) -> None:
    base = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0
    )
    tokens = base.choices[0].logprobs.tokens
    stop_id = tokenizer.encode(tokens[2], add_special_tokens=False)[0]
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        extra_body={"stop_token_ids": [stop_id]},
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop_id
    assert r.usage.completion_tokens == 3
    assert r.choices[0].text == "".join(tokens[:2])


# ---- the other endpoints --------------------------------------------------------------------------


def test_models(client: openai.OpenAI, server: RemoteServer) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_tokenize_detokenize(server: RemoteServer, tokenizer: Tokenizer) -> None:
    r = httpx.post(server.url("/tokenize"), json={"model": MODEL, "prompt": PROMPT}).json()
    assert r["tokens"] == tokenizer.encode(PROMPT) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] > 0
    chat = httpx.post(server.url("/tokenize"), json={"messages": MESSAGES}).json()
    assert chat["tokens"] == chat_prompt_ids(tokenizer, MESSAGES)
    back = httpx.post(server.url("/detokenize"), json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": PROMPT}


def test_health_version_docs(server: RemoteServer) -> None:
    from heron import __version__

    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/version")).json() == {"version": __version__}
    spec = httpx.get(server.url("/openapi.json")).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize"} <= set(
        spec["paths"]
    )
    assert httpx.get(server.url("/docs")).status_code == 200


def test_metrics_names(server: RemoteServer, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    text = httpx.get(server.url("/metrics")).text
    for name in (
        "heron:num_requests_running",
        "heron:num_requests_waiting",
        "heron:kv_cache_usage_perc",
        "heron:prefix_cache_queries_total",
        "heron:prefix_cache_hits_total",
        "heron:num_preemptions_total",
        "heron:prompt_tokens_total",
        "heron:generation_tokens_total",
        "heron:time_to_first_token_seconds_bucket",
        "heron:inter_token_latency_seconds_bucket",
        "heron:e2e_request_latency_seconds_count",
        "heron:request_success_total",
    ):
        assert f"\n{name}{{" in text, name
