"""The serving tier: the real app, protocol, pipeline and output processor against a scripted
engine (``tests.fake_engine``), no model loaded. SSE framing, usage chunks, stop handling,
tool-call streaming and error events, each asserted on the exact bytes or JSON a client gets."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from heron.engine.client import EngineError, RequestRejectedError
from heron.engine.messages import EngineOutput, EngineRequest, TokenLogprobs
from heron.server.app import build_app
from heron.tokenizer.tokenizer import Tokenizer
from tests.fake_engine import (
    EOS,
    MODEL,
    FakeEngine,
    Script,
    char_id,
    char_tokenizer_for_serving,
    serving_context,
    tokens,
)

USER = [{"role": "user", "content": "Hi"}]
# The character template: "<s><user>Hi\n<assistant>", one token per character but <s>.
CHAT_PROMPT_TOKENS = len("<user>Hi\n<assistant>") + 1
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return char_tokenizer_for_serving()


@pytest.fixture
def serve(tokenizer: Tokenizer) -> Callable[..., tuple[TestClient, FakeEngine]]:
    def make(script: Script, **config: object) -> tuple[TestClient, FakeEngine]:
        engine = FakeEngine(script)
        ctx = serving_context(engine, tokenizer, **config)
        app = build_app(ctx.config, ctx)
        return TestClient(app, base_url="http://127.0.0.1"), engine  # a loopback Host
    return make


def always(*outputs: EngineOutput | Exception) -> Script:
    return lambda request: list(outputs)


def events(body: str) -> list[Any]:
    """The SSE body as its data payloads (JSON decoded), checking the framing on the way:
    every event is one ``data: ...`` line and a blank line, and the last is ``[DONE]``."""
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    frames = body.split("\n\n")
    assert frames[-1] == ""
    payloads = []
    for frame in frames[:-1]:
        assert frame.startswith("data: ") and "\n" not in frame, frame
        payloads.append(frame.removeprefix("data: "))
    assert payloads.count("[DONE]") == 1
    return [json.loads(p) for p in payloads[:-1]]


def post_stream(client: TestClient, path: str, body: dict[str, Any]) -> list[Any]:
    r = client.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    return events(r.text)


# ---- SSE framing ----------------------------------------------------------------------------------


def test_completion_stream_chunks(serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    client, engine = serve(always(*tokens("Hel", "lo", " there")))
    chunks = post_stream(client, "/v1/completions", {"prompt": "Say", "max_tokens": 8})
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks] == [
        ("Hel", None), ("lo", None), (" there", "length")]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert {(c["object"], c["model"]) for c in chunks} == {("text_completion", MODEL)}
    assert all("usage" not in c for c in chunks)
    (request,) = engine.requests
    assert request.prompt_token_ids == [1, char_id("S"), char_id("a"), char_id("y")]
    assert request.sampling_params.max_tokens == 8


def test_chat_stream_role_content_then_finish(
        serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    client, _ = serve(always(*tokens("Hi", [char_id("!"), EOS], finish="stop", stop_reason=EOS)))
    chunks = post_stream(client, "/v1/chat/completions", {"messages": USER})
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
          "finish_reason": None, "stop_reason": None}],
        [{"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None,
          "stop_reason": None}],
        [{"index": 0, "delta": {"content": "!"}, "logprobs": None, "finish_reason": None,
          "stop_reason": None}],
        [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop",
          "stop_reason": None}],
    ]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


# ---- usage ----------------------------------------------------------------------------------------


def test_usage_chunk_last_when_asked(serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    client, _ = serve(always(*tokens("ab", "c", cached=16)))
    chunks = post_stream(client, "/v1/chat/completions", {
        "messages": USER, "stream_options": {"include_usage": True}})
    *body, last = chunks
    assert all(c["usage"] is None for c in body)
    assert last["choices"] == []
    assert last["usage"] == {
        "prompt_tokens": CHAT_PROMPT_TOKENS, "completion_tokens": 3,
        "total_tokens": CHAT_PROMPT_TOKENS + 3, "prompt_tokens_details": {"cached_tokens": 16}}


def test_continuous_usage_on_every_chunk(
        serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    client, _ = serve(always(*tokens("ab", "c", "de")))
    chunks = post_stream(client, "/v1/completions", {
        "prompt": "x", "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert [c["usage"]["completion_tokens"] for c in chunks] == [2, 3, 5, 5]
    assert chunks[-1]["choices"] == []


def test_usage_of_n_choices_and_prompts(
        serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    client, engine = serve(lambda r: tokens("a" * (1 + r.sampling_params.seed), cached=2))
    r = client.post("/v1/completions", json={"prompt": ["ab", "cde"], "n": 2, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["text"] for c in body["choices"]] == ["aaaa", "aaaaa", "aaaa", "aaaaa"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [q.sampling_params.seed for q in engine.requests] == [3, 4, 3, 4]
    assert body["usage"] == {"prompt_tokens": 3 + 4, "completion_tokens": 18,
                             "total_tokens": 25, "prompt_tokens_details": {"cached_tokens": 4}}


# ---- stop handling --------------------------------------------------------------------------------


def test_stop_string_cut_held_back_and_aborted(
        serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    client, engine = serve(always(*tokens("Hel", "lo", " Wor", "ld")))
    chunks = post_stream(client, "/v1/completions", {"prompt": "x", "stop": ["o W"]})
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"],
             c["choices"][0]["stop_reason"]) for c in chunks] == [
        ("Hel", None, None), ("l", None, None), ("", "stop", "o W")]  # "o" may begin "o W"
    assert engine.aborted == [engine.requests[0].request_id]
    assert engine.num_in_flight == 0


def test_stop_token_id_and_eos_in_one_response(
        serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    bang = char_id("!")

    def script(request: EngineRequest) -> list[EngineOutput | Exception]:
        if request.request_id.endswith("-0"):
            return tokens("ok", [bang], finish="stop", stop_reason=bang)
        return tokens("fine", [EOS], finish="stop", stop_reason=EOS)

    client, _ = serve(script)
    r = client.post("/v1/completions", json={
        "prompt": "x", "n": 2, "stop_token_ids": [bang], "skip_special_tokens": False})
    assert [(c["text"], c["finish_reason"], c["stop_reason"]) for c in r.json()["choices"]] == [
        ("ok", "stop", bang), ("fine", "stop", None)]
    assert r.json()["usage"]["completion_tokens"] == 3 + 5


# ---- tool calls -----------------------------------------------------------------------------------

HERMES_PIECES = ('<tool_call>{"name": "get_weather", ', '"arguments": {"city": ', '"Rome"}}',
                 "</tool_call>")


def test_tool_call_streaming(serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    client, engine = serve(always(*tokens(*HERMES_PIECES, [EOS], finish="stop", stop_reason=EOS)))
    chunks = post_stream(client, "/v1/chat/completions", {
        "messages": USER, "tools": [WEATHER_TOOL], "tool_choice": "auto"})
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert all("content" not in d for d in deltas[1:]), deltas
    first = calls[0]
    assert first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"]["name"] == "get_weather" and first["index"] == 0
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}
               for c in calls[1:])
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Rome"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    constraint = engine.requests[0].sampling_params.structured_outputs
    assert constraint is not None and constraint.kind == "grammar", "auto: text | calls"


def test_tool_call_whole_response(serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    client, _ = serve(always(*tokens("".join(HERMES_PIECES), [EOS], finish="stop",
                                     stop_reason=EOS)))
    r = client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER_TOOL]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}


# Tool-call arguments that are JSON Python's json.loads cannot read: it raises ValueError (not
# JSONDecodeError) past 4300 digits and RecursionError past its nesting limit.
UNREADABLE_ARGUMENTS = ['{"city": ' + "1" * 5000 + "}", "[" * 3000 + "]" * 3000]
UNREADABLE_IDS = ["int-past-4300-digits", "nested-3000-deep"]


@pytest.mark.parametrize("arguments", UNREADABLE_ARGUMENTS, ids=UNREADABLE_IDS)
def test_tool_use_input_python_cannot_read_is_an_empty_object(
    serve: Callable[..., tuple[TestClient, FakeEngine]], arguments: str
) -> None:
    """/v1/messages turns the model's arguments into tool_use ``input``: these were a 500 (an
    error event when streamed); they are ``{}``, as arguments that are no JSON are."""
    text = '<tool_call>{"name": "get_weather", "arguments": ' + arguments + "}</tool_call>"
    client, _ = serve(always(*tokens(text, [EOS], finish="stop", stop_reason=EOS)))
    tool = {"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}
    body = {"model": MODEL, "messages": USER, "max_tokens": 200, "tools": [tool]}
    r = client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    assert [(b["type"], b["name"], b["input"]) for b in r.json()["content"]] == [
        ("tool_use", "get_weather", {})]
    streamed = client.post("/v1/messages", json={**body, "stream": True})
    assert streamed.status_code == 200 and "event: error" not in streamed.text, streamed.text[-300:]
    assert '"stop_reason": "tool_use"' in streamed.text


@pytest.mark.parametrize("arguments", UNREADABLE_ARGUMENTS, ids=UNREADABLE_IDS)
def test_tool_call_arguments_sent_back_that_python_cannot_read_reach_the_template_as_text(
    serve: Callable[..., tuple[TestClient, FakeEngine]], arguments: str
) -> None:
    """An assistant turn's arguments text goes to the template as a mapping when it is a JSON
    object: text Python cannot read was a 500 (nesting) or a 400 quoting Python's internals
    (digits) on chat and on Ollama's chat; it goes as the text, as text that is no JSON does."""
    client, engine = serve(always(*tokens("ok", finish="stop")))
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": arguments}}
    messages = [*USER, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "Sunny"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = client.post("/api/chat", json={"model": MODEL, "messages": messages, "stream": False})
    assert r.status_code == 200, r.text
    assert len(engine.requests) == 2


def test_an_unexpected_error_is_a_500_in_the_shape_of_the_routes_api(
    serve: Callable[..., tuple[TestClient, FakeEngine]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starlette answers an unexpected exception from outside every middleware, so the shape
    middlewares never saw it: /api/ and /v1/messages answered OpenAI's shape."""
    import heron.server.app as app_module

    def broken(*args: object) -> None:
        raise RecursionError("deep")

    for name in ("serve_ollama_chat", "serve_messages", "serve_chat"):
        monkeypatch.setattr(app_module, name, broken)
    client, _ = serve(always(*tokens("a")))
    client = TestClient(client.app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    r = client.post("/api/chat", json={"model": MODEL, "messages": USER})
    assert (r.status_code, r.json()) == (500, {"error": "internal error: RecursionError"})
    r = client.post("/v1/messages", json={"model": MODEL, "messages": USER, "max_tokens": 2})
    assert (r.status_code, r.json()) == (500, {"type": "error", "error": {
        "type": "api_error", "message": "internal error: RecursionError"}})
    r = client.post("/v1/chat/completions", json={"messages": USER})
    assert (r.status_code, r.json()["error"]["message"]) == (500, "internal error: RecursionError")


# ---- logprobs -------------------------------------------------------------------------------------


def test_chat_stream_logprobs(serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    a, b = char_id("a"), char_id("b")
    entry = TokenLogprobs(token_ids=[a, b, a], logprobs=[-0.5, -1.5, -0.5], ranks=[1, 2, 1])
    out = EngineOutput(request_id="", new_token_ids=[a], new_logprobs=[entry],
                       finish_reason="length")
    client, _ = serve(always(out))
    chunks = post_stream(client, "/v1/chat/completions", {
        "messages": USER, "logprobs": True, "top_logprobs": 2})
    assert chunks[1]["choices"][0]["logprobs"] == {"content": [{
        "token": "a", "logprob": -0.5, "bytes": [97],
        "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]},
                         {"token": "b", "logprob": -1.5, "bytes": [98]}]}], "refusal": None}


# ---- errors ---------------------------------------------------------------------------------------


def test_engine_death_mid_stream_is_an_error_event(
        serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    client, _ = serve(always(*tokens("Hel", finish=None), EngineError("core died")))
    chunks = post_stream(client, "/v1/completions", {"prompt": "x"})
    assert chunks[0]["choices"][0]["text"] == "Hel"
    assert chunks[1] == {"error": {"message": "the engine is unavailable: core died",
                                   "type": "server_error", "param": None,
                                   "code": "engine_unavailable"}}
    assert len(chunks) == 2


def test_engine_errors_without_stream(
        serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    client, _ = serve(always(EngineError("core died")))
    r = client.post("/v1/chat/completions", json={"messages": USER})
    assert (r.status_code, r.json()["error"]["code"]) == (503, "engine_unavailable")
    client, _ = serve(always(RequestRejectedError("temperature must be in [0, 2], got 3")))
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "temperature"


def test_preparation_errors_never_reach_the_engine(
        serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    client, engine = serve(always(*tokens("a")))
    r = client.post("/v1/completions", json={"prompt": "x" * 300})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "context_length_exceeded")
    r = client.post("/v1/chat/completions", json={"messages": USER, "model": "other"})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")
    r = client.post("/v1/chat/completions", json={
        "messages": USER, "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("tool_choice names the function 'get_time'")
    r = client.post("/v1/completions", json={"prompt": [[1, 9999]]})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "prompt")
    assert engine.requests == []


def test_min_tokens_past_the_context_is_a_400_without_max_tokens(
        serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    """Without max_tokens generation may fill the context, but it cannot stop before
    min_tokens: a min_tokens that does not fit is refused, not run to the end of the context."""
    client, engine = serve(always(*tokens("a")))
    r = client.post("/v1/chat/completions", json={"messages": USER, "min_tokens": 300})
    assert r.status_code == 400
    wanted = CHAT_PROMPT_TOKENS + 300
    assert r.json() == {"error": {
        "message": f"This model's maximum context length is 256 tokens. However, you requested "
                   f"{wanted} tokens ({CHAT_PROMPT_TOKENS} in the messages, at least 300 to "
                   "generate). Please reduce the length of the messages or min_tokens.",
        "type": "invalid_request_error", "param": "min_tokens", "code": "context_length_exceeded"}}
    assert engine.requests == []


def test_a_chat_template_error_names_the_messages(
        serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    """Not "the" or "chat": the field that the template could not render."""
    engine = FakeEngine(always(*tokens("a")))
    hf = char_tokenizer_for_serving().hf
    refusing = Tokenizer(hf, chat_template="{{ raise_exception('roles must alternate') }}",
                         name=MODEL)
    ctx = serving_context(engine, refusing)
    client = TestClient(build_app(ctx.config, ctx), base_url="http://127.0.0.1")
    for path, body, field in (("/v1/chat/completions", {"messages": USER}, "messages"),
                              ("/v1/responses", {"input": "Hi"}, "input")):
        r = client.post(path, json=body)
        assert r.status_code == 400
        assert r.json() == {"error": {
            "message": f"{field}: chat template error: roles must alternate",
            "type": "invalid_request_error", "param": field, "code": None}}
    assert engine.requests == []


def test_a_reasoning_effort_reaches_the_chat_template() -> None:
    """As vLLM passes it: ``reasoning_effort`` itself (gpt-oss's templates) and
    ``enable_thinking`` (Qwen3's switch, off for none / minimal); chat_template_kwargs win."""
    engine = FakeEngine(always(*tokens("a")))
    hf = char_tokenizer_for_serving().hf
    template = "{{ enable_thinking | default('u') }}/{{ reasoning_effort | default('u') }}"
    ctx = serving_context(engine, Tokenizer(hf, chat_template=template, name=MODEL))
    client = TestClient(build_app(ctx.config, ctx), base_url="http://127.0.0.1")
    cases = [
        ("/v1/chat/completions", {"messages": USER}, "u/u"),
        ("/v1/chat/completions", {"messages": USER, "reasoning_effort": "none"}, "False/none"),
        ("/v1/chat/completions", {"messages": USER, "reasoning_effort": "high",
                                  "chat_template_kwargs": {"enable_thinking": False}},
         "False/high"),
        ("/v1/responses", {"input": "Hi", "reasoning": {"effort": "low"}}, "True/low"),
        # the openai SDK's other levels (a 400 before)
        ("/v1/chat/completions", {"messages": USER, "reasoning_effort": "xhigh"}, "True/xhigh"),
        ("/v1/responses", {"input": "Hi", "reasoning": {"effort": "max"}}, "True/max"),
        ("/v1/responses", {"input": "Hi", "reasoning": {"summary": "auto"}}, "u/u"),
    ]
    for path, body, rendered in cases:
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        assert hf.decode(engine.requests[-1].prompt_token_ids) == rendered, body


# ---- bodies that are not JSON a parser takes ------------------------------------------------------


def test_bodies_that_do_not_parse_say_why(
        serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    """Not FastAPI's 'There was an error parsing the body': which byte is not UTF-8, that the
    nesting is too deep, or that an integer is too long for Python (it said the generic words);
    in Anthropic's shape on /v1/messages, Ollama's on /api/."""
    client, engine = serve(always(*tokens("a")))
    json_type = {"Content-Type": "application/json"}
    bad_utf8 = b'{"prompt": "ab\xff"}'
    r = client.post("/v1/completions", content=bad_utf8, headers=json_type)
    assert (r.status_code, r.json()) == (400, {"error": {
        "message": "the request body is not valid UTF-8: byte 0xff at offset 14 (invalid start "
                   "byte)", "type": "invalid_request_error", "param": None, "code": "invalid_json"}})
    deep = b'{"prompt": "x", "a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    message = ("the request body nests JSON arrays and objects too deeply (the parser stops "
               "short of 1000 levels)")
    r = client.post("/v1/chat/completions", content=deep, headers=json_type)
    assert (r.status_code, r.json()["error"]["message"]) == (400, message)
    r = client.post("/v1/messages", content=deep, headers=json_type)
    assert (r.status_code, r.json()) == (400, {"type": "error", "error": {
        "type": "invalid_request_error", "message": message}})
    digits = b'{"model": "m", "messages": [], "options": {"seed": ' + b"1" * 5000 + b"}}"
    r = client.post("/api/chat", content=digits, headers=json_type)
    assert (r.status_code, r.json()) == (400, {
        "error": "the request body holds an integer of more than 4300 digits"})
    for path in ("/api/chat", "/api/generate", "/v1/chat/completions"):  # said "Field required"
        r = client.post(path, content=b"", headers=json_type)
        assert r.status_code == 400, r.text
        assert "the request body is empty: send a JSON object" in r.text
    assert engine.requests == []


def test_logit_bias_entries_are_capped_before_the_body_is_walked(
        serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    """200,000 entries held every stream up ~1 s while they were validated and converted on
    the event loop; past MAX_LOGIT_BIAS the request is refused before any of that."""
    from heron.server.protocol import MAX_LOGIT_BIAS

    client, engine = serve(always(*tokens("a")))
    engine.info.vocab_size = 262_144
    too_many = {str(i): -1.0 for i in range(MAX_LOGIT_BIAS + 1)}
    for path, body in (("/v1/chat/completions", {"messages": USER}),
                       ("/v1/completions", {"prompt": "Hi"})):
        r = client.post(path, json={**body, "logit_bias": too_many})
        assert (r.status_code, r.json()) == (400, {"error": {
            "message": f"logit_bias: at most {MAX_LOGIT_BIAS} entries are allowed, got "
                       f"{MAX_LOGIT_BIAS + 1}",
            "type": "invalid_request_error", "param": "logit_bias", "code": None}})
    assert engine.requests == []
    at_cap = {str(i): -1.0 for i in range(MAX_LOGIT_BIAS)}
    r = client.post("/v1/completions", json={"prompt": "Hi", "logit_bias": at_cap})
    assert r.status_code == 200, r.text
    assert len(engine.requests[0].sampling_params.logit_bias or {}) == MAX_LOGIT_BIAS


# ---- fields: unknown, ignored, unsupported: one rule on every route -------------------------------

ROUTES = [("/v1/chat/completions", {"messages": USER, "max_tokens": 2}),
          ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
          ("/v1/responses", {"input": "Hi", "max_output_tokens": 16}),
          ("/v1/messages", {"model": MODEL, "messages": USER, "max_tokens": 2}),
          ("/v1/messages/count_tokens", {"model": MODEL, "messages": USER}),
          ("/tokenize", {"prompt": "Hi"}),
          ("/detokenize", {"tokens": [5]})]


@pytest.mark.parametrize("path,body", ROUTES, ids=[p for p, _ in ROUTES])
def test_unknown_fields_are_a_400_naming_them_on_every_route(
        serve: Callable[..., tuple[TestClient, FakeEngine]], path: str, body: dict[str, Any]
) -> None:
    """As OpenAI answers (Responses' wording, which names the field): a typo such as
    'max_token' or another server's knob ('mirostat') was ignored, and the answer came out
    as if it had not been sent."""
    client, engine = serve(always(*tokens("a")))
    r = client.post(path, json={**body, "max_token": 5, "mirostat": 2})
    assert r.status_code == 400
    if path.startswith("/v1/messages"):
        assert r.json() == {"type": "error", "error": {
            "type": "invalid_request_error", "message": "Unknown parameter: 'max_token'."}}
    else:
        assert r.json() == {"error": {"message": "Unknown parameter: 'max_token'.",
                                      "type": "invalid_request_error", "param": "max_token",
                                      "code": "unknown_parameter"}}
    assert engine.requests == []
    assert client.post(path, json=body).status_code == 200


def test_an_unknown_field_name_is_escaped_and_cut_in_the_error(
        serve: Callable[..., tuple[TestClient, FakeEngine]]) -> None:
    client, _ = serve(always(*tokens("a")))
    forged = "evil\n2099-01-01 INFO forged " + "x" * 100_000
    r = client.post("/v1/completions", json={"prompt": "Hi", forged: 1})
    error = r.json()["error"]
    assert error["param"] == "evil\\n2099-01-01 INFO forged " + "x" * 32 + "..."
    assert error["message"] == f"Unknown parameter: '{error['param']}'."


IGNORED_FIELDS = [
    ("/v1/chat/completions", {"messages": USER, "store": True, "metadata": {"a": "b"},
                              "service_tier": "flex", "prediction": {"type": "content",
                                                                     "content": "Hi"},
                              "verbosity": "low", "prompt_cache_key": "k",
                              "prompt_cache_retention": "24h", "safety_identifier": "s",
                              "prompt_cache_options": {"ttl": "1h"}, "user": "u",
                              "reasoning_effort": "minimal"}),
    ("/v1/completions", {"prompt": "Hi", "user": "u"}),
    ("/v1/responses", {"input": "Hi", "service_tier": "auto", "prompt_cache_key": "k",
                       "safety_identifier": "s", "max_tool_calls": 3, "metadata": {"a": "b"},
                       "reasoning": {"effort": "none", "summary": "auto"}, "context_management": [
                           {"type": "compaction"}], "text": {"verbosity": "low"}}),
    ("/v1/messages", {"model": MODEL, "messages": USER, "max_tokens": 2, "service_tier": "auto",
                      "cache_control": {"type": "ephemeral"}, "speed": "fast",
                      "metadata": {"user_id": "u"}, "inference_geo": "us",
                      "context_management": {"edits": []}}),
    # A count takes a whole Messages request (clients send one body to both routes).
    ("/v1/messages/count_tokens", {"model": MODEL, "messages": USER, "speed": "fast",
                                   "max_tokens": 5, "temperature": 0.5, "stream": True,
                                   "output_config": {"format": {"type": "json_schema",
                                                                "schema": {}}}}),
]


@pytest.mark.parametrize("path,body", IGNORED_FIELDS, ids=[p for p, _ in IGNORED_FIELDS])
def test_fields_that_mean_nothing_here_are_accepted(
        serve: Callable[..., tuple[TestClient, FakeEngine]], path: str, body: dict[str, Any]
) -> None:
    client, _ = serve(always(*tokens("a")))
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text


UNHONOURED = [
    ("/v1/chat/completions", {"messages": USER, "web_search_options": {}},
     "web_search_options", "web_search_options is not supported by this server"),
    ("/v1/chat/completions", {"messages": USER, "moderation": {"model": "m"}},
     "moderation", "moderation is not supported by this server"),
    ("/v1/chat/completions", {"messages": USER, "reasoning_effort": "extreme"}, "reasoning_effort",
     "reasoning_effort: 'extreme' is not one of none, minimal, low, medium, high, xhigh, max"),
    ("/v1/chat/completions", {"messages": USER, "store": "yes"}, "store",
     "store: Input should be a valid boolean"),
    ("/v1/chat/completions", {"messages": USER, "metadata": {"a": 1}}, "metadata.a",
     "metadata.a: Input should be a valid string"),
    ("/v1/responses", {"input": "Hi", "reasoning": {"effort": 3}}, "reasoning.effort",
     "reasoning.effort: 3 is not one of none, minimal, low, medium, high, xhigh, max"),
    ("/v1/responses", {"input": "Hi", "background_options": {"window": "2h"}},
     "background_options", "background_options is not supported by this server"),
    ("/v1/messages", {"model": MODEL, "messages": USER, "max_tokens": 2,
                      "thread": {"type": "create"}}, None,
     "thread is not supported by this server"),
]


@pytest.mark.parametrize("path,body,param,message", UNHONOURED, ids=[u[3][:40] for u in UNHONOURED])
def test_fields_asking_for_what_heron_cannot_do_are_400s(
        serve: Callable[..., tuple[TestClient, FakeEngine]], path: str, body: dict[str, Any],
        param: str | None, message: str) -> None:
    client, engine = serve(always(*tokens("a")))
    r = client.post(path, json=body)
    assert r.status_code == 400
    if path.startswith("/v1/messages"):
        assert r.json()["error"]["message"] == message
    else:
        assert (r.json()["error"]["param"], r.json()["error"]["message"]) == (param, message)
    assert engine.requests == []
