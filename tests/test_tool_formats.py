"""The mistral and pythonic tool-call formats (vLLM's ``--tool-call-parser`` names): each parser
on exact model outputs, whole and streamed in random pieces; the grammars of tool_choice
required / named walked byte by byte with llguidance and their text read back by the parser;
Mistral's 9-character call ids out and in; and the routes through the app on a scripted engine."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from heron.server.app import build_app
from heron.structured.grammar import _byte_tokenizer, grammar_text
from heron.structured.tool_parsers import (
    MistralParser,
    NamedParser,
    ParsedCall,
    PythonicParser,
    ToolCallStream,
    ToolParser,
    mistral_template_id,
)
from heron.structured.tools import MarkerTokens, ToolSpec, plan_tool_use
from tests.fake_engine import EOS, FakeEngine, char_tokenizer_for_serving, serving_context, tokens

WEATHER = ToolSpec.of("get_weather", {
    "type": "object", "required": ["city"],
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                   "unit": {"type": "string", "enum": ["c", "f"]}}})
TIME = ToolSpec.of("get_time", None)
ORDER = ToolSpec.of("place_order", {
    "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
    "$defs": {"Item": {"type": "object", "required": ["name"],
                       "properties": {"name": {"type": "string"},
                                      "parts": {"type": "array", "items": {"$ref": "#/$defs/Item"}}}}},
})
MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")


def streamed(parser: ToolParser, text: str, seed: int) -> tuple[str, list[ParsedCall], list[str]]:
    """Content, calls and call ids of ``text`` fed in random pieces of 1-4 characters; checks
    that each call's first delta carries its id and name, later ones argument pieces only."""
    rng = random.Random(seed)
    stream = ToolCallStream(parser)
    content, got, ids = "", {}, []
    pos = 0
    while pos < len(text):
        step = rng.randint(1, 4)
        piece, pos = text[pos:pos + step], pos + step
        new_content, deltas = stream.feed(piece, final=pos >= len(text))
        content += new_content
        for d in deltas:
            if d.id is not None:
                assert d.index == len(got) and d.name is not None
                got[d.index] = [d.name, d.arguments]
                ids.append(d.id)
            else:
                assert d.name is None
                got[d.index][1] += d.arguments
    return content, [ParsedCall(n, a) for n, a in got.values()], ids


def check_whole_and_streamed(parser: ToolParser, text: str, content: str,
                             calls: list[ParsedCall]) -> None:
    parsed = parser.parse(text, final=True)
    assert (parsed.content, [ParsedCall(c.name, c.arguments) for c in parsed.calls]) == (
        content, calls)
    for seed in range(8):
        got_content, got_calls, _ = streamed(parser, text, seed)
        assert (got_content, got_calls) == (content, calls)


# ---- mistral ----------------------------------------------------------------------------------------

MISTRAL = [
    # Mistral 7B Instruct v0.3 (tokenizer v3): the marker, a space, a JSON list.
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]', "",
     [ParsedCall("get_weather", '{"city": "Paris", "unit": "c"}')]),
    # Two calls; strings holding brackets, commas, quotes and the marker's own text.
    ('Let me check.[TOOL_CALLS][{"name": "f", "arguments": {"q": "a], [b\\", {c}"}}, '
     '{"name": "get_time", "arguments": {}}]', "Let me check.",
     [ParsedCall("f", '{"q": "a], [b\\", {c}"}'), ParsedCall("get_time", "{}")]),
    # Tokenizer v11+ (Mistral Small 3.2): name[ARGS]{...} per call.
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]get_time[ARGS]{}', "",
     [ParsedCall("get_weather", '{"city": "Rome"}'), ParsedCall("get_time", "{}")]),
    # v11 with the call id; specials decoded with spaces between them.
    ('Sure [TOOL_CALLS] get_weather [CALL_ID] a1B2c3D4e [ARGS] {"city": "[TOOL_CALLS]x"}', "Sure",
     [ParsedCall("get_weather", '{"city": "[TOOL_CALLS]x"}')]),
    # Arguments that are no JSON object stay a call, their text as written (vLLM's v11 rule).
    ("[TOOL_CALLS]f[ARGS]not json", "", [ParsedCall("f", "not json")]),
    # No marker, or nothing readable after it: content.
    ("The weather is [sunny].", "The weather is [sunny].", []),
    ("[TOOL_CALLS] oops, no call", "[TOOL_CALLS] oops, no call", []),
    ('[TOOL_CALLS] [{"arguments": {}}]', '[TOOL_CALLS] [{"arguments": {}}]', []),
]


