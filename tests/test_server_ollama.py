"""End to end: Ollama's API through the ``ollama`` client and langchain-ollama, against
`heron serve` with the default model and an API key.

An Ollama request is a chat (or a completion, with ``raw``) in other clothes: the same request
through the OpenAI routes gives the same tokens and counts at temperature 0 (and with the same
seed when sampling). Errors answer ``{"error": "message"}`` with Ollama's status codes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import ollama
import pytest
from fastapi.testclient import TestClient

from heron.engine.client import EngineError
from heron.engine.messages import EngineOutput
from heron.server.app import build_app
from heron.server.inputs import Limits
from heron.server.ollama import tagged
from heron.server.protocol import ndjson_line
from heron.server.protocol_ollama import ChatRequest, GenerateRequest, OllamaOptions, human_count
from tests.fake_engine import MODEL as FAKE_MODEL
from tests.fake_engine import FakeEngine, char_tokenizer_for_serving, serving_context, tokens
from tests.server_utils import DEFAULT_MODEL_NAME, RemoteServer

MODEL = DEFAULT_MODEL_NAME
TAGGED = f"{MODEL}:latest"
KEY = "sk-heron-ollama"
AUTH = {"Authorization": f"Bearer {KEY}"}
SYSTEM = "Answer in one short sentence."
QUESTION = "What is the capital of France?"
GREEDY = {"temperature": 0, "num_predict": 12}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
# A conversation in which this small model goes on to call the tool.
TOOL_TURNS = [
    {"role": "user", "content": "What is the weather in Rome?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "tool_name": "get_weather", "content": "Sunny, 25 C."},
    {"role": "assistant", "content": "It is sunny in Rome."},
    {"role": "user", "content": "What is the weather in Paris?"},
]


# ---- without a server -------------------------------------------------------------------------


def test_options_map_onto_sampling_params() -> None:
    options = OllamaOptions.model_validate({
        "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7,
        "num_predict": 30, "stop": ["\n"], "repeat_penalty": 1.1, "presence_penalty": 0.5,
        "frequency_penalty": 0.25, "repeat_last_n": -1, "num_ctx": 4096, "num_gpu": 99,
        "mirostat": 0, "tfs_z": 1.0, "not_an_option": True})
    params = options.to_sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.seed) == (
        0.7, 0.9, 40, 0.05, 7)
    assert (params.max_tokens, params.stop, params.repetition_penalty) == (30, ["\n"], 1.1)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, 0.25)
    assert options.ignored() == ["not_an_option", "num_ctx", "num_gpu"]


@pytest.mark.parametrize("num_predict", [None, -1, -2, 0])
def test_num_predict_without_a_limit_runs_to_the_context(num_predict: int | None) -> None:
    params = OllamaOptions(num_predict=num_predict).to_sampling_params()
    assert params.max_tokens is None and OllamaOptions(seed=-1).to_sampling_params().seed is None


@pytest.mark.parametrize("options,message", [
    ({"mirostat": 2}, "options.mirostat: 2 is not supported by this server (only 0"),
    ({"tfs_z": 0.9}, "options.tfs_z: 0.9 is not supported"),
    ({"typical_p": 0.5}, "options.typical_p: 0.5 is not supported"),
    ({"repeat_penalty": 1.2, "repeat_last_n": 64},
     "options.repeat_last_n: 64 is not supported by this server: its penalties look at the "
     "whole context (-1)"),
])
def test_options_that_would_change_the_output_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        OllamaOptions.model_validate(options).to_sampling_params()
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("options,message", [
    ({"seed": 2**64}, "options.seed must fit in 64 bits, got 18446744073709551616"),
    ({"seed": -(2**63) - 1}, "options.seed must fit in 64 bits, got -9223372036854775809"),
    ({"num_predict": 2**64}, "options.num_predict must be a 64-bit integer, got 1844674407"),
    ({"repeat_penalty": 0}, "options.repeat_penalty must be in (0, 2], got 0"),
    ({"repeat_penalty": float("nan")}, "options.repeat_penalty must be in (0, 2], got nan"),
    ({"top_k": -5}, "options.top_k must be -1, 0 (disabled) or a positive integer, got -5"),
    ({"temperature": float("inf")}, "options.temperature must be in [0, 2], got inf"),
])
def test_options_out_of_range_are_refused_in_ollamas_names(options: dict, message: str) -> None:
    """A seed past 64 bits was taken (masked) where /v1 refuses it; num_predict and
    repeat_penalty errors named heron's max_tokens and repetition_penalty."""
    with pytest.raises(ValueError) as err:
        OllamaOptions.model_validate(options).to_sampling_params()
    assert str(err.value).startswith(message), err.value
    assert OllamaOptions(seed=2**64 - 1).to_sampling_params().seed == 2**64 - 1


