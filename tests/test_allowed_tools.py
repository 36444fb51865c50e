"""OpenAI's ``tool_choice: {"type": "allowed_tools", ...}`` (chat's nested ``allowed_tools``,
Responses' flat form): the calls may name only the listed functions, while the chat template
still shows every tool. The plan's grammar walked with llguidance; through the app with a
scripted engine (``tests.fake_engine``): the constraint the engine gets, the prompt, the 400s."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from heron.server.app import build_app
from heron.structured.grammar import _byte_tokenizer, grammar_text
from heron.structured.tool_parsers import HermesParser, Llama3JsonParser
from heron.structured.tools import ToolSpec, plan_tool_use
from tests.fake_engine import (
    EOS,
    FakeEngine,
    char_tokenizer_for_serving,
    serving_context,
    tokens,
)

WEATHER = ToolSpec.of("get_weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                      "required": ["city"]})
TIME = ToolSpec.of("get_time", None)
CALL_TIME = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
CALL_WEATHER = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'


def fits(plan_constraint: Any, text: str) -> tuple[bool, bool]:
    """(every byte fits, the output may end there) for the plan's grammar."""
    from llguidance import LLMatcher

    matcher = LLMatcher(_byte_tokenizer(), grammar_text(plan_constraint))
    assert not matcher.is_error(), matcher.get_error()
    ok = all(matcher.consume_token(b) for b in text.encode())
    return ok, ok and matcher.is_accepting()


@pytest.mark.parametrize("mode", ["auto", "required"])
def test_only_the_allowed_functions_may_be_called(mode: str) -> None:
    plan = plan_tool_use([WEATHER, TIME], mode, None, True, None, None, ("get_time",))
    assert isinstance(plan.parser, HermesParser)
    assert fits(plan.constraint, CALL_TIME) == (True, True)
    assert fits(plan.constraint, CALL_WEATHER)[0] is False
    assert fits(plan.constraint, "It is noon.") == ((True, True) if mode == "auto"
                                                    else (False, False))
    everything = plan_tool_use([WEATHER, TIME], mode, None, True, None, None)
    assert fits(everything.constraint, CALL_WEATHER) == (True, True)


def test_auto_with_a_subset_is_constrained_under_a_tool_call_parser() -> None:
    """--tool-call-parser leaves plain auto to the model's own format; with a subset allowed, the
    calls are constrained in that format (else the model could call any tool)."""
    subset = plan_tool_use([WEATHER, TIME], "auto", None, True, "llama3_json", None, ("get_time",))
    assert isinstance(subset.parser, Llama3JsonParser) and subset.constraint is not None
    assert fits(subset.constraint, '{"name": "get_time", "parameters": {}}') == (True, True)
    assert fits(subset.constraint, '{"name": "get_weather", "parameters": {"city": "R"}}')[0] is False
    every = plan_tool_use([WEATHER, TIME], "auto", None, True, "llama3_json", None,
                          ("get_time", "get_weather"))
    assert every.constraint is None  # all allowed: plain auto


# ---- through the app ---------------------------------------------------------------------------

USER = [{"role": "user", "content": "Hi"}]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
            "{% endfor %}{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT_TOOLS = [{"type": "function", "function": {"name": t.name, "parameters": t.parameters}}
              for t in (WEATHER, TIME)]
RESPONSES_TOOLS = [{"type": "function", "name": t.name, "parameters": t.parameters}
                   for t in (WEATHER, TIME)]


def serve() -> tuple[TestClient, FakeEngine]:
    from heron.tokenizer.tokenizer import Tokenizer

    engine = FakeEngine(lambda request: tokens(CALL_TIME, [EOS], finish="stop", stop_reason=EOS))
    hf = char_tokenizer_for_serving().hf
    ctx = serving_context(engine, Tokenizer(hf, chat_template=TEMPLATE, name="m"))
    return TestClient(build_app(ctx.config, ctx), base_url="http://127.0.0.1"), engine


def chat_choice(mode: str, *names: str) -> dict[str, Any]:
    return {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": [
        {"type": "function", "function": {"name": n}} for n in names]}}


def responses_choice(mode: str, *names: str) -> dict[str, Any]:
    return {"type": "allowed_tools", "mode": mode,
            "tools": [{"type": "function", "name": n} for n in names]}


@pytest.mark.parametrize("route", ["chat", "responses"])
@pytest.mark.parametrize("mode", ["auto", "required"])
def test_the_engine_gets_the_allowed_calls_and_the_template_every_tool(route: str,
                                                                       mode: str) -> None:
    client, engine = serve()
    if route == "chat":
        r = client.post("/v1/chat/completions", json={
            "messages": USER, "tools": CHAT_TOOLS, "tool_choice": chat_choice(mode, "get_time")})
        assert r.status_code == 200, r.text
        (call,) = r.json()["choices"][0]["message"]["tool_calls"]
        assert (call["function"]["name"], call["function"]["arguments"]) == ("get_time", "{}")
    else:
        r = client.post("/v1/responses", json={
            "input": "Hi", "tools": RESPONSES_TOOLS,
            "tool_choice": responses_choice(mode, "get_time")})
        assert r.status_code == 200, r.text
        (item,) = r.json()["output"]
        assert (item["type"], item["name"], item["arguments"]) == ("function_call", "get_time", "{}")
        assert r.json()["tool_choice"] == responses_choice(mode, "get_time")
    request = engine.requests[-1]
    prompt = char_tokenizer_for_serving().hf.decode(request.prompt_token_ids)
    assert prompt.endswith("[get_weather][get_time]<assistant>")
    expected = plan_tool_use([WEATHER, TIME], mode, None, True, None, None, ("get_time",))
    constraint = request.sampling_params.structured_outputs
    assert constraint == expected.constraint
    assert '"const": "get_time"' in constraint.spec and "get_weather" not in constraint.spec


BAD = [
    ("chat", chat_choice("auto", "get_time", "nope"),
     "tool_choice.allowed_tools.tools[1].function.name",
     "tool_choice.allowed_tools.tools[1].function.name: the function 'nope' is not among the "
     "tools (get_weather, get_time)"),
    ("chat", chat_choice("required"), "tool_choice.allowed_tools.tools",
     "tool_choice.allowed_tools.tools: the allowed tools must name at least one function"),
    ("chat", {"type": "allowed_tools", "allowed_tools": {"mode": "always", "tools": []}},
     "tool_choice.allowed_tools.mode", None),
    ("responses", responses_choice("required", "nope"), "tool_choice.tools[0].name",
     "tool_choice.tools[0].name: the function 'nope' is not among the tools "
     "(get_weather, get_time)"),
    ("responses", {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "mcp"}]},
     "tool_choice.tools[0].type",
     "tool_choice.tools[0].type 'mcp' is not supported: this server offers function tools only"),
]


@pytest.mark.parametrize("route,choice,param,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_allowed_tools_are_400s_naming_the_field(route: str, choice: dict[str, Any],
                                                     param: str, message: str | None) -> None:
    client, engine = serve()
    if route == "chat":
        r = client.post("/v1/chat/completions", json={
            "messages": USER, "tools": CHAT_TOOLS, "tool_choice": choice})
    else:
        r = client.post("/v1/responses", json={
            "input": "Hi", "tools": RESPONSES_TOOLS, "tool_choice": choice})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    if message is not None:
        assert error["message"] == message
    assert engine.requests == []