@pytest.mark.parametrize("text,content,calls", MISTRAL, ids=[str(i) for i in range(len(MISTRAL))])
def test_mistral_whole_and_streamed(text: str, content: str, calls: list[ParsedCall]) -> None:
    check_whole_and_streamed(MistralParser(), text, content, calls)


def test_mistral_ids_are_nine_letters_and_digits_or_the_models_own() -> None:
    text = '[TOOL_CALLS]f[CALL_ID]abcDEF123[ARGS]{}[TOOL_CALLS]g[ARGS]{}'
    _, _, ids = streamed(MistralParser(), text, 0)
    assert ids[0] == "abcDEF123" and MISTRAL_ID.fullmatch(ids[1])
    assert [c.id for c in MistralParser().parse(text, True).calls] == ["abcDEF123", None]
    assert MISTRAL_ID.fullmatch(MistralParser().new_call_id())
    # A named tool_choice under --tool-call-parser mistral makes Mistral ids too.
    named = plan_tool_use([WEATHER], None, "get_weather", True, "mistral", None).parser
    assert isinstance(named, NamedParser) and MISTRAL_ID.fullmatch(named.new_call_id())
    # Ids coming back: kept when they fit, else mapped the same way every time.
    assert mistral_template_id("abcDEF123") == "abcDEF123"
    assert mistral_template_id("call_0123456789abcdef01234567") == "bcdef01234567"[-9:]
    assert mistral_template_id("toolu_01A09q90qw90lq917835lq9") == "917835lq9"
    odd = mistral_template_id("call-1_")
    assert MISTRAL_ID.fullmatch(odd) and odd == mistral_template_id("call-1_")
    assert odd != mistral_template_id("call-2_")


def test_mistral_holds_back_a_possible_marker_while_streaming() -> None:
    parser = MistralParser()
    assert parser.parse("Hello [TOOL_", final=False).content == "Hello"
    assert parser.parse("Hello [TOOL_", final=True).content == "Hello [TOOL_"
    assert parser.parse("Hello [b", final=False).content == "Hello [b"
    # The name is reported once [ARGS] (or the arguments' brace) ends it.
    assert parser.parse("[TOOL_CALLS]get_wea", final=False).calls == []
    assert parser.parse('[TOOL_CALLS]get_weather[ARGS]{"city": "Pa', final=True).calls == [
        ParsedCall("get_weather", '{"city": "Pa')]


# ---- pythonic ---------------------------------------------------------------------------------------

PYTHONIC = [
    # Llama 3.2: nested literals, strings with brackets, commas, quotes and parentheses.
    ('[get_weather(city="Paris, (FR) [x]", days=3), get_time()]', "",
     [ParsedCall("get_weather", '{"city": "Paris, (FR) [x]", "days": 3}'),
      ParsedCall("get_time", "{}")]),
    ("[f(a={'k': [1, -2.5, None, True, (3, 'x')]}, b='it\\'s \"q\"', c=\"\"\"tri)ple\"\"\")]", "",
     [ParsedCall("f", '{"a": {"k": [1, -2.5, null, true, [3, "x"]]}, "b": "it\'s \\"q\\"", '
                      '"c": "tri)ple"}')]),
    # Llama 4: the list between <|python_start|> and <|python_end|>; JSON's literal names too.
    ('<|python_start|>[f(x=true, y=null, z="é")]<|python_end|>', "",
     [ParsedCall("f", '{"x": true, "y": null, "z": "é"}')]),
    # Text after the list is content.
    ("[get_time()] Done.", "Done.", [ParsedCall("get_time", "{}")]),
    # Anything else is content: no list, a list of values, a variable, a positional argument,
    # an expression, a call of an attribute, a non-finite number, **kwargs.
    ("It is [probably] sunny.", "It is [probably] sunny.", []),
    ("[1, 2, 3]", "[1, 2, 3]", []),
    ("[get_weather(city=paris)]", "[get_weather(city=paris)]", []),
    ('[get_weather("Paris")]', '[get_weather("Paris")]', []),
    ("[f(a=1+2)]", "[f(a=1+2)]", []),
    ("[os.system(cmd='ls')]", "[os.system(cmd='ls')]", []),
    ("[f(a=1e999)]", "[f(a=1e999)]", []),
    ("[f(**{'a': 1})]", "[f(**{'a': 1})]", []),
    ("[f(a=1, a=2)]", "[f(a=1, a=2)]", []),
    # Cut short before its first call ends: content.
    ('[get_weather(city="Pa', '[get_weather(city="Pa', []),
]


