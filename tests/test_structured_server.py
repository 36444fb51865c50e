"""End to end on the default model: structured output and tool calling through `heron serve`,
with the openai SDK and LangChain, exactly as their users write them."""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from heron.config import ModelConfig
from heron.tokenizer import load_tokenizer
from tests.server_utils import DEFAULT_MODEL_NAME, RemoteServer

pytestmark = pytest.mark.slow

MODEL = DEFAULT_MODEL_NAME
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
ASK_PERSON = [{"role": "user", "content": "Describe a person named Bob who is 42, as JSON."}]
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                      "parameters": {"type": "object",
                                                     "properties": {"tz": {"type": "string"}},
                                                     "required": ["tz"]}}},
]
PARAMS_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Rome?"}]


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    with RemoteServer(["--served-model-name", MODEL, "--kv-cache-memory", "256MiB"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return server.client()


def chat(client: openai.OpenAI, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)


def check_calls(message: Any, finish_reason: str, count: int | None = None) -> list[tuple[str, dict]]:
    """The calls of a tool-calling answer, each checked against its function's schema."""
    assert message.content is None
    assert finish_reason == "tool_calls"
    assert message.tool_calls and (count is None or len(message.tool_calls) == count)
    calls = []
    for call in message.tool_calls:
        assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, PARAMS_OF[call.function.name])
        calls.append((call.function.name, args))
    assert len({c.id for c in message.tool_calls}) == len(message.tool_calls)
    return calls


def streamed(client: openai.OpenAI, messages: list[dict[str, Any]], **kwargs: Any) -> dict:
    """Content, calls (name, joined arguments) and finish reason of a streamed answer; checks that
    each call's first delta carries id, type and name, and later ones argument pieces only."""
    content, calls, finish = "", {}, None
    for chunk in chat(client, messages, stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name
                calls[d.index] = [d.function.name, d.function.arguments or ""]
            else:
                assert d.id is None and d.function.name is None
                calls[d.index][1] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return {"content": content or None, "calls": [tuple(c) for c in calls.values()],
            "finish": finish}


def whole(answer: Any) -> dict:
    message = answer.choices[0].message
    return {"content": message.content,
            "calls": [(c.function.name, c.function.arguments) for c in message.tool_calls or []],
            "finish": answer.choices[0].finish_reason}


# ---- response_format and vLLM's structured outputs -----------------------------------------------


def _stream_stamps(server: RemoteServer, stamps: list[float], running: threading.Event) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 120, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.monotonic())
                if len(stamps) == 20:
                    running.set()


def test_the_first_constrained_request_stalls_no_running_stream(server: RemoteServer) -> None:
    """The first structured request of a fresh server, with a grammar that takes a while to
    compile (20,000 choices), starts while a stream decodes: the stream's inter-token gaps stay
    what they were (the tokenizer index was built before the server was ready; the grammar
    compiles off the step loop). The prompt is in the prefix cache, so the request adds no
    prefill to the stream's steps: what it adds is the compile and its masks."""
    choices = [f"option {i} {chr(97 + i % 26)}{i * 7919 % 10007}" for i in range(20_000)]
    chat = {"model": MODEL, "messages": ASK_PERSON, "max_tokens": 1}
    assert httpx.post(server.url("/v1/chat/completions"), json=chat, timeout=120).status_code == 200
    stamps: list[float] = []
    running = threading.Event()
    stream = threading.Thread(target=_stream_stamps, args=(server, stamps, running))
    stream.start()
    assert running.wait(300)
    sent = time.monotonic()
    r = httpx.post(server.url("/v1/chat/completions"), timeout=600,
                   json={**chat, "max_tokens": 30, "guided_choice": choices})
    answered = time.monotonic()
    stream.join()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] in choices
    gaps = [(b, b - a) for a, b in zip(stamps, stamps[1:])]
    before = [g for t, g in gaps[5:] if t < sent]
    during = [g for t, g in gaps if sent <= t <= answered]
    assert len(during) >= 3, "the stream ran on while the constrained request was served"
    print(f"stream gaps: before max {max(before):.3f} s median {statistics.median(before):.3f} s;"
          f" during max {max(during):.3f} s median {statistics.median(during):.3f} s"
          f" ({len(during)} gaps, request {answered - sent:.2f} s)")
    assert max(during) <= max(before) + 0.1


