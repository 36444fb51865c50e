"""Reasoning parsers (``heron.server.reasoning``): the split of ``<think>...</think>`` off the
answer, and what each route makes of it, through the real app with a scripted engine
(``tests.fake_engine``; the character tokenizer, one token per character): exact bodies,
stream pieces and usage."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from heron.engine.messages import EngineOutput
from heron.server.app import build_app
from heron.server.reasoning import (
    ReasoningParser,
    ReasoningStream,
    resolve_reasoning_parser,
)
from heron.structured.params import StructuredOutputsParams
from heron.tokenizer.tokenizer import Tokenizer
from tests.fake_engine import (
    EOS,
    MODEL,
    FakeEngine,
    char_tokenizer_for_serving,
    serving_context,
    tokens,
)

USER = [{"role": "user", "content": "Hi"}]
_TURNS = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
# Qwen3's way: the model opens <think> itself; enable_thinking false closes an empty one.
QWEN_TEMPLATE = _TURNS + ("{% if add_generation_prompt %}<assistant>{% if enable_thinking is "
                          "defined and not enable_thinking %}<think></think>{% endif %}{% endif %}")
# DeepSeek-R1's (and Qwen3 thinking-2507's) way: the prompt opens it.
OPENED_TEMPLATE = _TURNS + "{% if add_generation_prompt %}<assistant><think>\n{% endif %}"
PLAIN_TEMPLATE = _TURNS + "{% if add_generation_prompt %}<assistant>{% endif %}"

# 7 + 5 + 5 + 8 tokens of reasoning (tags included), then 4 of content and the eos.
THOUGHT = ("<think>", "\nPlan", " it.\n", "</think>", "\n\nHi")
THOUGHT_TOKENS, REASONING_TOKENS = 30, 25
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def serve(outputs: list[EngineOutput], template: str = QWEN_TEMPLATE,
          **config: object) -> tuple[TestClient, FakeEngine]:
    engine = FakeEngine(lambda request: list(outputs), max_model_len=4096)
    hf = char_tokenizer_for_serving().hf
    ctx = serving_context(engine, Tokenizer(hf, chat_template=template, name=MODEL), **config)
    return TestClient(build_app(ctx.config, ctx), base_url="http://127.0.0.1"), engine


def thought(*more: str | list[int], finish: str = "stop") -> list[EngineOutput]:
    return tokens(*THOUGHT, *more, [EOS], finish=finish, stop_reason=EOS)


def data_events(body: str) -> list[dict[str, Any]]:
    """An SSE body's JSON payloads (OpenAI chat's ``data:`` lines; Responses' and Anthropic's
    ``event:`` + ``data:`` pairs, the event name checked against the payload's type)."""
    out = []
    for frame in body.split("\n\n"):
        lines = frame.split("\n")
        if not frame or lines[-1] == "data: [DONE]":
            continue
        payload = json.loads(lines[-1].removeprefix("data: "))
        if len(lines) == 2:
            assert lines[0] == f"event: {payload['type']}"
        out.append(payload)
    return out


def prompt_text(engine: FakeEngine) -> str:
    return char_tokenizer_for_serving().hf.decode(engine.requests[-1].prompt_token_ids,
                                                  skip_special_tokens=True)


# ---- the parser -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text,opened,reasoning,content,reasoning_tokens", [
    ("<think>\nab c \n</think>\n\nHi there", False, "ab c", "Hi there", 22),
    ("  <think>x</think>", False, "x", "", 18),
    ("Hello <think>x</think>", False, "", "Hello <think>x</think>", 0),
    ("\n\nHello", False, "", "\n\nHello", 0),
    ("<think>cut short", False, "cut short", "", 16),
    ("<think></think>Hi", False, "", "Hi", 15),
    ("plan</think>answer", True, "plan", "answer", 12),
    ("<think>plan</think>answer", True, "plan", "answer", 19),
    ("all thinking", True, "all thinking", "", 12),
    ("<thin", False, "", "<thin", 0),
    ("a </thi", True, "a </thi", "", 7),
])
def test_split_streamed_equals_whole(text: str, opened: bool, reasoning: str, content: str,
                                     reasoning_tokens: int) -> None:
    """One character a step or all at once: the same split; reasoning tokens are those of the
    steps that began before the content (the tags count as reasoning)."""
    whole = ReasoningStream(ReasoningParser(opened))
    assert whole.feed(text, len(text), final=True) == (reasoning, content)
    stream = ReasoningStream(ReasoningParser(opened))
    pieces = [stream.feed(c, 1, final=i == len(text) - 1) for i, c in enumerate(text)]
    assert "".join(r for r, _ in pieces) == reasoning
    assert "".join(c for _, c in pieces) == content
    assert stream.reasoning_tokens == reasoning_tokens