@pytest.mark.parametrize("text,content,calls", PYTHONIC, ids=[str(i) for i in range(len(PYTHONIC))])
def test_pythonic_whole_and_streamed(text: str, content: str, calls: list[ParsedCall]) -> None:
    check_whole_and_streamed(PythonicParser(), text, content, calls)


def test_pythonic_reports_each_call_once_it_closes() -> None:
    parser = PythonicParser()
    assert parser.parse("[get_weather(city='Rome'", final=False) == parser.parse("", False)
    first = parser.parse("[get_weather(city='Rome'), get_ti", final=False)
    assert first.calls == [ParsedCall("get_weather", '{"city": "Rome"}')] and first.content == ""
    # A later call that is not a call ends the list; the calls before it stand.
    assert parser.parse("[get_time(), f(x=y)]", final=True).calls == [ParsedCall("get_time", "{}")]


# ---- grammars: what they force, the parser reads ------------------------------------------------


def fits(constraint: Any, text: str) -> tuple[bool, bool]:
    """(every byte fits, the output may end there) for the constraint's grammar."""
    from llguidance import LLMatcher

    matcher = LLMatcher(_byte_tokenizer(), grammar_text(constraint))
    assert not matcher.is_error(), matcher.get_error()
    ok = all(matcher.consume_token(b) for b in text.encode())
    return ok, ok and matcher.is_accepting()


GRAMMAR_CASES = [
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
     [ParsedCall("get_weather", '{"city": "Paris"}')]),
    ("mistral", '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}, '
                '{"name": "get_weather", "arguments": {"city": "a]b", "unit": "f"}}]',
     [ParsedCall("get_time", "{}"), ParsedCall("get_weather", '{"city": "a]b", "unit": "f"}')]),
    ("pythonic", '[get_weather(city="Paris")]', [ParsedCall("get_weather", '{"city": "Paris"}')]),
    ("pythonic", '[get_weather(city="x, y", days=2, unit="c"), get_time()]',
     [ParsedCall("get_weather", '{"city": "x, y", "days": 2, "unit": "c"}'),
      ParsedCall("get_time", "{}")]),
    ("pythonic", '[get_weather(city="R", unit="f")]',
     [ParsedCall("get_weather", '{"city": "R", "unit": "f"}')]),
    ("pythonic", '[place_order(item={"name": "kit", "parts": [{"name": "bolt"}]})]',
     [ParsedCall("place_order", '{"item": {"name": "kit", "parts": [{"name": "bolt"}]}}')]),
]


@pytest.mark.parametrize("fmt,text,calls", GRAMMAR_CASES, ids=[str(i) for i in range(len(GRAMMAR_CASES))])
def test_required_grammar_admits_calls_the_parser_reads(fmt: str, text: str,
                                                        calls: list[ParsedCall]) -> None:
    plan = plan_tool_use([WEATHER, TIME, ORDER], "required", None, True, fmt, None)
    assert fits(plan.constraint, text) == (True, True)
    assert plan.parser is not None and plan.parser.parse(text, final=True).calls == calls


