"""Unit tests (no model) of the Responses, Messages and embeddings pieces: how requests convert
into chat terms, the event builders, Anthropic's error shape and stop reasons, the response
store and the vector encodings."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import numpy as np
import pytest

from heron.server.inputs import ChatInput, Limits
from heron.server.messages import _MessageBuilder
from heron.server.models import served_endpoints
from heron.server.protocol import ChatMessage, make_error, sse_event
from heron.server.protocol_anthropic import (
    AnthropicResponse,
    AnthropicUsage,
    MessagesRequest,
    anthropic_error,
    stop_reason_of,
)
from heron.server.protocol_embeddings import EmbeddingRequest, encode_vector
from heron.server.protocol_responses import ResponseObject, ResponsesRequest
from heron.server.response_store import ResponseStore, StoredResponse
from heron.server.responses import _ResponseBuilder
from heron.structured.params import StructuredOutputsParams
from heron.structured.tool_parsers import ToolCallDelta

LIMITS = Limits(max_n=4, max_logprobs=5, vocab_size=1000)
TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


def _messages(spec_input: object) -> list[dict]:
    assert isinstance(spec_input, ChatInput)
    return spec_input.messages


def _events(chunks: list[str]) -> list[dict]:
    return [json.loads(c.split("\ndata: ", 1)[1]) for c in chunks]


# ---- Responses: requests ----------------------------------------------------------------------


def test_responses_items_become_chat_messages() -> None:
    req = ResponsesRequest.model_validate({
        "instructions": "Be brief.",
        "input": [
            {"role": "developer", "content": "Use metric units."},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Weather in "},
                         {"type": "input_text", "text": "Paris and Rome?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather",
             "arguments": '{"city": "Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_weather",
             "arguments": '{"city": "Rome"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2",
             "output": [{"type": "input_text", "text": "rain"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny, rain."}]},
        ],
        "tools": [TOOL], "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False, "max_output_tokens": 16, "temperature": 0.5, "top_p": 0.9,
        "text": {"format": {"type": "json_object"}}})
    spec = req.to_spec(LIMITS)
    messages = _messages(spec.input)
    assert [m["role"] for m in messages] == ["system", "system", "user", "assistant", "tool",
                                             "tool", "assistant"]
    assert messages[0]["content"] == "Be brief." and messages[2]["content"] == "Weather in Paris and Rome?"
    calls = messages[3]["tool_calls"]
    assert [c["id"] for c in calls] == ["c1", "c2"]
    assert calls[1]["function"] == {"name": "get_weather", "arguments": {"city": "Rome"}}
    assert (messages[5]["tool_call_id"], messages[5]["content"]) == ("c2", "rain")
    assert spec.input.tools == [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object"}}}]
    assert spec.tools is not None and spec.tools.named == "get_weather"
    assert spec.tools.choice is None and spec.tools.parallel is False
    assert spec.constraint == ("text.format", StructuredOutputsParams.json_object())
    p = spec.params
    assert (p.max_tokens, p.temperature, p.top_p, p.n) == (16, 0.5, 0.9, 1)


def test_responses_take_chats_sampling_knobs() -> None:
    knobs = {"seed": 7, "stop": ["."], "frequency_penalty": 0.5, "presence_penalty": 0.25,
             "repetition_penalty": 1.1, "top_k": 5, "min_p": 0.05}
    p = ResponsesRequest.model_validate({"input": "Hi", **knobs}).to_spec(LIMITS).params
    assert {k: getattr(p, k) for k in knobs} == knobs
    with pytest.raises(ValueError, match="top_k"):
        ResponsesRequest.model_validate({"input": "Hi", "top_k": -5}).to_spec(LIMITS)


def test_responses_history_comes_after_instructions() -> None:
    req = ResponsesRequest.model_validate({"input": "And Italy?", "instructions": "Be brief."})
    req.set_history([ChatMessage(role="user", content="Capital of France?"),
                     ChatMessage(role="assistant", content="Paris.")])
    messages = _messages(req.to_spec(LIMITS).input)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "Be brief."), ("user", "Capital of France?"), ("assistant", "Paris."),
        ("user", "And Italy?")]
    assert [m.role for m in req.input_messages()] == ["user"]


@pytest.mark.parametrize("body,message", [
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type 'item_reference' is not"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input[0].call_id: Field required"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name: Field required"),
    ({"input": "x", "include": ["message.output_text.logprobs"]}, "include: 'message.output_text"),
    ({"input": "x", "max_output_tokens": 15}, "Expected a value >= 16, but got 15"),
    ({"input": []}, "input: at least one item is required"),
])
def test_responses_bad_items_name_themselves(body: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        ResponsesRequest.model_validate(body).to_spec(LIMITS)
    assert message in str(err.value)


# ---- Responses: the event builder -------------------------------------------------------------


def test_response_builder_text_then_call() -> None:
    builder = _ResponseBuilder(ResponseObject(id="resp_1", model="m"))
    chunks = builder.start() + builder.text("Let me ") + builder.text("check.")
    chunks += builder.call(ToolCallDelta(0, '{"city": ', "call_1", "get_weather"))
    chunks += builder.call(ToolCallDelta(0, '"Paris"}')) + builder.finish(incomplete=False)
    chunks.append(builder.done())
    events = _events(chunks)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert chunks[0].startswith("event: response.created\ndata: ")
    assert events[9]["output_index"] == 1 and events[9]["item"]["arguments"] == ""
    final = events[-1]["response"]
    assert final["status"] == "completed"
    assert [i["type"] for i in final["output"]] == ["message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == final["output_text"] == "Let me check."
    assert final["output"][1] == {"type": "function_call", "id": events[9]["item"]["id"],
                                  "call_id": "call_1", "name": "get_weather",
                                  "arguments": '{"city": "Paris"}', "status": "completed"}


def test_response_builder_empty_and_incomplete() -> None:
    builder = _ResponseBuilder(ResponseObject(id="resp_1", model="m"))
    events = _events(builder.finish(incomplete=True) + [builder.done()])
    assert [e["type"] for e in events] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.incomplete"]
    final = events[-1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"
    assert builder.response.output_text == ""


# ---- Messages ---------------------------------------------------------------------------------


def test_messages_blocks_become_chat_messages() -> None:
    req = MessagesRequest.model_validate({
        "model": "m", "max_tokens": 5,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1",
                 "content": [{"type": "text", "text": "sunny"}]},
                {"type": "text", "text": "Thanks!"}]},
        ],
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["\n\n"], "top_k": 5,
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}})
    spec = req.to_spec(LIMITS)
    messages = _messages(spec.input)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "Be brief.\nBe kind."), ("user", "Weather?"), ("assistant", "Checking."),
        ("tool", "sunny"), ("user", "Thanks!")]
    assert messages[2]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                         "arguments": {"city": "Paris"}}
    assert messages[3]["tool_call_id"] == "toolu_1"
    assert spec.tools is not None
    assert (spec.tools.choice, spec.tools.named, spec.tools.parallel) == ("required", None, False)
    assert spec.params.stop == ["\n\n"] and spec.params.top_k == 5 and spec.params.max_tokens == 5
    assert spec.constraint == ("output_config.format",
                               StructuredOutputsParams.json_schema({"type": "object"}))


@pytest.mark.parametrize("choice,expected", [
    ({"type": "auto"}, ("auto", None)), ({"type": "none"}, ("none", None)),
    ({"type": "tool", "name": "get_weather"}, (None, "get_weather")),
])
def test_messages_tool_choice(choice: dict, expected: tuple) -> None:
    req = MessagesRequest.model_validate({
        "model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "tool_choice": choice})
    tools = req.to_spec(LIMITS).tools
    assert tools is not None and (tools.choice, tools.named) == expected


@pytest.mark.parametrize("body,message", [
    ({"messages": []}, "messages: at least one message"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                  "input": {}}]}]},
     "messages.0.content.0.type: 'tool_use' blocks are not supported in user messages"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "tool"}},
     "tool_choice.name: required"),
    ({"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled",
                                                                   "budget_tokens": 1024}},
     "thinking: extended thinking is not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "stop_sequences": ["END", ""]},
     "stop_sequences: must be non-empty strings"),
])
def test_messages_bad_requests_name_the_field(body: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        MessagesRequest.model_validate({"model": "m", "max_tokens": 5, **body}).to_spec(LIMITS)
    assert message in str(err.value)


def test_messages_thinking_left_to_the_model_is_accepted() -> None:
    for kind in ("disabled", "adaptive"):
        MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "thinking": {"type": kind},
                                        "messages": [{"role": "user", "content": "x"}]}
                                       ).to_spec(LIMITS)


def test_anthropic_error_shape() -> None:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "request_too_large", 415: "invalid_request_error", 500: "api_error",
             503: "overloaded_error"}
    for status, kind in kinds.items():
        assert anthropic_error(make_error(status, "why", param="x")) == {
            "type": "error", "error": {"type": kind, "message": "why"}}


@pytest.mark.parametrize("finish,stop,calls,expected", [
    ("stop", None, False, ("end_turn", None)),
    ("stop", 106, False, ("end_turn", None)),  # a stop token id
    ("stop", "\n\n", False, ("stop_sequence", "\n\n")),
    ("length", None, False, ("max_tokens", None)),
    ("stop", None, True, ("tool_use", None)),
    ("length", None, True, ("max_tokens", None)),
])
def test_stop_reasons(finish: str, stop: object, calls: bool, expected: tuple) -> None:
    assert stop_reason_of(finish, stop, calls) == expected  # type: ignore[arg-type]


def test_message_builder_text_then_tool_use() -> None:
    builder = _MessageBuilder(AnthropicResponse(id="msg_1", model="m",
                                                usage=AnthropicUsage(input_tokens=7,
                                                                     output_tokens=0)))
    chunks = builder.start() + builder.text("Let me check.")
    chunks += builder.call(ToolCallDelta(0, '{"city": "Pa', "call_1", "get_weather"))
    chunks += builder.call(ToolCallDelta(0, 'ris"}')) + builder.finish("stop", None, 9)
    events = _events(chunks)
    assert [e["type"] for e in events] == [
        "message_start", "ping", "content_block_start", "content_block_delta",
        "content_block_stop", "content_block_start", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert events[0]["message"]["content"] == [] and events[0]["message"]["usage"]["input_tokens"] == 7
    assert events[5]["index"] == 1 and events[5]["content_block"]["input"] == {}
    assert events[7]["delta"] == {"type": "input_json_delta", "partial_json": 'ris"}'}
    assert events[9]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    message = builder.message
    assert message.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert message.usage.output_tokens == 9 and message.stop_reason == "tool_use"


# ---- store and embeddings ---------------------------------------------------------------------


def test_response_store_is_bounded() -> None:
    store = ResponseStore(max_entries=2)
    for i in range(3):
        assert store.put(f"r{i}", StoredResponse(response=i, conversation=[]))
    assert len(store) == 2 and store.get("r0") is None and store.get("r2").response == 2
    assert store.delete("r1") and not store.delete("r1") and len(store) == 1
    off = ResponseStore(max_entries=0)
    assert not off.put("r", StoredResponse(response=0, conversation=[]))
    assert off.get("r") is None


def test_response_store_bounds_bytes() -> None:
    store = ResponseStore(max_entries=10, max_bytes=100)
    for i in range(4):
        assert store.put(f"r{i}", StoredResponse(response=i, conversation=[], size=40))
    assert [k for k in ("r0", "r1", "r2", "r3") if store.get(k)] == ["r2", "r3"]
    assert store.num_bytes == 80
    assert not store.put("big", StoredResponse(response=0, conversation=[], size=101))
    assert store.get("big") is None and store.num_bytes == 80
    assert store.delete("r2") and store.num_bytes == 40


def test_encode_vector() -> None:
    vec = np.array([3.0, 4.0, 12.0], dtype=np.float32) / 13.0
    assert encode_vector(vec, None, "float") == pytest.approx(vec.tolist())
    encoded = encode_vector(vec, 2, "base64")
    assert isinstance(encoded, str)
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), [0.6, 0.8],
                               atol=1e-7)


def test_embedding_inputs() -> None:
    assert EmbeddingRequest.model_validate({"input": "a"}).to_input().prompts == ["a"]
    assert EmbeddingRequest.model_validate({"input": [1, 2]}).to_input().prompts == [[1, 2]]
    assert EmbeddingRequest.model_validate({"input": [[1], [2]]}).to_input().prompts == [[1], [2]]
    bare = EmbeddingRequest.model_validate({"input": "a", "add_special_tokens": False})
    assert bare.to_input().add_special_tokens is False
    with pytest.raises(ValueError, match="dimensions must be in"):
        EmbeddingRequest.model_validate({"input": "a", "dimensions": 641}).check_dimensions(640)


def test_models_list_the_routes_that_serve_them() -> None:
    def ctx(template: str | None, num_labels: int = 0) -> object:
        return SimpleNamespace(tokenizer=SimpleNamespace(chat_template=template),
                               info=SimpleNamespace(num_labels=num_labels))

    unscored = ["/api/embed", "/api/embeddings", "/api/generate", "/detokenize", "/tokenize",
                "/v1/completions", "/v1/embeddings"]
    text_only = sorted(unscored + ["/v1/rerank", "/v1/score"])
    assert served_endpoints(ctx(None)) == text_only  # type: ignore[arg-type]
    assert served_endpoints(ctx("{{ messages }}")) == sorted(text_only + [  # type: ignore[arg-type]
        "/api/chat", "/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens",
        "/v1/responses"])
    assert served_endpoints(ctx(None, num_labels=2)) == text_only  # type: ignore[arg-type]
    assert served_endpoints(ctx(None, num_labels=3)) == unscored  # type: ignore[arg-type]


def test_sse_events_escape_the_line_breaks_json_leaves_raw() -> None:
    """NEL, U+2028 and U+2029 go out as JSON escapes: the event is one line for any splitter,
    and the data parses to the same string."""
    body = {"text": "a\u2028b\x85c\u2029d"}
    event = sse_event(json.dumps(body, ensure_ascii=False), "delta")
    assert event.splitlines() == ["event: delta", 'data: {"text": "a\\u2028b\\u0085c\\u2029d"}', ""]
    assert json.loads(event.splitlines()[1][len("data: "):]) == body


def test_messages_thinking_blocks_of_assistant_turns_are_their_reasoning() -> None:
    """A conversation begun with a model that thinks comes back with thinking blocks in its
    assistant turns (they were a 400): their text is the turn's reasoning_content for the chat
    template, which decides whether it is part of the prompt; redacted thinking is left out.
    In a user turn they stay a 400."""
    turns = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": [
                 {"type": "thinking", "thinking": "hmm", "signature": "s"},
                 {"type": "redacted_thinking", "data": "xyz"},
                 {"type": "text", "text": "Hello"}]},
             {"role": "user", "content": "more"}]
    req = MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "messages": turns})
    spec = req.to_spec(LIMITS)
    assert [(m["role"], m["content"]) for m in spec.input.messages] == [  # type: ignore[union-attr]
        ("user", "hi"), ("assistant", "Hello"), ("user", "more")]
    assert spec.input.messages[1]["reasoning_content"] == "hmm"  # type: ignore[union-attr]
    turns[0] = {"role": "user", "content": [{"type": "thinking", "thinking": "x"}]}
    with pytest.raises(ValueError, match="'thinking' blocks are not supported in user messages"):
        MessagesRequest.model_validate({"model": "m", "max_tokens": 5,
                                        "messages": turns}).to_spec(LIMITS)
