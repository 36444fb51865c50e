"""`heron serve --tool-call-parser mistral | pythonic` end to end through the openai SDK: the tiny
Llama with a chat template in each format. Mistral's vocabulary has ``[TOOL_CALLS]`` and
``[ARGS]`` as special tokens (a v11+ one: calls are ``[TOOL_CALLS]name[ARGS]{...}``), so its
grammar must name the tokens and the text must keep them for the parser. tool_choice required
and named force a call on the random model; the calls come back whole and streamed alike, with
Mistral's 9-character ids, and a conversation holding them (or other servers' ids) renders
through a template that refuses any other id."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from heron.structured.tool_parsers import mistral_template_id
from tests.server_utils import RemoteServer
from tests.tiny_models import char_tokenizer, save_tiny_model

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{% elif m.tool_calls %}{% for c in m.tool_calls %}"
    "{% if c.id is not defined or c.id|length != 9 %}{{ raise_exception('Tool call IDs should be "
    "alphanumeric strings with length 9!') }}{% endif %}"
    "[TOOL_CALLS]{{ c.function.name }}[CALL_ID]{{ c.id }}[ARGS]{{ c.function.arguments|tojson }}"
    "{% endfor %}</s>"
    "{% elif m.role == 'tool' %}{% if m.tool_call_id|length != 9 %}{{ raise_exception('Tool call "
    "IDs should be alphanumeric strings with length 9!') }}{% endif %}"
    "[TOOL_RESULTS]{{ m.tool_call_id }}:{{ m.content }}[/TOOL_RESULTS]"
    "{% else %}{{ m.content }}</s>{% endif %}{% endfor %}")
PYTHONIC_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.tool_calls %}<assistant>[{% for c in m.tool_calls %}{{ c.function.name }}("
    "{% for k, v in c.function.arguments.items() %}{{ k }}={{ v|tojson }}"
    "{% if not loop.last %}, {% endif %}{% endfor %}){% if not loop.last %}, {% endif %}"
    "{% endfor %}]\n{% else %}<{{ m.role }}>{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")
WEATHER = {"type": "object", "required": ["city"],
           "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                          "unit": {"type": "string", "enum": ["c", "f"]}}}
TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
              {"type": "function", "function": {"name": "get_time", "parameters": {
                  "type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "Weather in Rome?"}]
MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")


@pytest.fixture(scope="module", params=["mistral", "pythonic"])
def server(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, RemoteServer]]:
    parser = str(request.param)
    root: Path = tmp_path_factory.mktemp(f"tiny-{parser}")
    model = save_tiny_model(root / "model")
    specials = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]") if parser == "mistral" else ()
    char_tokenizer(special_tags=specials).save_pretrained(model)
    template = MISTRAL_TEMPLATE if parser == "mistral" else PYTHONIC_TEMPLATE
    (root / "template.jinja").write_text(template)
    args = [str(model), "--kv-cache-memory", "16MiB", "--chat-template",
            str(root / "template.jinja"), "--tool-call-parser", parser]
    with RemoteServer(args) as srv:
        yield parser, srv


def chat(client: openai.OpenAI, messages: list[Any], **kwargs: Any) -> Any:
    return client.chat.completions.create(model=client.models.list().data[0].id,
                                          messages=messages, temperature=0, tools=TOOLS, **kwargs)


def streamed(client: openai.OpenAI, **kwargs: Any) -> list[tuple[str, str, str]]:
    calls: dict[int, list[str]] = {}
    for chunk in chat(client, ASK, stream=True, **kwargs):
        for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function and d.function.name
                calls[d.index] = [d.id, d.function.name, d.function.arguments or ""]
            else:
                assert d.id is None and d.function and d.function.name is None
                calls[d.index][2] += d.function.arguments or ""
    return [(i, n, a) for i, n, a in calls.values()]


def test_forced_calls_whole_streamed_and_sent_back(server: tuple[str, RemoteServer]) -> None:
    parser, srv = server
    client = srv.client()
    id_pattern = MISTRAL_ID if parser == "mistral" else re.compile(r"call_[0-9a-f]{24}")
    # One call (a random model may go on calling): whitespace costs a token a character here.
    forced: Any = {"tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 150}
    answer = chat(client, ASK, **forced)
    message, finish = answer.choices[0].message, answer.choices[0].finish_reason
    assert finish == "tool_calls" and message.content is None and len(message.tool_calls) == 1
    for call in message.tool_calls:
        assert id_pattern.fullmatch(call.id)
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert args["city"] in ("Paris", "Rome") and set(args) <= {"city", "unit"}
        else:
            assert (call.function.name, args) == ("get_time", {})
    whole = [(c.function.name, c.function.arguments) for c in message.tool_calls]
    parts = streamed(client, **forced)
    assert [(n, a) for _, n, a in parts] == whole
    assert all(id_pattern.fullmatch(i) for i, _, _ in parts)
    named = chat(client, ASK, max_tokens=150,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and id_pattern.fullmatch(call.id)
    # The calls go back with a result: the template renders them (Mistral's refuses other ids,
    # so heron maps an OpenAI-style id from elsewhere to 9 letters and digits on the way in).
    for call_id in (message.tool_calls[0].id, "call_abc_123"):
        history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {
                "name": whole[0][0], "arguments": whole[0][1]}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "sunny"}]
        after = chat(client, history, tool_choice="none", max_tokens=3)
        assert after.choices[0].finish_reason == "length"
        assert after.usage.prompt_tokens == prompt_tokens(parser, history)


def prompt_tokens(parser: str, history: list[Any]) -> int:
    """Tokens of ``history`` rendered here as heron must render it: arguments as a mapping,
    under mistral each id as ``mistral_template_id`` maps it."""
    specials = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]") if parser == "mistral" else ()
    tokenizer = char_tokenizer(special_tags=specials)
    ids = mistral_template_id if parser == "mistral" else (lambda i: i)
    call = history[1]["tool_calls"][0]
    messages = [history[0], {"role": "assistant", "content": "", "tool_calls": [
        {**call, "id": ids(call["id"]), "function": {
            "name": call["function"]["name"],
            "arguments": json.loads(call["function"]["arguments"])}}]},
        {**history[2], "tool_call_id": ids(history[2]["tool_call_id"])}]
    template = MISTRAL_TEMPLATE if parser == "mistral" else PYTHONIC_TEMPLATE
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, chat_template=template,
                                         tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(str(text), add_special_tokens=False))