def test_a_partial_closing_tag_waits() -> None:
    stream = ReasoningStream(ReasoningParser(True))
    assert stream.feed("ab </th") == ("ab", "")
    assert stream.feed("ink> done") == ("", "done")


def test_which_parser_runs() -> None:
    assert resolve_reasoning_parser("auto", QWEN_TEMPLATE) == "qwen3"
    assert resolve_reasoning_parser("auto", PLAIN_TEMPLATE) is None
    assert resolve_reasoning_parser("auto", None) is None
    assert resolve_reasoning_parser("none", QWEN_TEMPLATE) is None
    assert resolve_reasoning_parser("deepseek_r1", PLAIN_TEMPLATE) == "deepseek_r1"
    assert ReasoningParser.of("qwen3", "<assistant><think>\n") == ReasoningParser(True)
    assert ReasoningParser.of("qwen3", "<assistant>") == ReasoningParser(False)
    assert ReasoningParser.of("deepseek_r1", "<assistant>") == ReasoningParser(True)
    # A prompt that closed an empty reasoning: thinking off, whatever the parser.
    for name in ("qwen3", "deepseek_r1"):
        assert ReasoningParser.of(name, "<assistant><think>\n\n</think>\n\n") == \
            ReasoningParser(False, thinking=False)
    assert [ReasoningParser(True).grammar_mode, ReasoningParser(False).grammar_mode,
            ReasoningParser(False, thinking=False).grammar_mode] == ["opened", "may_open", ""]
    with pytest.raises(ValueError, match="reasoning_parser must be one of auto, none, qwen3"):
        serve(thought(), reasoning_parser="r1")


# ---- chat completions -----------------------------------------------------------------------------


def test_ollama_tool_calls_are_read_from_the_content_only() -> None:
    """As on chat: the thinking is message.thinking, neither content nor a call (the tool
    parser read the whole output, tags and thinking included, into content and calls)."""
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "%s"}}</tool_call>'
    client, _ = serve(tokens("<think>", "maybe " + call % "Rome", "</think>", "\n" + call % "Paris",
                             [EOS], finish="stop", stop_reason=EOS), tool_call_parser="hermes")
    body = {"model": MODEL, "messages": USER, "tools": [WEATHER_TOOL]}
    message = client.post("/api/chat", json={**body, "stream": False}).json()["message"]
    assert (message["thinking"], message["content"]) == ("maybe " + call % "Rome", "")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] \
        == [("get_weather", {"city": "Paris"})]
    lines = [json.loads(line) for line in client.post("/api/chat", json=body).text.splitlines()]
    assert "".join(line["message"]["content"] for line in lines) == ""
    assert "".join(line["message"].get("thinking", "") for line in lines) == "maybe " + call % "Rome"
    assert [c["function"]["arguments"] for line in lines
            for c in line["message"].get("tool_calls", [])] == [{"city": "Paris"}]


def test_chat_message_has_reasoning_apart() -> None:
    client, engine = serve(thought())
    r = client.post("/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hi", "refusal": None,
                                 "tool_calls": [], "reasoning": "Plan it.",
                                 "reasoning_content": "Plan it."}
    assert choice["finish_reason"] == "stop"
    prompt = len(engine.requests[0].prompt_token_ids)
    assert r.json()["usage"] == {
        "prompt_tokens": prompt, "completion_tokens": THOUGHT_TOKENS,
        "total_tokens": prompt + THOUGHT_TOKENS, "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": REASONING_TOKENS}}