@pytest.mark.parametrize("fmt,bad", [
    ("mistral", '[TOOL_CALLS] [{"name": "nope", "arguments": {}}]'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"days": 2}}]'),  # no city
    ("pythonic", "[nope()]"),
    ("pythonic", "[get_weather(days=2)]"),  # the required city left out
    ("pythonic", '[get_weather(unit="c", city="R")]'),  # out of the schema's order
    ("pythonic", '[get_weather(city="R", unit="kelvin")]'),  # not in the enum
    ("pythonic", "[get_weather(city=paris)]"),
    ("pythonic", "It is sunny."),
])
def test_required_grammar_refuses_what_is_no_valid_call(fmt: str, bad: str) -> None:
    plan = plan_tool_use([WEATHER, TIME], "required", None, True, fmt, None)
    assert fits(plan.constraint, bad) != (True, True)


@pytest.mark.parametrize("fmt,one,two", [
    ("mistral", '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]',
     '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]'),
    ("pythonic", "[get_time()]", "[get_time(), get_time()]"),
])
def test_parallel_tool_calls_false_allows_one_call(fmt: str, one: str, two: str) -> None:
    single = plan_tool_use([WEATHER, TIME], "required", None, False, fmt, None)
    assert fits(single.constraint, one) == (True, True)
    assert fits(single.constraint, two)[0] is False
    many = plan_tool_use([WEATHER, TIME], "required", None, True, fmt, None)
    assert fits(many.constraint, two) == (True, True)


@pytest.mark.parametrize("fmt", ["mistral", "pythonic"])
def test_auto_with_allowed_tools_is_text_or_an_allowed_call(fmt: str) -> None:
    call = {"mistral": '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]',
            "pythonic": "[get_time()]"}[fmt]
    plan = plan_tool_use([WEATHER, TIME], "auto", None, True, fmt, None, ("get_time",))
    assert fits(plan.constraint, call) == (True, True)
    assert fits(plan.constraint, "It is noon.") == (True, True)
    assert fits(plan.constraint, "[not a call")[0] is False
    assert plan_tool_use([WEATHER, TIME], "auto", None, True, fmt, None).constraint is None


def test_mistral_v11_grammar_names_the_vocabularys_marker_tokens() -> None:
    markers = MarkerTokens(tool_calls=9, args=32)
    plan = plan_tool_use([WEATHER, TIME], "required", None, False, "mistral", None, None, markers)
    assert plan.constraint is not None
    assert 'call_1: <[9]> "get_time" <[32]> %json' in plan.constraint.spec
    assert "calls: call\n" in plan.constraint.spec
    text_markers = plan_tool_use([WEATHER], "required", None, True, "mistral", None, None,
                                 MarkerTokens(tool_calls=9))
    assert text_markers.constraint is not None
    assert text_markers.constraint.spec.startswith('start: calls\ncalls: <[9]> " [" call')


# ---- through the app, on a scripted engine -------------------------------------------------------

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "{% if c.id|length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings "
    "with length 9!') }}{% endif %}[CALL {{ c.id }}]{% endfor %}"
    "{% elif m.role == 'tool' %}{% if m.tool_call_id|length != 9 %}{{ raise_exception('Tool "
    "call IDs should be alphanumeric strings with length 9!') }}{% endif %}"
    "[RESULT {{ m.tool_call_id }}]{{ m.content }}"
    "{% else %}<{{ m.role }}>{{ m.content }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT_TOOLS = [{"type": "function", "function": {"name": t.name, "parameters": t.parameters}}
              for t in (WEATHER, TIME)]
MISTRAL_OUT = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]'
PYTHONIC_OUT = '[get_weather(city="Rome")]'


def serve(parser: str, output: str) -> tuple[TestClient, FakeEngine]:
    from heron.tokenizer.tokenizer import Tokenizer

    engine = FakeEngine(lambda request: tokens(*output, [EOS], finish="stop", stop_reason=EOS))
    tokenizer = Tokenizer(char_tokenizer_for_serving().hf, chat_template=MISTRAL_TEMPLATE, name="m")
    ctx = serving_context(engine, tokenizer, tool_call_parser=parser)
    return TestClient(build_app(ctx.config, ctx), base_url="http://127.0.0.1"), engine