def test_json_schema_strict_validates(client: openai.OpenAI) -> None:
    answer = chat(client, ASK_PERSON, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.tool_calls == []


def test_json_object_is_json(client: openai.OpenAI) -> None:
    # Any object is allowed, so a 270M model asked plainly adds keys until max_tokens; one
    # example turn shows it where to stop.
    ask = [{"role": "user", "content": "Name the capital of Italy in JSON."},
           {"role": "assistant", "content": '{"capital": "Rome"}'},
           {"role": "user", "content": "Name the capital of France in JSON."}]
    answer = chat(client, ask, max_tokens=30, response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    assert answer.choices[0].finish_reason == "stop"


def test_regex_choice_and_grammar(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Give me a date."}]
    regex = r"\d{4}-\d{2}-\d{2}"
    dated = chat(client, ask, max_tokens=20, extra_body={"structured_outputs": {"regex": regex}})
    assert re.fullmatch(regex, dated.choices[0].message.content)
    assert dated.choices[0].finish_reason == "stop"
    choices = ["Paris", "London", "Rome"]
    picked = chat(client, [{"role": "user", "content": "The capital of France?"}], max_tokens=5,
                  extra_body={"structured_outputs": {"choice": choices}})
    assert picked.choices[0].message.content in choices
    assert picked.choices[0].finish_reason == "stop"
    grammar = 'root ::= ("yes" | "no") ", because " [a-z ]+ "."'
    reasoned = chat(client, [{"role": "user", "content": "Is the sky blue?"}], max_tokens=30,
                    extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"(yes|no), because [a-z ]+\.", reasoned.choices[0].message.content)


@pytest.mark.parametrize("old,new", [
    ({"guided_regex": r"[0-9]{3}"}, {"structured_outputs": {"regex": r"[0-9]{3}"}}),
    ({"guided_choice": ["up", "down"]}, {"structured_outputs": {"choice": ["up", "down"]}}),
    ({"guided_json": PERSON}, {"structured_outputs": {"json": PERSON}}),
    ({"guided_grammar": 'root ::= "a" | "b"'}, {"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}),
])
def test_guided_aliases_match_structured_outputs(client: openai.OpenAI, old: dict, new: dict) -> None:
    a = chat(client, ASK_PERSON, max_tokens=40, extra_body=old).choices[0].message.content
    b = chat(client, ASK_PERSON, max_tokens=40, extra_body=new).choices[0].message.content
    assert a == b and a


def test_completions_and_streaming_structured_output(client: openai.OpenAI) -> None:
    done = client.completions.create(model=MODEL, prompt="The answer is", max_tokens=5, temperature=0,
                                     extra_body={"guided_choice": ["yes", "no"]})
    assert done.choices[0].text in ("yes", "no") and done.choices[0].finish_reason == "stop"
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    full = chat(client, ASK_PERSON, max_tokens=60, response_format=fmt)
    parts = streamed(client, ASK_PERSON, max_tokens=60, response_format=fmt)
    assert parts == whole(full)


def test_logprobs_report_the_tokens_of_the_text(client: openai.OpenAI) -> None:
    """The reported token and logprob are those of the sampled token, which a choice forces here
    (the most likely token of the raw distribution is something else): the tokens spell the text.
    """
    ask = [{"role": "user", "content": "Name an animal."}]
    answer = client.chat.completions.create(
        model=MODEL, messages=ask, max_tokens=10, temperature=2.0, seed=1, logprobs=True,
        top_logprobs=2, extra_body={"guided_choice": ["zebra"]})
    content = answer.choices[0].logprobs.content
    assert "".join(e.token for e in content) == answer.choices[0].message.content == "zebra"
    for entry in content:
        assert len(entry.top_logprobs) == 2
        same = [t.logprob for t in entry.top_logprobs if t.token == entry.token]
        assert all(lp == pytest.approx(entry.logprob, abs=1e-5) for lp in same)
    done = client.completions.create(model=MODEL, prompt="My favourite animal is the",
                                     max_tokens=10, temperature=2.0, seed=1, logprobs=2,
                                     extra_body={"guided_choice": ["zebra"]})
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text == "zebra"
    assert all(len(top) >= 2 for top in lp.top_logprobs)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_line_separators_in_the_text_reach_a_line_splitting_client_whole(
        server: RemoteServer, route: str) -> None:
    """Text holding NEL, U+2028 and U+2029 (forced by a choice here): httpx's ``iter_lines``
    splits lines as ``str.splitlines`` does, so each must come escaped in the event's JSON (a
    raw one cut an event in two: a failed request in ``heron bench peers``)."""
    text = "a\u2028b\x85c\u2029d"
    ask: dict[str, Any] = ({"prompt": "Say it:"} if route == "/v1/completions"
                           else {"messages": [{"role": "user", "content": "Say it."}]})
    body = {"model": MODEL, **ask, "max_tokens": 20, "stream": True, "guided_choice": [text]}
    with httpx.stream("POST", server.url(route), json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    choices = [json.loads(event)["choices"] for event in events]  # every event whole
    key = "text" if route == "/v1/completions" else "delta"
    parts = [c[0][key] if key == "text" else c[0][key].get("content") or "" for c in choices if c]
    assert "".join(parts) == text


def test_a_length_cut_reports_length(client: openai.OpenAI) -> None:
    answer = chat(client, ASK_PERSON, max_tokens=4, response_format={"type": "json_object"})
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 4
    assert answer.choices[0].message.content.startswith("{")


# ---- tools ----------------------------------------------------------------------------------------


def test_required_calls_a_tool(client: openai.OpenAI) -> None:
    answer = chat(client, ASK_WEATHER, tools=TOOLS, tool_choice="required", max_tokens=60)
    calls = check_calls(answer.choices[0].message, answer.choices[0].finish_reason)
    assert calls[0][0] == "get_weather" and calls[0][1]["city"] == "Rome"
    # A forced call is the whole turn: a response format (for a later turn) does not change it.
    formatted = chat(client, ASK_WEATHER, tools=TOOLS, tool_choice="required", max_tokens=60,
                     response_format={"type": "json_object"})
    assert check_calls(formatted.choices[0].message, formatted.choices[0].finish_reason) == calls


def test_named_tool_choice(client: openai.OpenAI) -> None:
    answer = chat(client, ASK_WEATHER, tools=TOOLS, max_tokens=40,
                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    [(name, args)] = check_calls(answer.choices[0].message, answer.choices[0].finish_reason, 1)
    assert name == "get_time" and isinstance(args["tz"], str)


def test_allowed_tools_limit_the_calls_on_chat_and_responses(client: openai.OpenAI) -> None:
    """allowed_tools required with get_time only: asked for Rome's weather, the model (which
    calls get_weather when both may be called, above) calls get_time; both tools reach the
    template. The same through the Responses API's flat form."""
    choice: Any = {"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]}}
    answer = chat(client, ASK_WEATHER, tools=TOOLS, tool_choice=choice, max_tokens=40)
    calls = check_calls(answer.choices[0].message, answer.choices[0].finish_reason)
    assert {name for name, _ in calls} == {"get_time"}
    flat: Any = [{"type": "function", "name": t["function"]["name"],
                  "parameters": t["function"]["parameters"]} for t in TOOLS]
    response = client.responses.create(
        model=MODEL, input=ASK_WEATHER[0]["content"], tools=flat, max_output_tokens=40,
        temperature=0, tool_choice={"type": "allowed_tools", "mode": "required",
                                    "tools": [{"type": "function", "name": "get_time"}]})
    items = [(item.type, getattr(item, "name", None)) for item in response.output]
    assert items and set(items) == {("function_call", "get_time")}


def test_auto_answers_in_text_or_a_valid_call(client: openai.OpenAI) -> None:
    answer = chat(client, ASK_WEATHER, tools=TOOLS, max_tokens=30)
    message = answer.choices[0].message
    if message.tool_calls:
        check_calls(message, answer.choices[0].finish_reason)
    else:
        assert message.content and message.content[0] not in "< \n"
        assert answer.choices[0].finish_reason in ("stop", "length")
    none = chat(client, ASK_WEATHER, tools=TOOLS, tool_choice="none", max_tokens=10)
    assert none.choices[0].message.tool_calls == [] and none.choices[0].message.content
    assert none.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("kwargs", [
    {"tool_choice": "required", "max_tokens": 60},
    {"tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 60},
    {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 40},
    {"tool_choice": "required", "max_tokens": 20},  # cut inside the arguments
])
def test_streamed_tool_calls_equal_whole_ones(client: openai.OpenAI, kwargs: dict) -> None:
    full = whole(chat(client, ASK_WEATHER, tools=TOOLS, **kwargs))
    parts = streamed(client, ASK_WEATHER, tools=TOOLS, **kwargs)
    assert parts == full
    if kwargs["max_tokens"] == 20:
        assert full["finish"] == "length" and full["calls"][0][0] == "get_weather"
        assert full["calls"][0][1].startswith('{"') and not full["calls"][0][1].endswith("}")
    else:
        assert full["finish"] == "tool_calls" and full["content"] is None


def test_tool_history_renders_through_the_template(server: RemoteServer,
                                                   client: openai.OpenAI) -> None:
    history = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1",
         "content": [{"type": "text", "text": "Sunny, 25 degrees."}]},
    ]
    answer = chat(client, history, tools=TOOLS, tool_choice="none", max_tokens=8)
    tokenizer = load_tokenizer(ModelConfig())
    rendered = tokenizer.apply_chat_template(
        [history[0], {**history[1], "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 25 degrees."}],
        tools=TOOLS)
    assert '<tool_response>Sunny, 25 degrees.</tool_response>' in rendered
    assert answer.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


# ---- errors ---------------------------------------------------------------------------------------


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "Invalid type: foo"),
    ({"structured_outputs": {"regex": "(("}}, "structured_outputs", "the regex does not compile"),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs", "Rule 'missing' not found"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regex": "a", "shape": 1}}, "structured_outputs.shape", "Extra inputs"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "combined"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}]},
     "tools", "Invalid type: foo"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope', which is not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "Input should be"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "function names"),
]