def test_chat_stream_sends_reasoning_then_content() -> None:
    client, _ = serve(thought())
    r = client.post("/v1/chat/completions", json={
        "messages": USER, "stream": True, "stream_options": {"include_usage": True}})
    *chunks, usage = data_events(r.text)
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"reasoning": "Plan", "reasoning_content": "Plan"},
        {"reasoning": " it.", "reasoning_content": " it."},
        {"content": "Hi"},
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage["usage"]["completion_tokens_details"] == {"reasoning_tokens": REASONING_TOKENS}


def test_chat_finish_inside_the_thinking_leaves_no_content() -> None:
    client, _ = serve(tokens("<think>", "\nPlan", " it", finish="length"))
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 15})
    (choice,) = r.json()["choices"]
    assert (choice["message"]["content"], choice["message"]["reasoning"],
            choice["finish_reason"]) == (None, "Plan it", "length")
    assert r.json()["usage"]["completion_tokens_details"] == {"reasoning_tokens": 15}
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 15,
                                                  "stream": True})
    deltas = [c["choices"][0]["delta"] for c in data_events(r.text)]
    assert [d for d in deltas if "content" in d] == [{"role": "assistant", "content": ""}]


def test_stop_strings_act_on_the_content_only() -> None:
    """"Plan" in the thinking does not stop it; in the content it does (and is cut)."""
    client, engine = serve(tokens("<think>", "Plan", "</think>", "Hi Plan", " more",
                                  finish="length"))
    r = client.post("/v1/chat/completions", json={"messages": USER, "stop": ["Plan"]})
    (choice,) = r.json()["choices"]
    assert (choice["message"]["reasoning"], choice["message"]["content"]) == ("Plan", "Hi ")
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "Plan")
    assert engine.aborted == [engine.requests[0].request_id]


def test_tool_calls_are_read_from_the_content_only() -> None:
    """A call the model only thought about is no call."""
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "%s"}}</tool_call>'
    client, _ = serve(tokens("<think>", "maybe " + call % "Rome", "</think>", "\n" + call % "Paris",
                             [EOS], finish="stop", stop_reason=EOS), tool_call_parser="hermes")
    r = client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER_TOOL]})
    (choice,) = r.json()["choices"]
    message = choice["message"]
    assert message["reasoning"] == "maybe " + call % "Rome"
    assert message["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] \
        == [("get_weather", '{"city": "Paris"}')]
    assert choice["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("template,parser", [(OPENED_TEMPLATE, "auto"),
                                             (PLAIN_TEMPLATE, "deepseek_r1")])
def test_output_that_starts_inside_the_thinking(template: str, parser: str) -> None:
    """The prompt opened <think> (auto reads it so), or deepseek_r1 takes it as opened."""
    client, _ = serve(tokens("Plan.", "</think>", "Hi", finish="length"), template,
                      reasoning_parser=parser)
    message = client.post("/v1/chat/completions", json={"messages": USER}).json()[
        "choices"][0]["message"]
    assert (message["reasoning"], message["content"]) == ("Plan.", "Hi")


def test_a_prompt_that_closed_the_thinking_starts_no_reasoning() -> None:
    """deepseek_r1 reads the output as inside the reasoning, unless the prompt closed an empty
    one (thinking off): then the answer is the content (it was all reasoning)."""
    client, _ = serve(tokens("Hi", [EOS], finish="stop", stop_reason=EOS),
                      reasoning_parser="deepseek_r1")
    message = client.post("/v1/chat/completions", json={
        "messages": USER, "reasoning_effort": "none"}).json()["choices"][0]["message"]
    assert (message["reasoning"], message["content"]) == (None, "Hi")


def test_reasoning_parser_none_leaves_the_text_whole() -> None:
    client, _ = serve(thought(), reasoning_parser="none")
    r = client.post("/v1/chat/completions", json={"messages": USER})
    message = r.json()["choices"][0]["message"]
    assert (message["content"], message["reasoning"]) == ("".join(THOUGHT), None)
    assert "completion_tokens_details" not in r.json()["usage"]