def sse_data(body: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in body.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("parser,output", [("mistral", MISTRAL_OUT), ("pythonic", PYTHONIC_OUT)])
def test_every_route_reads_the_format(parser: str, output: str) -> None:
    client, engine = serve(parser, output)
    ask = [{"role": "user", "content": "Weather in Rome?"}]
    r = client.post("/v1/chat/completions", json={"messages": ask, "tools": CHAT_TOOLS})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    assert (call["function"]["name"], call["function"]["arguments"]) == (
        "get_weather", '{"city": "Rome"}')
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    id_pattern = MISTRAL_ID if parser == "mistral" else re.compile(r"call_[0-9a-f]{24}")
    assert id_pattern.fullmatch(call["id"])
    # mistral keeps its special [TOOL_CALLS] in the text; pythonic leaves the default.
    assert engine.requests[-1].sampling_params.skip_special_tokens is (parser != "mistral")
    r = client.post("/v1/chat/completions", json={"messages": ask, "tools": CHAT_TOOLS,
                                                  "stream": True})
    deltas = [c["choices"][0]["delta"] for c in sse_data(r.text) if c["choices"]]
    pieces = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert pieces[0]["function"]["name"] == "get_weather" and id_pattern.fullmatch(pieces[0]["id"])
    assert "".join(p["function"].get("arguments") or "" for p in pieces) == '{"city": "Rome"}'
    assert not any(d.get("content") for d in deltas)
    r = client.post("/v1/responses", json={"input": "Weather in Rome?", "tools": [
        {"type": "function", "name": t.name, "parameters": t.parameters} for t in (WEATHER, TIME)]})
    (item,) = r.json()["output"]
    assert (item["type"], item["name"], item["arguments"]) == (
        "function_call", "get_weather", '{"city": "Rome"}')
    r = client.post("/v1/messages", json={"model": "fake-model", "max_tokens": 50, "messages": ask,
                                          "tools": [{"name": t.name, "input_schema": t.parameters}
                                                    for t in (WEATHER, TIME)]})
    (block,) = r.json()["content"]
    assert (block["type"], block["name"], block["input"]) == ("tool_use", "get_weather",
                                                              {"city": "Rome"})
    r = client.post("/api/chat", json={"model": "fake-model", "messages": ask, "stream": False,
                                       "tools": CHAT_TOOLS})
    (call,) = r.json()["message"]["tool_calls"]
    assert (call["function"]["name"], call["function"]["arguments"]) == ("get_weather",
                                                                         {"city": "Rome"})


def test_mistral_history_renders_whatever_ids_it_carries() -> None:
    """Ids heron made on another route (``call_``, ``toolu_``) or a client made reach the
    template as 9 letters and digits, a call and its result alike."""
    client, engine = serve("mistral", MISTRAL_OUT)
    for call_id in ("call_0123456789abcdef01234567", "toolu_01A09q90qw90lq917835lq9", "c-1",
                    "abcDEF123"):
        history = [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": call_id, "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
        ]
        r = client.post("/v1/chat/completions", json={"messages": history, "tools": CHAT_TOOLS,
                                                      "tool_choice": "none"})
        assert r.status_code == 200, r.text
        prompt = char_tokenizer_for_serving().hf.decode(engine.requests[-1].prompt_token_ids)
        mapped = mistral_template_id(call_id)
        assert f"[CALL {mapped}][RESULT {mapped}]sunny<assistant>" in prompt
    # Without the mistral parser the ids pass unchanged (and this template refuses them).
    other, _ = serve("hermes", MISTRAL_OUT)
    r = other.post("/v1/chat/completions", json={"messages": history[:1] + [
        {**history[1], "tool_calls": [{**history[1]["tool_calls"][0], "id": "call_1"}]}],
        "tools": CHAT_TOOLS, "tool_choice": "none"})
    assert r.status_code == 400 and "length 9" in r.json()["error"]["message"]


# ---- pythonic: names Python cannot read ------------------------------------------------------------

UNREADABLE = (" is not a Python identifier, which --tool-call-parser pythonic needs to write a "
              "call (name(key=value, ...)) for tool_choice required; rename it, or name the "
              "function in tool_choice (its arguments are then JSON)")
DASHED = {"type": "function", "function": {"name": "get-weather", "parameters": WEATHER.parameters}}
KEYWORD_PARAM = {"type": "function", "function": {"name": "get_class", "parameters": {
    "type": "object", "properties": {"class": {"type": "string"}}}}}


def test_pythonic_required_with_unreadable_names_is_a_400_in_each_routes_shape() -> None:
    """``[get-weather(city="Rome")]`` is ``get - weather(...)`` to ``ast``: tool_choice required
    would force a call the parser leaves as content. Each route refuses it in its error shape,
    naming the tool; the same tools under hermes are served."""
    client, engine = serve("pythonic", PYTHONIC_OUT)
    ask = [{"role": "user", "content": "Weather in Rome?"}]
    tools = [CHAT_TOOLS[1], DASHED]
    r = client.post("/v1/chat/completions", json={"messages": ask, "tools": tools,
                                                  "tool_choice": "required"})
    assert (r.status_code, r.json()) == (400, {"error": {
        "message": "tools[1]: the function name 'get-weather'" + UNREADABLE,
        "type": "invalid_request_error", "param": "tools[1]", "code": None}})
    r = client.post("/v1/responses", json={"input": "Weather?", "tool_choice": "required", "tools": [
        {"type": "function", **KEYWORD_PARAM["function"]}]})
    assert (r.status_code, r.json()) == (400, {"error": {
        "message": "tools[0]: the parameter name 'class' of 'get_class'" + UNREADABLE,
        "type": "invalid_request_error", "param": "tools[0]", "code": None}})
    r = client.post("/v1/messages", json={
        "model": "fake-model", "max_tokens": 50, "messages": ask, "tool_choice": {"type": "any"},
        "tools": [{"name": "get-weather", "input_schema": WEATHER.parameters}]})
    assert (r.status_code, r.json()) == (400, {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "tools[0]: the function name 'get-weather'" + UNREADABLE}})
    assert not engine.requests
    # An allowed_tools subset without the unreadable one forces readable calls only.
    r = client.post("/v1/chat/completions", json={"messages": ask, "tools": tools, "tool_choice": {
        "type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
            {"type": "function", "function": {"name": "get_time"}}]}}})
    assert r.status_code == 200, r.text
    hermes, _ = serve("hermes", '<tool_call>{"name": "get-weather", "arguments": {}}</tool_call>')
    r = hermes.post("/v1/chat/completions", json={"messages": ask, "tools": tools,
                                                  "tool_choice": "required"})
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get-weather"