def test_names_and_sizes_as_ollama_shows_them() -> None:
    assert tagged("gemma-3-270m") == "gemma-3-270m:latest"
    assert tagged("llama3.2:3b") == "llama3.2:3b" and tagged("a/b") == "a/b:latest"
    assert [human_count(n) for n in (268098176, 8030261248, 999, 0)] == [
        "268.10M", "8.0B", "999", "unknown"]


def test_ndjson_lines_escape_the_line_breaks_json_leaves_raw() -> None:
    line = ndjson_line(json.dumps({"response": "a\u2028b\x85c\u2029d"}, ensure_ascii=False))
    assert line.splitlines() == ['{"response": "a\\u2028b\\u0085c\\u2029d"}']
    assert json.loads(line) == {"response": "a\u2028b\x85c\u2029d"}


def fake_client(*outputs: EngineOutput | Exception, **config: object) -> TestClient:
    engine = FakeEngine(lambda request: list(outputs))
    ctx = serving_context(engine, char_tokenizer_for_serving(), **config)
    return TestClient(build_app(ctx.config, ctx), base_url="http://127.0.0.1")


def test_show_lists_thinking_where_a_reasoning_parser_runs() -> None:
    """Ollama's clients read ``capabilities`` before they send ``think`` (which these routes
    refuse unless a reasoning parser runs); "thinking" was never listed."""
    for config, capabilities in (({}, ["completion", "tools"]),
                                 ({"reasoning_parser": "qwen3"}, ["completion", "tools", "thinking"])):
        client = fake_client(*tokens("a"), **config)
        shown = client.post("/api/show", json={"model": FAKE_MODEL})
        assert shown.status_code == 200, shown.text
        assert shown.json()["capabilities"] == capabilities


def test_curl_d_is_read_as_json_on_the_ollama_routes() -> None:
    """``curl URL -d '{...}'`` (how Ollama's docs write every call) labels the body a form:
    read as JSON on /api/ paths (it was a 415). With an Origin (a browser's form post) and on
    the OpenAI routes it stays a 415."""
    client = fake_client(*tokens("ab"))
    form = {"content-type": "application/x-www-form-urlencoded"}
    body = json.dumps({"model": FAKE_MODEL, "prompt": "x", "raw": True, "stream": False})
    r = client.post("/api/generate", content=body, headers=form)
    assert r.status_code == 200, r.text
    assert r.json()["response"] == "ab"
    refused = {"error": "Content-Type must be application/json, got "
                        "'application/x-www-form-urlencoded'"}
    r = client.post("/api/generate", content=body,
                    headers={**form, "origin": "http://page.example"})
    assert (r.status_code, r.json()) == (415, refused)
    r = client.post("/v1/completions", content=json.dumps({"prompt": "x"}), headers=form)
    assert r.status_code == 415


def test_think_false_turns_a_templates_thinking_off() -> None:
    limits = Limits(max_n=1, max_logprobs=0, vocab_size=100)
    chat = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user",
                                                                   "content": "x"}]})
    generate = GenerateRequest.model_validate({"model": "m", "prompt": "x"})
    for request in (chat, generate):
        assert request.to_spec(limits).input.template_kwargs == {}  # type: ignore[union-attr]
        off = request.model_copy(update={"think": False}).to_spec(limits)
        assert off.input.template_kwargs == {"enable_thinking": False}  # type: ignore[union-attr]