@pytest.mark.parametrize("fields,param,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_constraints_are_400s(server: RemoteServer, fields: dict, param: str, message: str) -> None:
    body = {"model": MODEL, "messages": ASK_WEATHER, "max_tokens": 3, **fields}
    r = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error"


# ---- LangChain ------------------------------------------------------------------------------------


class Person(BaseModel):
    """A person."""

    name: str = Field(description="the person's name")
    age: int = Field(description="age in years")


@tool
def get_forecast(city: str, days: int) -> str:
    """Get the weather forecast for a city for a number of days."""
    return f"Sunny in {city} for the next {days} days."


@pytest.fixture(scope="module")
def llm(server: RemoteServer) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, openai_api_key="EMPTY", openai_api_base=server.api_base,
                      max_tokens=60, temperature=0)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(llm: ChatOpenAI, method: str) -> None:
    structured = llm.with_structured_output(Person, method=method, include_raw=True)
    out = structured.invoke("Bob is 42 years old. Extract the person.")
    assert out["parsing_error"] is None
    assert isinstance(out["parsed"], Person) and out["parsed"].name == "Bob"
    expected = "stop" if method == "json_schema" else "tool_calls"
    assert out["raw"].response_metadata["finish_reason"] == expected


def test_langchain_bind_tools_any_and_an_agent_loop(llm: ChatOpenAI) -> None:
    forced = llm.bind_tools([get_forecast], tool_choice="any")
    messages: list[Any] = [HumanMessage("What will the weather be in Rome for the next 3 days?")]
    ai = forced.invoke(messages)
    assert isinstance(ai, AIMessage) and len(ai.tool_calls) == 1
    call = ai.tool_calls[0]
    assert call["name"] == "get_forecast"
    assert isinstance(call["args"]["city"], str) and isinstance(call["args"]["days"], int)
    assert ai.response_metadata["finish_reason"] == "tool_calls"
    # The loop: run the tool, hand its result back, and let the model answer in text.
    answer_only = llm.bind_tools([get_forecast], tool_choice="none")
    for _ in range(3):
        messages.append(ai)
        messages += [ToolMessage(get_forecast.invoke(c["args"]), tool_call_id=c["id"])
                     for c in ai.tool_calls]
        ai = answer_only.invoke(messages)
        if not ai.tool_calls:
            break
    assert not ai.tool_calls and isinstance(ai.content, str) and ai.content
    assert ai.response_metadata["finish_reason"] in ("stop", "length")
