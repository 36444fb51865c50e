"""End to end: OpenAI's Responses API through the openai SDK, LangChain (use_responses_api) and
the OpenAI Agents SDK, against `heron serve` with the default model.

A Responses request is a chat in other clothes: the same conversation through
/v1/chat/completions gives the same text and token counts at temperature 0, which is what
most tests compare against.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.server_utils import DEFAULT_MODEL_NAME, RemoteServer

pytestmark = pytest.mark.slow

MODEL = DEFAULT_MODEL_NAME
INSTRUCTIONS = "Answer in one short sentence."
QUESTION = "What is the capital of France?"
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    with RemoteServer(["--served-model-name", MODEL, "--kv-cache-memory", "256MiB"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def plain(client: openai.OpenAI):  # -> openai.types.responses.Response
    return client.responses.create(model=MODEL, input=QUESTION, instructions=INSTRUCTIONS,
                                   max_output_tokens=16, temperature=0)


def chat_twin(client: openai.OpenAI, messages: list[dict], max_tokens: int = 16, **kw: object):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                          temperature=0, **kw)


def prompt_tokens(server: RemoteServer, messages: list[dict]) -> int:
    return httpx.post(server.url("/tokenize"), json={"messages": messages}).json()["count"]


# ---- plain and streamed -----------------------------------------------------------------------


def test_plain_response_is_the_chat_answer(client: openai.OpenAI, plain) -> None:  # noqa: ANN001
    twin = chat_twin(client, [{"role": "system", "content": INSTRUCTIONS},
                              {"role": "user", "content": QUESTION}])
    assert plain.object == "response" and plain.id.startswith("resp_")
    assert plain.model == MODEL and plain.instructions == INSTRUCTIONS
    assert plain.output_text == twin.choices[0].message.content and plain.output_text
    message = plain.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    usage = plain.usage
    assert usage.input_tokens == twin.usage.prompt_tokens
    assert usage.output_tokens == twin.usage.completion_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    if twin.choices[0].finish_reason == "length":
        assert plain.status == "incomplete" and message.status == "incomplete"
        assert plain.incomplete_details.reason == "max_output_tokens"
    else:
        assert plain.status == "completed" and plain.incomplete_details is None


def test_sampling_knobs_beyond_openai_are_honoured(client: openai.OpenAI) -> None:
    """seed, stop, penalties, top_k and min_p (chat's; vLLM's Responses route takes them too)
    give what they give on chat: sampled at temperature 1, the same text."""
    knobs = {"seed": 11, "stop": [" "], "frequency_penalty": 0.5, "presence_penalty": 0.25}
    extra = {"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.1}
    response = client.responses.create(model=MODEL, input=QUESTION, instructions=INSTRUCTIONS,
                                       max_output_tokens=16, temperature=1.0,
                                       extra_body={**knobs, **extra})
    twin = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": INSTRUCTIONS},
                               {"role": "user", "content": QUESTION}],
        max_tokens=16, temperature=1.0, extra_body=extra, **knobs)  # type: ignore[arg-type]
    assert response.output_text == twin.choices[0].message.content
    assert twin.choices[0].finish_reason == "stop" and " " not in response.output_text
    assert response.status == "completed"


def test_developer_message_is_instructions(client: openai.OpenAI, plain) -> None:  # noqa: ANN001
    r = client.responses.create(model=MODEL, max_output_tokens=16, temperature=0, input=[
        {"role": "developer", "content": INSTRUCTIONS},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
    ])
    assert r.output_text == plain.output_text
    assert r.usage.input_tokens == plain.usage.input_tokens


def test_stream_events_in_order_and_equal_to_plain(client: openai.OpenAI, plain) -> None:  # noqa: ANN001
    events = list(client.responses.create(model=MODEL, input=QUESTION, instructions=INSTRUCTIONS,
                                          max_output_tokens=16, temperature=0, stream=True))
    types = [e.type for e in events]
    terminal = "response.incomplete" if plain.status == "incomplete" else "response.completed"
    deltas = types.count("response.output_text.delta")
    assert deltas >= 2
    assert types == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * deltas
                     + ["response.output_text.done", "response.content_part.done",
                        "response.output_item.done", terminal])
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == plain.output_text
    assert events[-4].text == text and events[-3].part.text == text
    final = events[-1].response
    assert final.output_text == text and final.status == plain.status
    assert final.usage.output_tokens == plain.usage.output_tokens
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {final.output[0].id}


# ---- tools ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forced_call(client: openai.OpenAI):  # -> Response
    return client.responses.create(
        model=MODEL, input="What is the weather in Paris?", tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"}, temperature=0)


def test_forced_function_call(forced_call) -> None:  # noqa: ANN001
    assert forced_call.status == "completed"
    assert [item.type for item in forced_call.output] == ["function_call"]
    call = forced_call.output[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    assert call.id.startswith("fc_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["parameters"])
    assert forced_call.output_text == ""


def test_function_call_output_round_trip(server: RemoteServer, client: openai.OpenAI,
                                         forced_call) -> None:  # noqa: ANN001
    call = forced_call.output[0]
    items = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C."},
    ]
    r = client.responses.create(model=MODEL, input=items, tools=[WEATHER_TOOL],
                                tool_choice="none", max_output_tokens=16, temperature=0)
    chat_tools = [{"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items()
                                                    if k not in ("type", "strict")}}]
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": call.call_id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C."},
    ]
    twin = chat_twin(client, messages, tools=chat_tools, tool_choice="none")
    assert r.usage.input_tokens == twin.usage.prompt_tokens
    assert r.usage.input_tokens > prompt_tokens(server, messages) + 20  # the tools are shown
    assert r.output_text == twin.choices[0].message.content
    assert [item.type for item in r.output] == ["message"]


def test_streamed_function_call(client: openai.OpenAI, forced_call) -> None:  # noqa: ANN001
    events = list(client.responses.create(
        model=MODEL, input="What is the weather in Paris?", tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"}, temperature=0, stream=True))
    types = [e.type for e in events]
    pieces = types.count("response.function_call_arguments.delta")
    assert pieces >= 1
    assert types == (["response.created", "response.in_progress", "response.output_item.added"]
                     + ["response.function_call_arguments.delta"] * pieces
                     + ["response.function_call_arguments.done", "response.output_item.done",
                        "response.completed"])
    added, done = events[2].item, events[-2].item
    assert added.type == "function_call" and added.arguments == "" and added.name == "get_weather"
    arguments = "".join(e.delta for e in events if e.type.endswith("arguments.delta"))
    assert arguments == events[-3].arguments == done.arguments
    assert arguments == forced_call.output[0].arguments
    assert done.call_id == added.call_id == events[-1].response.output[0].call_id


# ---- structured output ------------------------------------------------------------------------


def test_json_schema_text_format(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL, input="Describe a person as JSON.", temperature=0, max_output_tokens=100,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON_SCHEMA,
                         "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), PERSON_SCHEMA)
    assert r.text.format.type == "json_schema"


def test_parse_with_pydantic(client: openai.OpenAI) -> None:
    r = client.responses.parse(model=MODEL, input="Describe a person.", text_format=Person,
                               temperature=0, max_output_tokens=100)
    assert isinstance(r.output_parsed, Person)
    assert Person.model_validate_json(r.output_text) == r.output_parsed


# ---- state: previous_response_id, GET, DELETE -------------------------------------------------


def test_previous_response_continues_the_conversation(server: RemoteServer,
                                                       client: openai.OpenAI, plain) -> None:  # noqa: ANN001
    follow = client.responses.create(model=MODEL, input="And of Italy?", max_output_tokens=16,
                                     temperature=0, previous_response_id=plain.id)
    assert follow.previous_response_id == plain.id
    # instructions are not carried over; the earlier turns are
    messages = [{"role": "user", "content": QUESTION},
                {"role": "assistant", "content": plain.output_text},
                {"role": "user", "content": "And of Italy?"}]
    assert follow.usage.input_tokens == prompt_tokens(server, messages)
    assert follow.output_text == chat_twin(client, messages).choices[0].message.content


def test_get_and_delete(client: openai.OpenAI, plain) -> None:  # noqa: ANN001
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=16, temperature=0)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.usage == r.usage
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError, match=r.id):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError, match="Previous response"):
        client.responses.create(model=MODEL, input="Hi", previous_response_id=r.id)
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=16, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


# ---- errors, limits, disconnects, metrics -----------------------------------------------------


@pytest.mark.parametrize("fields,param,message", [
    ({"max_output_tokens": 10}, "max_output_tokens", "Expected a value >= 16, but got 10"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type",
     "tools[0].type 'web_search' is not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]",
     "input[0].content[0]: content parts of type 'input_image' are not supported"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id",
     "input[0].call_id: Field required"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type",
     "input[0].type 'item_reference'"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format",
     "needs a schema"),
    ({"background": True}, "background", "background is not supported"),
    ({"truncation": "auto"}, "truncation", "truncation is not supported"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort",
     "reasoning.effort: 'extreme' is not one of none, minimal, low, medium, high"),
    ({"temperature": 3}, "temperature", "temperature must be in [0, 2]"),
])
def test_bad_requests_name_the_field(server: RemoteServer, fields: dict, param: str | None,
                                     message: str) -> None:
    body = {"model": MODEL, "input": "Hi", **fields}
    r = httpx.post(server.url("/v1/responses"), json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unknown_model_and_context_length(server: RemoteServer) -> None:
    r = httpx.post(server.url("/v1/responses"), json={"model": "gpt-5", "input": "Hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    huge = {"model": MODEL, "input": "word " * 20000}
    r = httpx.post(server.url("/v1/responses"), json=huge)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "max_output_tokens"
    assert r.json()["error"]["message"].endswith("the length of the input or max_output_tokens.")


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_stream_disconnect_aborts_and_metrics_count(server: RemoteServer) -> None:
    before = httpx.get(server.url("/metrics")).text
    body = {"model": MODEL, "input": "Tell me a long story.", "stream": True,
            "max_output_tokens": 4000}
    with httpx.stream("POST", server.url("/v1/responses"), json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines) == "event: response.created"
        deadline = time.monotonic() + 30
        while "output_text.delta" not in next(lines) and time.monotonic() < deadline:
            pass

    def running() -> float:
        return _metric(httpx.get(server.url("/metrics")).text, "heron:num_requests_running")

    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running() == 0.0
    after = httpx.get(server.url("/metrics")).text
    route = {"route": "/v1/responses", "status": "200"}
    assert _metric(after, "heron:http_requests_total", **route) == \
        _metric(before, "heron:http_requests_total", **route) + 1
    assert re.search(r'heron:http_requests_total\{.*route="/v1/responses/\{response_id\}"', after)


# ---- LangChain and the Agents SDK -------------------------------------------------------------


@pytest.fixture(scope="module")
def langchain_chat(server: RemoteServer):  # -> ChatOpenAI
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, api_key="EMPTY", base_url=server.api_base,
                      use_responses_api=True, max_tokens=16, temperature=0)


def test_langchain_invoke_and_stream(langchain_chat, plain) -> None:  # noqa: ANN001
    from langchain_core.messages import HumanMessage, SystemMessage

    messages = [SystemMessage(content=INSTRUCTIONS), HumanMessage(content=QUESTION)]
    answer = langchain_chat.invoke(messages)
    assert answer.text == plain.output_text
    assert answer.usage_metadata["input_tokens"] == plain.usage.input_tokens
    assert answer.usage_metadata["output_tokens"] == plain.usage.output_tokens
    chunks = list(langchain_chat.stream(messages))
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert len(chunks) > 2 and merged.text == plain.output_text


def test_langchain_tools_and_structured_output(langchain_chat, server: RemoteServer) -> None:  # noqa: ANN001
    from langchain_openai import ChatOpenAI

    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    called = langchain_chat.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?")
    assert [c["name"] for c in called.tool_calls] == ["get_weather"]
    assert isinstance(called.tool_calls[0]["args"]["city"], str)
    longer = ChatOpenAI(model=MODEL, api_key="EMPTY", base_url=server.api_base,
                        use_responses_api=True, max_tokens=100, temperature=0)
    person = longer.with_structured_output(Person).invoke("Describe a person.")
    assert isinstance(person, Person)


def test_agents_sdk_function_tool(server: RemoteServer) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        cities.append(city)
        return f"It is sunny in {city}."

    class Report(BaseModel):
        summary: str

    async def run() -> tuple[object, object]:
        model = OpenAIResponsesModel(model=MODEL, openai_client=server.async_client())
        settings = ModelSettings(temperature=0, max_tokens=64)
        caller = Agent(name="weather", instructions="Use the tool.", model=model,
                       tools=[get_weather], tool_use_behavior="stop_on_first_tool",
                       model_settings=settings.resolve(ModelSettings(tool_choice="get_weather")))
        writer = Agent(name="writer", instructions="Summarise.", model=model,
                       output_type=Report, model_settings=settings)
        first = await Runner.run(caller, "What is the weather in Paris?")
        second = await Runner.run(writer, "Paris is sunny today.")
        return first.final_output, second.final_output

    called, report = asyncio.run(run())
    assert len(cities) == 1 and cities[0]
    assert called == f"It is sunny in {cities[0]}."
    assert isinstance(report, Report)