def test_a_thinking_models_reasoning_is_its_thinking_field() -> None:
    """With a reasoning parser, ``<think>...</think>`` goes to ``message.thinking`` (chat) or
    ``thinking`` (generate), streamed and whole, as Ollama answers; ``think: false`` drops it."""
    cases = (("/api/chat", {"messages": [{"role": "user", "content": "x"}]},
              lambda j: j["message"]["content"], lambda j: j["message"].get("thinking")),
             ("/api/generate", {"prompt": "x"}, lambda j: j["response"], lambda j: j.get("thinking")))
    for path, body, text_of, thinking_of in cases:
        client = fake_client(*tokens("<think>Plan", " it.</thi", "nk>Hi"), reasoning_parser="qwen3")
        request = {"model": FAKE_MODEL, **body}
        whole = client.post(path, json={**request, "stream": False}).json()
        assert (thinking_of(whole), text_of(whole)) == ("Plan it.", "Hi")
        lines = [json.loads(line) for line in client.post(path, json=request).text.splitlines()]
        assert "".join(thinking_of(line) or "" for line in lines) == "Plan it."
        assert "".join(text_of(line) for line in lines) == "Hi" and lines[-1]["done"]
        off = client.post(path, json={**request, "think": False, "stream": False}).json()
        assert (thinking_of(off), text_of(off)) == (None, "Hi")


def test_fields_ollama_does_not_have_are_ignored_as_ollama_ignores_them() -> None:
    """Top level and inside a message (Ollama's JSON decoding drops them; its clients may send
    some): the same answer as without them, where the OpenAI routes answer a 400."""
    client = fake_client(*tokens("ab"))
    user = {"role": "user", "content": "x"}
    plain = client.post("/api/chat", json={"model": FAKE_MODEL, "messages": [user],
                                           "stream": False})
    extra = client.post("/api/chat", json={"model": FAKE_MODEL, "stream": False,
                                           "messages": [{**user, "id": 7}], "tool_choice": "x"})
    assert plain.status_code == extra.status_code == 200, extra.text
    assert extra.json()["message"] == plain.json()["message"] == {"role": "assistant",
                                                                   "content": "ab"}
    openai = client.post("/v1/chat/completions", json={"model": FAKE_MODEL, "messages": [user],
                                                       "tool_choice_x": 1})
    assert openai.status_code == 400


def test_think_maps_onto_the_chat_template() -> None:
    limits = Limits(max_n=1, max_logprobs=0, vocab_size=100)
    chat = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user",
                                                                   "content": "x"}]})
    for think, kwargs in ((True, {"enable_thinking": True}),
                          ("high", {"reasoning_effort": "high", "enable_thinking": True})):
        spec = chat.model_copy(update={"think": think}).to_spec(limits)
        assert spec.input.template_kwargs == kwargs  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="think: 'extreme' is not one of none, minimal, low"):
        chat.model_copy(update={"think": "extreme"}).to_spec(limits)