def test_pythonic_named_choice_of_an_unreadable_name_is_served() -> None:
    """A named choice writes the arguments as JSON, not in the pythonic format: no 400."""
    client, engine = serve("pythonic", '{"city": "Rome"}')
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Weather?"}], "tools": [DASHED],
        "tool_choice": {"type": "function", "function": {"name": "get-weather"}}})
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert (call["function"]["name"], call["function"]["arguments"]) == (
        "get-weather", '{"city": "Rome"}')
    assert engine.requests[-1].sampling_params.structured_outputs is not None


def test_pythonic_auto_with_unreadable_names_warns_and_answers(
        caplog: pytest.LogCaptureFixture) -> None:
    """Under auto the model may answer in text: served, with a warning naming the tool; its
    call, if the model writes one, is content."""
    from heron.structured.tools import _warn_unreadable

    _warn_unreadable.cache_clear()  # it warns once per name
    output = '[get-weather(city="Rome")]'
    client, _ = serve("pythonic", output)
    with caplog.at_level("WARNING", logger="heron.structured.tools"):
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Weather?"}], "tools": [KEYWORD_PARAM, DASHED]})
    message = r.json()["choices"][0]["message"]
    assert (message["content"], message["tool_calls"]) == (output, [])
    warned = [rec.getMessage() for rec in caplog.records]
    assert "tools: the parameter name 'class' of 'get_class' is not a Python identifier: a call " \
           "to it in the pythonic format (--tool-call-parser pythonic) cannot be read and comes " \
           "back as content" in warned
    assert any("the function name 'get-weather'" in w for w in warned)