@pytest.mark.parametrize("template,kwargs,think", [
    (OPENED_TEMPLATE, {}, "opened"),
    (QWEN_TEMPLATE, {}, "may_open"),
    (PLAIN_TEMPLATE, {"reasoning_parser": "deepseek_r1"}, "opened"),
])
def test_a_constrained_output_thinks_first(template: str, kwargs: dict[str, Any],
                                           think: str) -> None:
    """With thinking on, the grammar lets the reasoning come first (the engine gets the
    constraint with ``think`` set): the output splits as free text, the JSON is the content."""
    output = ("Plan.", "</think>", '\n\n{"a": 1}', [EOS])
    if think == "may_open":
        output = ("<think>", *output)
    client, engine = serve(tokens(*output, finish="stop", stop_reason=EOS), template, **kwargs)
    r = client.post("/v1/chat/completions", json={
        "messages": USER, "response_format": {"type": "json_object"}})
    message = r.json()["choices"][0]["message"]
    assert (message["reasoning"], message["content"]) == ("Plan.", '{"a": 1}')
    assert r.json()["usage"]["completion_tokens_details"] == {
        "reasoning_tokens": len("".join(output[:-2]))}
    constraint = engine.requests[-1].sampling_params.structured_outputs
    assert constraint == StructuredOutputsParams("json", '{"type": "object"}', think=think)


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", {"messages": USER, "reasoning_effort": "none"}),
    ("/v1/chat/completions", {"messages": USER,
                              "chat_template_kwargs": {"enable_thinking": False}}),
    ("/v1/messages", {"model": MODEL, "messages": USER, "max_tokens": 16,
                      "thinking": {"type": "disabled"}}),
])
def test_a_constrained_output_without_thinking_is_all_content(route: str,
                                                               body: dict[str, Any]) -> None:
    """Thinking off (the prompt closed an empty reasoning): the grammar is the plain one, from
    the first token, and the JSON is all content."""
    client, engine = serve(tokens('{"a": 1}', [EOS], finish="stop", stop_reason=EOS))
    fmt = ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}
           if route == "/v1/messages" else {"response_format": {"type": "json_object"}})
    r = client.post(route, json={**body, **fmt})
    assert r.status_code == 200, r.text
    assert prompt_text(engine).endswith("<think></think>")
    assert engine.requests[-1].sampling_params.structured_outputs.think == ""
    if route == "/v1/messages":
        assert [b["type"] for b in r.json()["content"]] == ["text"]
        assert r.json()["content"][0]["text"] == '{"a": 1}'
        return
    message = r.json()["choices"][0]["message"]
    assert (message["content"], message["reasoning"]) == ('{"a": 1}', None)
    assert r.json()["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}


def test_a_named_tool_call_is_read_after_the_thinking() -> None:
    """tool_choice named: the arguments are the content after </think>, not the reasoning."""
    client, engine = serve(tokens("<think>", 'city {"city": "Rome"}?', "</think>",
                                  '{"city": "Paris"}', [EOS], finish="stop", stop_reason=EOS))
    r = client.post("/v1/chat/completions", json={
        "messages": USER, "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    (choice,) = r.json()["choices"]
    assert choice["message"]["reasoning"] == 'city {"city": "Rome"}?'
    assert [(c["function"]["name"], c["function"]["arguments"])
            for c in choice["message"]["tool_calls"]] == [("get_weather", '{"city": "Paris"}')]
    assert engine.requests[-1].sampling_params.structured_outputs.think == "may_open"


# ---- Responses ------------------------------------------------------------------------------------


def test_responses_reasoning_item_before_the_message() -> None:
    client, _ = serve(thought())
    body = client.post("/v1/responses", json={"input": "Hi"}).json()
    reasoning, message = body["output"]
    assert reasoning == {"type": "reasoning", "id": reasoning["id"], "summary": [],
                         "content": [{"type": "reasoning_text", "text": "Plan it."}],
                         "status": "completed"}
    assert reasoning["id"].startswith("rs_")
    assert message["content"][0]["text"] == "Hi" and body["output_text"] == "Hi"
    assert body["usage"]["output_tokens"] == THOUGHT_TOKENS
    assert body["usage"]["output_tokens_details"] == {"reasoning_tokens": REASONING_TOKENS}


def test_responses_stream_reasoning_events() -> None:
    client, _ = serve(thought())
    r = client.post("/v1/responses", json={"input": "Hi", "stream": True})
    events = data_events(r.text)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    item_id = events[2]["item"]["id"]
    assert events[3]["part"] == {"type": "reasoning_text", "text": ""}
    assert [(e["item_id"], e["output_index"], e["delta"]) for e in events[4:6]] == [
        (item_id, 0, "Plan"), (item_id, 0, " it.")]
    assert events[6]["text"] == "Plan it."
    assert events[8]["item"]["content"] == [{"type": "reasoning_text", "text": "Plan it."}]
    assert events[11]["output_index"] == 1 and events[11]["delta"] == "Hi"
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["usage"]["output_tokens_details"] == {"reasoning_tokens": REASONING_TOKENS}


def test_responses_reasoning_items_sent_back_are_left_out() -> None:
    """A client that appends a response's output to its next input sends the reasoning item
    back; it is not part of the prompt."""
    client, engine = serve(thought())
    first = client.post("/v1/responses", json={"input": "Hi", "store": False}).json()
    r = client.post("/v1/responses", json={
        "input": [{"role": "user", "content": "Hi"}, *first["output"],
                  {"role": "user", "content": "More"}]})
    assert r.status_code == 200, r.text
    assert prompt_text(engine) == "<user>Hi\n<assistant>Hi\n<user>More\n<assistant>"


# ---- Anthropic Messages ---------------------------------------------------------------------------


def messages_body(**fields: object) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 2048, "messages": USER, **fields}  # > budget_tokens


def test_messages_thinking_blocks() -> None:
    client, engine = serve(thought())
    r = client.post("/v1/messages", json=messages_body(
        thinking={"type": "enabled", "budget_tokens": 1024}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["content"] == [{"type": "thinking", "thinking": "Plan it.", "signature": ""},
                               {"type": "text", "text": "Hi"}]
    assert body["stop_reason"] == "end_turn"
    assert body["usage"]["output_tokens"] == THOUGHT_TOKENS
    assert prompt_text(engine) == "<user>Hi\n<assistant>"  # enable_thinking true


def test_messages_thinking_disabled_reaches_the_template() -> None:
    client, engine = serve(tokens("Hi", finish="length"))
    r = client.post("/v1/messages", json=messages_body(thinking={"type": "disabled"}))
    assert r.json()["content"] == [{"type": "text", "text": "Hi"}]
    assert prompt_text(engine) == "<user>Hi\n<assistant><think></think>"


def test_messages_stream_thinking_deltas() -> None:
    client, _ = serve(thought())
    r = client.post("/v1/messages", json=messages_body(
        thinking={"type": "enabled", "budget_tokens": 1024}, stream=True))
    events = data_events(r.text)
    assert [(e["type"], e.get("index"), e.get("delta", e.get("content_block")))
            for e in events[2:-2]] == [
        ("content_block_start", 0, {"type": "thinking", "thinking": "", "signature": ""}),
        ("content_block_delta", 0, {"type": "thinking_delta", "thinking": "Plan"}),
        ("content_block_delta", 0, {"type": "thinking_delta", "thinking": " it."}),
        ("content_block_delta", 0, {"type": "signature_delta", "signature": ""}),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, {"type": "text", "text": ""}),
        ("content_block_delta", 1, {"type": "text_delta", "text": "Hi"}),
        ("content_block_stop", 1, None),
    ]
    assert events[-2]["usage"] == {"output_tokens": THOUGHT_TOKENS}


def test_messages_thinking_display_omitted() -> None:
    client, _ = serve(thought())
    r = client.post("/v1/messages", json=messages_body(
        thinking={"type": "enabled", "budget_tokens": 1024, "display": "omitted"}))
    assert r.json()["content"] == [{"type": "text", "text": "Hi"}]


def test_messages_thinking_refused_for_a_model_that_does_not_think() -> None:
    client, engine = serve(thought(), PLAIN_TEMPLATE)
    r = client.post("/v1/messages", json=messages_body(
        thinking={"type": "enabled", "budget_tokens": 1024}))
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "thinking: extended thinking is not supported by this model"}}
    r = client.post("/v1/messages", json=messages_body(thinking={"type": "sometimes"}))
    assert r.json()["error"]["message"] == ("thinking.type: 'sometimes' is not one of enabled, "
                                            "disabled, adaptive")
    assert engine.requests == []


# ---- an earlier turn's reasoning, sent back -------------------------------------------------------

# A template that renders an assistant turn's reasoning_content (Qwen3's does for the turns after
# the last user message: the tool calls in progress).
REPLAY_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{% if m.reasoning_content "
                   "%}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m['content'] }}{% for c "
                   "in m.tool_calls or [] %}<call>{{ c.function.name }}</call>{% endfor %}"
                   "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
TOOL_LOOP_PROMPT = "<user>Hi<assistant><think>Plan it.</think><call>get_weather</call><tool>sunny<assistant>"
ROME = '{"city": "Rome"}'


def test_reasoning_sent_back_reaches_the_template_on_every_route() -> None:
    """A tool-calling turn's thinking, sent back as each API sends it (chat's reasoning_content,
    a Responses reasoning item, Anthropic thinking blocks, Ollama's thinking), is the assistant
    turn's reasoning_content for the template: the same prompt on every route (chat's
    vLLM-named ``reasoning`` too: transformers aliases it). The other routes dropped it, so a
    template such as Qwen3's lost the thinking of the calls in progress, which Anthropic and
    Ollama keep."""
    client, engine = serve(thought(), REPLAY_TEMPLATE, tool_call_parser="hermes")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ROME}}
    chat = [{"role": "assistant", "content": None, key: "Plan it.", "tool_calls": [call]}
            for key in ("reasoning_content", "reasoning")]  # DeepSeek's name, vLLM's
    tool = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    bodies = [
        ("/v1/chat/completions", {"messages": [*USER, chat[0], tool]}),
        ("/v1/chat/completions", {"messages": [*USER, chat[1], tool]}),
        ("/v1/responses", {"input": [
            *USER, {"type": "reasoning", "id": "rs_1", "summary": [],
                    "content": [{"type": "reasoning_text", "text": "Plan it."}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": ROME},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]}),
        ("/v1/messages", messages_body(messages=[
            *USER, {"role": "assistant", "content": [
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "thinking", "thinking": "Plan it.", "signature": ""},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Rome"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1",
                                          "content": "sunny"}]}])),
        ("/api/chat", {"model": MODEL, "stream": False, "messages": [
            *USER, {"role": "assistant", "content": "", "thinking": "Plan it.", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
            {"role": "tool", "tool_name": "get_weather", "content": "sunny"}]}),
    ]
    for path, body in bodies:
        r = client.post(path, json=body)
        assert r.status_code == 200, (path, r.text)
        assert prompt_text(engine) == TOOL_LOOP_PROMPT, body


def test_responses_reasoning_kept_alike_by_previous_response_id_and_input() -> None:
    """previous_response_id replays the stored turn's reasoning as the item sent back does."""
    client, engine = serve(thought(), REPLAY_TEMPLATE)
    first = client.post("/v1/responses", json={"input": "Hi"}).json()
    assert [item["type"] for item in first["output"]] == ["reasoning", "message"]
    client.post("/v1/responses", json={"input": "More", "previous_response_id": first["id"]})
    expected = "<user>Hi<assistant><think>Plan it.</think>Hi<user>More<assistant>"
    assert prompt_text(engine) == expected
    client.post("/v1/responses", json={"input": [*USER, *first["output"],
                                                 {"role": "user", "content": "More"}]})
    assert prompt_text(engine) == expected