def test_an_engine_failure_mid_stream_is_the_last_line() -> None:
    body = {"model": FAKE_MODEL, "prompt": "Hi", "raw": True}
    died = EngineError("the engine core process died")
    r = fake_client(*tokens("ab", finish=None), died).post("/api/generate", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert [line.get("response") for line in lines[:-1]] == ["ab"]
    assert lines[-1] == {"error": "the engine is unavailable: the engine core process died"}
    whole = fake_client(died).post("/api/generate", json={**body, "stream": False})
    assert whole.status_code == 503 and whole.json() == lines[-1]


FN_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("arguments", ['{"a": ' + "1" * 5000 + "}", "[" * 3000 + "]" * 3000],
                         ids=["int-past-4300-digits", "nested-3000-deep"])
def test_tool_call_arguments_python_cannot_read_are_an_empty_object(arguments: str) -> None:
    """The model writes the arguments: an integer past Python's 4300 digits (a ValueError, not
    a JSONDecodeError) or nesting past the recursion limit was a 500 (an error line when
    streamed) on /api/chat; they are ``{}``, as arguments that are no JSON are."""
    text = '<tool_call>{"name": "f", "arguments": ' + arguments + "}</tool_call>"
    body = {"model": FAKE_MODEL, "messages": USER, "tools": [FN_TOOL]}
    for stream in (False, True):
        client = fake_client(*tokens(text, finish="stop"), tool_call_parser="hermes")
        r = client.post("/api/chat", json={**body, "stream": stream})
        assert r.status_code == 200, r.text
        lines = [json.loads(line) for line in r.text.splitlines()]
        calls = [c for line in lines for c in line["message"].get("tool_calls", [])]
        assert [c["function"] for c in calls] == [{"index": 0, "name": "f", "arguments": {}}]
        assert lines[-1]["done"] and lines[-1]["done_reason"] == "stop"


# ---- the server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    with RemoteServer(["--served-model-name", MODEL, "--kv-cache-memory", "256MiB"],
                      api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> ollama.Client:
    return ollama.Client(host=server.base_url, headers=AUTH)


def openai_chat(server: RemoteServer, messages: list[dict], max_tokens: int = 12, **kw: object):
    kw.setdefault("temperature", 0)
    return server.client().chat.completions.create(model=MODEL, messages=messages,
                                                   max_tokens=max_tokens, **kw)


CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def twin(server: RemoteServer):  # noqa: ANN201 - the /v1/chat/completions answer
    return openai_chat(server, CHAT)


def test_generate_equals_chat_completions(client: ollama.Client, twin) -> None:  # noqa: ANN001
    r = client.generate(model=MODEL, prompt=QUESTION, system=SYSTEM, options=GREEDY)
    assert r.response == twin.choices[0].message.content and r.done is True
    assert r.prompt_eval_count == twin.usage.prompt_tokens
    assert r.eval_count == twin.usage.completion_tokens == 12
    assert r.done_reason == twin.choices[0].finish_reason == "length"
    assert r.model == MODEL and r.created_at.endswith("Z") and r.context is None
    assert r.total_duration >= r.prompt_eval_duration + r.eval_duration > 0
    assert r.load_duration == 0 and r.eval_duration > 0


def test_generate_streams_ndjson_by_default(server: RemoteServer, twin) -> None:  # noqa: ANN001
    body = {"model": TAGGED, "prompt": QUESTION, "system": SYSTEM, "options": GREEDY}
    with httpx.stream("POST", server.url("/api/generate"), json=body, headers=AUTH) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    *pieces, last = lines
    assert len(pieces) > 2 and all(p["done"] is False and set(p) == {
        "model", "created_at", "done", "response"} for p in pieces)
    assert "".join(p["response"] for p in pieces) == twin.choices[0].message.content
    assert last["done"] is True and last["response"] == "" and last["model"] == TAGGED
    assert last["done_reason"] == "length"
    assert (last["prompt_eval_count"], last["eval_count"]) == (twin.usage.prompt_tokens, 12)
    assert set(last) == {"model", "created_at", "done", "response", "done_reason",
                         "total_duration", "load_duration", "prompt_eval_count",
                         "prompt_eval_duration", "eval_count", "eval_duration"}


def test_raw_generate_equals_completions(server: RemoteServer, client: ollama.Client) -> None:
    prompt = "The capital of France is"
    r = client.generate(model=MODEL, prompt=prompt, raw=True, options=GREEDY)
    twin = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                              temperature=0)
    assert r.response == twin.choices[0].text
    assert (r.prompt_eval_count, r.eval_count) == (twin.usage.prompt_tokens,
                                                   twin.usage.completion_tokens)


