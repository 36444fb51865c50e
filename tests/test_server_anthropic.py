"""End to end: Anthropic's Messages API through the anthropic SDK and langchain-anthropic,
against `heron serve` with the default model and an API key (sent as ``x-api-key``).

A Messages request is a chat in other clothes: the same conversation through
/v1/chat/completions gives the same text and token counts at temperature 0. (This SDK has no
``temperature`` argument any more; it travels in ``extra_body``.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.server_utils import DEFAULT_MODEL_NAME, RemoteServer

pytestmark = pytest.mark.slow

MODEL = DEFAULT_MODEL_NAME
KEY = "sk-heron-anthropic"
SYSTEM = "Answer in one short sentence."
QUESTION = "What is the capital of France?"
GREEDY = {"temperature": 0}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                     "required": ["city"]},
}


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    with RemoteServer(["--served-model-name", MODEL, "--kv-cache-memory", "256MiB"],
                      api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def answer(client: anthropic.Anthropic) -> anthropic.types.Message:
    return client.messages.create(model=MODEL, max_tokens=12, system=SYSTEM,
                                  messages=[{"role": "user", "content": QUESTION}],
                                  extra_body=GREEDY)


def chat_twin(server: RemoteServer, messages: list[dict], max_tokens: int, **kw: object):
    return server.client().chat.completions.create(model=MODEL, messages=messages,
                                                   max_tokens=max_tokens, temperature=0, **kw)


def test_text_usage_and_stop_reason(server: RemoteServer, answer) -> None:  # noqa: ANN001
    twin = chat_twin(server, [{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": QUESTION}], 12)
    assert answer.type == "message" and answer.role == "assistant" and answer.model == MODEL
    assert answer.id.startswith("msg_")
    assert [b.type for b in answer.content] == ["text"]
    assert answer.content[0].text == twin.choices[0].message.content
    assert answer.usage.input_tokens == twin.usage.prompt_tokens
    assert answer.usage.output_tokens == twin.usage.completion_tokens
    expected = {"length": "max_tokens", "stop": "end_turn"}[twin.choices[0].finish_reason]
    assert answer.stop_reason == expected and answer.stop_sequence is None


def test_stop_sequence(client: anthropic.Anthropic, answer) -> None:  # noqa: ANN001
    words = answer.content[0].text.split()
    assert len(words) >= 3
    stop = words[2]
    r = client.messages.create(model=MODEL, max_tokens=12, system=SYSTEM,
                               messages=[{"role": "user", "content": QUESTION}],
                               stop_sequences=[stop], extra_body=GREEDY)
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert r.content[0].text == answer.content[0].text[:answer.content[0].text.index(stop)]


def test_count_tokens_equals_usage(client: anthropic.Anthropic, answer) -> None:  # noqa: ANN001
    count = client.messages.count_tokens(model=MODEL, system=SYSTEM,
                                         messages=[{"role": "user", "content": QUESTION}])
    assert count.input_tokens == answer.usage.input_tokens


def test_stream_final_message_equals_streamed_text(client: anthropic.Anthropic, answer) -> None:  # noqa: ANN001
    with client.messages.stream(model=MODEL, max_tokens=12, system=SYSTEM,
                                messages=[{"role": "user", "content": QUESTION}],
                                extra_body=GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 2
    assert "".join(pieces) == final.content[0].text == answer.content[0].text
    assert final.stop_reason == answer.stop_reason
    assert final.usage.output_tokens == answer.usage.output_tokens
    assert final.usage.input_tokens == answer.usage.input_tokens


def test_raw_stream_events_in_order(server: RemoteServer) -> None:
    body = {"model": MODEL, "max_tokens": 6, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": QUESTION}]}
    with httpx.stream("POST", server.url("/v1/messages"), json=body,
                      headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in data] == names
    deltas = names.count("content_block_delta")
    assert names == (["message_start", "ping", "content_block_start"]
                     + ["content_block_delta"] * deltas
                     + ["content_block_stop", "message_delta", "message_stop"])
    assert data[0]["message"]["content"] == [] and data[0]["message"]["usage"]["input_tokens"] > 0
    assert data[2]["content_block"] == {"type": "text", "text": ""}
    assert data[-2]["delta"]["stop_reason"] == "max_tokens"
    assert data[-2]["usage"]["output_tokens"] == 6


# ---- tools ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tool_use(client: anthropic.Anthropic) -> anthropic.types.Message:
    return client.messages.create(
        model=MODEL, max_tokens=60, tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}], extra_body=GREEDY)


def test_forced_tool_use(tool_use) -> None:  # noqa: ANN001
    assert tool_use.stop_reason == "tool_use"
    assert [b.type for b in tool_use.content] == ["tool_use"]
    block = tool_use.content[0]
    assert block.name == "get_weather" and block.id.startswith("toolu_")
    assert isinstance(block.input["city"], str) and block.input["city"]


def test_tool_result_turn(server: RemoteServer, client: anthropic.Anthropic, tool_use) -> None:  # noqa: ANN001
    block = tool_use.content[0]
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in tool_use.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": block.id, "content": "Sunny, 21 C."},
            {"type": "text", "text": "Thanks."}]},
    ]
    r = client.messages.create(model=MODEL, max_tokens=12, tools=[WEATHER_TOOL],
                               tool_choice={"type": "none"}, messages=messages, extra_body=GREEDY)
    chat_messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": block.id, "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(block.input)}}]},
        {"role": "tool", "tool_call_id": block.id, "content": "Sunny, 21 C."},
        {"role": "user", "content": "Thanks."},
    ]
    chat_tools = [{"type": "function", "function": {
        "name": "get_weather", "description": WEATHER_TOOL["description"],
        "parameters": WEATHER_TOOL["input_schema"]}}]
    twin = chat_twin(server, chat_messages, 12, tools=chat_tools, tool_choice="none")
    assert r.usage.input_tokens == twin.usage.prompt_tokens
    assert [b.type for b in r.content] == ["text"]
    assert r.content[0].text == twin.choices[0].message.content
    count = client.messages.count_tokens(model=MODEL, tools=[WEATHER_TOOL], messages=messages)
    assert count.input_tokens == r.usage.input_tokens


def test_streamed_tool_use(client: anthropic.Anthropic, tool_use) -> None:  # noqa: ANN001
    with client.messages.stream(model=MODEL, max_tokens=60, tools=[WEATHER_TOOL],
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                                extra_body=GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_message()
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta")
    assert json.loads(partial) == final.content[0].input == tool_use.content[0].input
    assert final.stop_reason == "tool_use"


def test_output_config_json_schema(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    r = client.messages.create(model=MODEL, max_tokens=60, extra_body=GREEDY,
                               output_config={"format": {"type": "json_schema", "schema": schema}},
                               messages=[{"role": "user", "content": "Name a city as JSON."}])
    assert r.stop_reason == "end_turn"
    assert set(json.loads(r.content[0].text)) == {"city"}


# ---- errors and auth --------------------------------------------------------------------------


def _post(server: RemoteServer, body: object, path: str = "/v1/messages",
          headers: dict | None = None) -> httpx.Response:
    headers = {"x-api-key": KEY, **(headers or {})}
    if isinstance(body, bytes):
        return httpx.post(server.url(path), content=body,
                          headers={**headers, "content-type": "application/json"})
    return httpx.post(server.url(path), json=body, headers=headers)


@pytest.mark.parametrize("body,status,kind,message", [
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, 400,
     "invalid_request_error", "max_tokens: Field required"),
    ({"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, 400,
     "invalid_request_error", "max_tokens: must be at least 1"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {}}]}]}, 400, "invalid_request_error",
     "messages.0.content.0.type: 'image' blocks are not supported"),
    ({"model": MODEL, "max_tokens": 5, "temperature": 1.5,
      "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error",
     "temperature: must be in [0, 1]"),
    ({"model": MODEL, "max_tokens": 5, "tools": [{"type": "web_search_20250305", "name": "w"}],
      "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error",
     "tools.0.type: 'web_search_20250305' is not supported"),
    ({"model": "claude-sonnet-4", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
     404, "not_found_error", "claude-sonnet-4"),
    (b"{not json", 400, "invalid_request_error", "not valid JSON"),
])
def test_errors_in_anthropic_shape(server: RemoteServer, body: object, status: int, kind: str,
                                   message: str) -> None:
    r = _post(server, body)
    assert r.status_code == status, r.text
    payload = r.json()
    assert set(payload) == {"type", "error"} and payload["type"] == "error"
    assert payload["error"]["type"] == kind and message in payload["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_a_tool_choice_naming_no_tool_is_refused_by_both_routes(server: RemoteServer,
                                                                path: str) -> None:
    body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
            "tools": [WEATHER_TOOL], "tool_choice": {"type": "tool", "name": "get_time"}}
    r = _post(server, body, path)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "tool_choice" in error["message"] and "get_time" in error["message"]


def test_the_sdk_raises_its_own_errors(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=MODEL, max_tokens=5, messages=[])
    assert err.value.body["error"]["type"] == "invalid_request_error"
    wrong = anthropic.Anthropic(base_url=client.base_url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as auth:
        wrong.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert auth.value.body["error"]["type"] == "authentication_error"


def test_keys_headers_and_version_headers(server: RemoteServer) -> None:
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    assert _post(server, body, headers={"anthropic-version": "2023-06-01",
                                        "anthropic-beta": "tools-2024-04-04"}).status_code == 200
    bearer = httpx.post(server.url("/v1/messages"), json=body,
                        headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200
    missing = httpx.post(server.url("/v1/messages/count_tokens"), json=body)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    # x-api-key works on the OpenAI routes too; their errors keep OpenAI's shape
    models = httpx.get(server.url("/v1/models"), headers={"x-api-key": KEY})
    assert models.status_code == 200
    assert "/v1/messages" in models.json()["data"][0]["endpoints"]
    wrong = httpx.get(server.url("/v1/models"), headers={"x-api-key": "nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


# ---- langchain-anthropic ----------------------------------------------------------------------


def test_langchain_anthropic(server: RemoteServer, answer) -> None:  # noqa: ANN001
    from langchain_anthropic import ChatAnthropic
    from langchain_core.messages import HumanMessage, SystemMessage

    chat = ChatAnthropic(model=MODEL, api_key=KEY, base_url=server.base_url, max_tokens=12,
                         temperature=0, max_retries=0)
    messages = [SystemMessage(content=SYSTEM), HumanMessage(content=QUESTION)]
    reply = chat.invoke(messages)
    assert reply.content == answer.content[0].text
    assert reply.usage_metadata["input_tokens"] == answer.usage.input_tokens
    assert reply.usage_metadata["output_tokens"] == answer.usage.output_tokens
    assert reply.response_metadata["stop_reason"] == answer.stop_reason
    streamed = "".join(chunk.text for chunk in chat.stream(messages))
    assert streamed == answer.content[0].text