def test_chat_stream_and_whole_equal_chat_completions(client: ollama.Client, twin) -> None:  # noqa: ANN001
    whole = client.chat(model=TAGGED, messages=CHAT, options=GREEDY)
    assert whole.message.role == "assistant" and whole.message.tool_calls is None
    assert whole.message.content == twin.choices[0].message.content
    assert (whole.prompt_eval_count, whole.eval_count) == (twin.usage.prompt_tokens, 12)
    parts = list(client.chat(model=TAGGED, messages=CHAT, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == 12 and parts[-1].done_reason == "length"


def test_stop_and_sampling_options(server: RemoteServer, client: ollama.Client, twin) -> None:  # noqa: ANN001
    words = twin.choices[0].message.content.split()
    stop = words[1]
    r = client.chat(model=MODEL, messages=CHAT, options={**GREEDY, "stop": [stop]})
    assert r.done_reason == "stop"
    assert r.message.content == twin.choices[0].message.content.split(stop)[0]
    sampled = {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 1234,
               "repeat_penalty": 1.2, "num_predict": 10}
    r = client.chat(model=MODEL, messages=CHAT, options=sampled)
    openai = openai_chat(server, CHAT, 10, temperature=0.9, top_p=0.95, seed=1234,
                         extra_body={"top_k": 20, "repetition_penalty": 1.2})
    assert r.message.content == openai.choices[0].message.content
    hints = {**GREEDY, "num_ctx": 4096, "num_gpu": 1, "num_thread": 2, "not_an_option": 1}
    assert client.chat(model=MODEL, messages=CHAT, options=hints).message.content == \
        twin.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_in_ollamas_shape(server: RemoteServer, client: ollama.Client,
                                     stream: bool) -> None:
    options = {"temperature": 0, "num_predict": 40}
    result = client.chat(model=MODEL, messages=TOOL_TURNS, tools=[WEATHER_TOOL],
                         options=options, stream=stream)
    parts = list(result) if stream else [result]
    calls = [c for p in parts for c in p.message.tool_calls or []]
    content = "".join(p.message.content or "" for p in parts)
    openai_turns = [dict(m) for m in TOOL_TURNS]
    openai_turns[1] = {"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_0", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Rome"})}}]}
    openai_turns[2] = {"role": "tool", "tool_call_id": "call_0", "name": "get_weather",
                       "content": "Sunny, 25 C."}
    twin = openai_chat(server, openai_turns, 40, tools=[WEATHER_TOOL])
    expected = twin.choices[0].message.tool_calls
    assert calls and len(calls) == len(expected) and content == ""
    assert calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == {"city": "Paris"}
    for call, want in zip(calls, expected, strict=True):
        assert call.function.name == want.function.name
        try:
            arguments = json.loads(want.function.arguments)
        except json.JSONDecodeError:  # a call cut off by num_predict: no arguments object
            arguments = {}
        assert call.function.arguments == arguments
    raw = httpx.post(server.url("/api/chat"), headers=AUTH, json={
        "model": MODEL, "messages": TOOL_TURNS, "tools": [WEATHER_TOOL], "stream": False,
        "options": options}).json()
    first = raw["message"]["tool_calls"][0]
    assert first["id"].startswith("call_") and first["function"]["index"] == 0


def test_format_json_schema(server: RemoteServer, client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"], "additionalProperties": False}
    messages = [{"role": "user", "content": "Name a city as JSON."}]
    r = client.chat(model=MODEL, messages=messages, format=schema,
                    options={"temperature": 0, "num_predict": 60})
    twin = openai_chat(server, messages, 60, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    assert r.message.content == twin.choices[0].message.content
    assert set(json.loads(r.message.content)) == {"city"} and r.done_reason == "stop"
    r = client.generate(model=MODEL, prompt="Name a city as JSON.", format="json",
                        options={"temperature": 0, "num_predict": 30})
    twin = openai_chat(server, messages, 30, response_format={"type": "json_object"})
    assert r.response == twin.choices[0].message.content and r.response.startswith("{")


def test_empty_prompt_or_messages_only_load(client: ollama.Client) -> None:
    r = client.generate(model=MODEL)
    assert (r.done, r.done_reason, r.response, r.eval_count) == (True, "load", "", None)
    c = client.chat(model=MODEL, messages=[])
    assert (c.done, c.done_reason, c.message.content) == (True, "load", "")


def test_embed_equals_openai_embeddings(server: RemoteServer, client: ollama.Client) -> None:
    texts = ["The capital of France is Paris.", "Bonjour"]
    r = client.embed(model=MODEL, input=texts)
    twin = server.client().embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert r.embeddings == [d.embedding for d in twin.data]
    assert r.prompt_eval_count == twin.usage.prompt_tokens and r.model == MODEL
    one = client.embed(model=MODEL, input=texts[1], dimensions=8)
    cut = server.client().embeddings.create(model=MODEL, input=texts[1], dimensions=8,
                                            encoding_format="float")
    assert one.embeddings == [cut.data[0].embedding] and len(one.embeddings[0]) == 8
    legacy = client.embeddings(model=MODEL, prompt=texts[0])
    assert list(legacy.embedding) == twin.data[0].embedding
    assert client.embed(model=MODEL, input="").embeddings == []


def test_catalogue(server: RemoteServer, client: ollama.Client) -> None:
    models = client.list().models
    assert [m.model for m in models] == [TAGGED]
    entry = models[0]
    assert entry.size == 253113024 and len(entry.digest) == 64
    assert entry.details.format == "gguf" and entry.details.family == "gemma3"
    assert entry.details.parameter_size == "268.10M"
    assert entry.details.quantization_level == "Q4_K_M"
    max_len = server.client().models.list().data[0].max_model_len
    shown = client.show(TAGGED)
    assert shown.capabilities == ["completion", "tools"] and shown.details == entry.details
    assert shown.modelinfo["gemma3.context_length"] == max_len
    assert shown.modelinfo["gemma3.embedding_length"] == 640
    running = client.ps().models
    assert [(m.model, m.context_length) for m in running] == [(TAGGED, max_len)]
    version = httpx.get(server.url("/api/version"), headers=AUTH).json()
    assert version == {"version": "0.9.0", "heron_version": "0.1.0"}
    assert httpx.head(server.url("/api/tags"), headers=AUTH).status_code == 200


def test_pulling_the_served_model_succeeds(client: ollama.Client) -> None:
    assert client.pull(TAGGED).status == "success"
    assert [p.status for p in client.pull(MODEL, stream=True)] == ["success"]


# ---- errors -----------------------------------------------------------------------------------

NOT_SERVED = (f'model "llama3.2" not found: this server serves "{TAGGED}" only (heron serves '
              "the model it was started with; it cannot pull others)")
CANNOT = (f'heron cannot {{}} models: it serves "{TAGGED}", the model it was started with '
          "(start heron with another model to serve that one)")
USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("method,path,body,status,message", [
    ("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"}, 404, NOT_SERVED),
    ("POST", "/api/chat", {"model": "llama3.2", "messages": USER}, 404, NOT_SERVED),
    ("POST", "/api/show", {"model": "llama3.2"}, 404, NOT_SERVED),
    ("POST", "/api/embed", {"input": "x"}, 400, "model is required"),
    ("POST", "/api/chat", {"model": MODEL, "messages": USER, "think": True}, 400,
     f'think: true is not supported: "{MODEL}" does not support thinking'),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "x", "think": "high"}, 400,
     f'think: "high" is not supported: "{MODEL}" does not support thinking'),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "x", "raw": True, "system": "s"}, 400,
     "raw: raw mode does not support template, system, or context"),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "x", "template": "{{ .Prompt }}"}, 400,
     "template: not supported by this server: the model's own chat template is always used"),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "x", "context": [1, 2]}, 400,
     "context: not supported by this server: send the conversation to /api/chat instead"),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "x", "images": ["aGk="]}, 400,
     "images: not supported by this server: this server takes text only"),
    ("POST", "/api/chat", {"model": MODEL, "messages": [
        {"role": "user", "content": "x", "images": ["aGk="]}]}, 400,
     "messages[0].images: not supported by this server: it takes text only"),
    ("POST", "/api/chat", {"model": MODEL, "messages": USER, "options": {"mirostat": 1}}, 400,
     "options.mirostat: 1 is not supported by this server (only 0, which leaves sampling "
     "unchanged)"),
    ("POST", "/api/chat", {"model": MODEL, "messages": USER, "options": {"top_k": "40"}}, 400,
     "options.top_k: Input should be a valid integer"),
    ("POST", "/api/chat", {"model": MODEL, "messages": USER, "options": {"temperature": -1}},
     400, "options.temperature must be"),
    ("POST", "/api/chat", {"model": MODEL, "messages": USER, "format": "yaml"}, 400,
     "format: invalid format 'yaml': expected \"json\" or a JSON schema"),
    ("POST", "/api/chat", {"model": MODEL, "messages": USER, "logprobs": True}, 400,
     "logprobs is not supported by this server"),
    ("POST", "/api/pull", {"model": "llama3.2"}, 501, CANNOT.format("pull")),
    ("POST", "/api/push", {"model": MODEL}, 501, CANNOT.format("push")),
    ("POST", "/api/create", {"model": "m", "from": MODEL}, 501, CANNOT.format("create")),
    ("POST", "/api/copy", {"source": MODEL, "destination": "m"}, 501, CANNOT.format("copy")),
    ("DELETE", "/api/delete", {"model": MODEL}, 501, CANNOT.format("delete")),
    ("POST", "/api/blobs/sha256:00", None, 501, CANNOT.format("upload blobs for")),
])
def test_errors_in_ollamas_shape(server: RemoteServer, method: str, path: str, body: object,
                                 status: int, message: str) -> None:
    r = httpx.request(method, server.url(path), json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and r.json()["error"].startswith(message), r.json()


def test_protocol_errors_in_ollamas_shape(server: RemoteServer) -> None:
    bad = httpx.post(server.url("/api/chat"), content=b"{not json", headers={
        **AUTH, "content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"].startswith(
        "the request body is not valid JSON")
    missing = httpx.get(server.url("/api/nothing"), headers=AUTH)
    assert missing.status_code == 404 and missing.json() == {
        "error": "Not Found: GET /api/nothing"}
    assert httpx.head(server.url("/api/blobs/sha256:00"), headers=AUTH).status_code == 501
    long_prompt = {"model": MODEL, "prompt": "word " * 20000}
    too_long = httpx.post(server.url("/api/generate"), json=long_prompt, headers=AUTH)
    assert too_long.status_code == 400
    assert too_long.json()["error"].startswith("This model's maximum context length is")


def test_api_key_guards_the_ollama_routes(server: RemoteServer) -> None:
    anonymous = ollama.Client(host=server.base_url)
    with pytest.raises(ollama.ResponseError) as err:
        anonymous.list()
    assert err.value.status_code == 401
    assert err.value.error == (  # the client reads Ollama's {"error": ...} body
        "Unauthorized: the API key is missing; send 'Authorization: Bearer <key>' or "
        "'x-api-key: <key>'.")
    wrong = ollama.Client(host=server.base_url, headers={"Authorization": "Bearer nope"})
    with pytest.raises(ollama.ResponseError) as err:
        wrong.chat(model=MODEL, messages=USER)
    assert err.value.status_code == 401 and "the API key is wrong" in err.value.error
    for path in ("/api/version", "/api/ps", "/api/tags"):
        assert httpx.get(server.url(path)).status_code == 401


# ---- langchain-ollama -------------------------------------------------------------------------


def test_langchain_chat_ollama(server: RemoteServer, client: ollama.Client) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
    from langchain_ollama import ChatOllama, OllamaEmbeddings

    kwargs = {"headers": AUTH}
    chat = ChatOllama(model=MODEL, base_url=server.base_url, temperature=0, num_predict=12,
                      client_kwargs=kwargs, validate_model_on_init=True)
    messages = [SystemMessage(content=SYSTEM), HumanMessage(content=QUESTION)]
    reply = chat.invoke(messages)
    direct = client.chat(model=MODEL, messages=CHAT, options=GREEDY)
    assert reply.content == direct.message.content
    assert reply.usage_metadata["input_tokens"] == direct.prompt_eval_count
    assert reply.usage_metadata["output_tokens"] == 12
    assert reply.response_metadata["done_reason"] == "length"
    assert "".join(c.text for c in chat.stream(messages)) == direct.message.content
    tools = ChatOllama(model=MODEL, base_url=server.base_url, temperature=0, num_predict=40,
                       client_kwargs=kwargs).bind_tools([WEATHER_TOOL])
    turns = [HumanMessage(content=TOOL_TURNS[0]["content"]),
             AIMessage(content="", tool_calls=[{"name": "get_weather", "args": {"city": "Rome"},
                                                "id": "call_0"}]),
             ToolMessage(content="Sunny, 25 C.", tool_call_id="call_0"),
             AIMessage(content="It is sunny in Rome."),
             HumanMessage(content=TOOL_TURNS[-1]["content"])]
    called = tools.invoke(turns)
    assert called.tool_calls[0]["name"] == "get_weather"
    assert called.tool_calls[0]["args"] == {"city": "Paris"}
    embeddings = OllamaEmbeddings(model=MODEL, base_url=server.base_url, client_kwargs=kwargs)
    assert embeddings.embed_query("Bonjour") == client.embed(model=MODEL,
                                                             input="Bonjour").embeddings[0]
