"""Reasoning end to end: `heron serve` (the tiny Llama, its character tokenizer with ``<think>``
and ``</think>`` tokens as Qwen3's, a chat template that opens ``<think>`` as DeepSeek-R1's
does) through the real ``openai`` and ``anthropic`` SDKs. A grammar forces an exact thinking
output on chat (thinking off, so that it governs the whole output); the other routes run
greedy, and each must split the same output the same way. A structured output with thinking on
reasons first: greedy until max_tokens, or closed at once by a logit_bias on ``</think>``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from tests.server_utils import RemoteServer
from tests.tiny_models import THINK_TAGS, char_tokenizer, save_tiny_server_model

USER = [{"role": "user", "content": "Hi"}]
# The prompt opens the thinking; enable_thinking false closes an empty one (Qwen3's switch).
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}<assistant>{% if enable_thinking is "
            "defined and not enable_thinking %}<think></think>{% else %}<think>\n{% endif %}"
            "{% endif %}")
# The grammar is the whole output only with thinking off (the prompt closes an empty reasoning).
# The tags are the vocabulary's tokens: a regex forcing the text "<think>" cannot be enforced
# (llguidance tokenizes the forced text to the <think> token, which is no text to it).
FORCING = {"structured_outputs": {"grammar": 'start: <think> "Plan it." </think> "Hi"'},
           "chat_template_kwargs": {"enable_thinking": False}}
FORCED_TOKENS = 1 + len("Plan it.") + 1 + len("Hi")
CLOSE_ID = char_tokenizer(think_tags=True).convert_tokens_to_ids(THINK_TAGS[1])
A_IS_1 = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
    "type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]}}}
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    root: Path = tmp_path_factory.mktemp("tiny-thinking")
    model = save_tiny_server_model(root / "model", think_tags=True)
    (root / "template.jinja").write_text(TEMPLATE)
    args = [str(model), "--kv-cache-memory", "16MiB", "--chat-template",
            str(root / "template.jinja")]
    with RemoteServer(args) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def greedy_thought(client: openai.OpenAI) -> str:
    """What the model thinks, greedy, in MAX_TOKENS tokens (the prompt opened the thinking and
    nothing closes it)."""
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=USER,
                                       max_tokens=MAX_TOKENS, temperature=0)
    message = r.choices[0].message
    assert message.content is None and r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == MAX_TOKENS
    thought = (message.model_extra or {})["reasoning_content"]
    assert thought and thought == (message.model_extra or {})["reasoning"]
    return str(thought)


def model_of(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_chat_reasoning_content_through_the_sdk(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=model_of(client), messages=USER, max_tokens=40, temperature=0,
        extra_body=FORCING)
    message = r.choices[0].message
    assert message.content == "Hi"
    assert (message.model_extra or {})["reasoning_content"] == "Plan it."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == FORCED_TOKENS - len("Hi")
    assert r.usage.completion_tokens == FORCED_TOKENS


def test_chat_stream_reasoning_through_the_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=model_of(client), messages=USER, max_tokens=40, temperature=0, stream=True,
        extra_body=FORCING)
    reasoning, content = [], []
    for chunk in stream:
        for choice in chunk.choices:
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            content.append(choice.delta.content or "")
    assert "".join(reasoning) == "Plan it." and "".join(content) == "Hi"
    # Every reasoning piece comes before the first content piece.
    last_reasoning = max(i for i, piece in enumerate(reasoning) if piece)
    assert all(not piece for piece in content[:last_reasoning + 1])


def test_json_after_the_reasoning_through_the_sdk(client: openai.OpenAI) -> None:
    """Thinking on, a JSON schema: the grammar lets the model close the reasoning (here at once,
    </think> biased), then holds it to the schema; the content is the JSON alone."""
    r = client.chat.completions.create(
        model=model_of(client), messages=USER, max_tokens=40, temperature=0,
        response_format=A_IS_1, logit_bias={str(CLOSE_ID): 100})  # type: ignore[arg-type]
    message, choice = r.choices[0].message, r.choices[0]
    assert message.content is not None and json.loads(message.content) == {"a": 1}
    assert (message.model_extra or {}).get("reasoning_content") is None  # an empty reasoning
    assert choice.finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == 1  # </think>


def test_a_structured_output_may_think_first(client: openai.OpenAI, greedy_thought: str) -> None:
    """The schema waits for </think>: the greedy model thinks exactly as without it, until
    max_tokens (the JSON would have been the whole output before the grammar waited)."""
    r = client.chat.completions.create(
        model=model_of(client), messages=USER, max_tokens=MAX_TOKENS, temperature=0,
        response_format=A_IS_1)  # type: ignore[arg-type]
    message = r.choices[0].message
    assert message.content is None and r.choices[0].finish_reason == "length"
    assert (message.model_extra or {})["reasoning_content"] == greedy_thought


@pytest.mark.parametrize("budget", [0, 5])
def test_thinking_token_budget_closes_the_reasoning(client: openai.OpenAI, greedy_thought: str,
                                                    budget: int) -> None:
    """thinking_token_budget N: the greedy model thinks as without it for N tokens, then
    </think> is forced and the answer follows, unconstrained (it never closes by itself). The
    prompt opened the reasoning: a repeated <think> (which the parser drops) is allowed first."""
    r = client.chat.completions.create(
        model=model_of(client), messages=USER, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"thinking_token_budget": budget})
    message, choice = r.choices[0].message, r.choices[0]
    reasoning = (message.model_extra or {}).get("reasoning_content") or ""
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    # The N tokens and </think>, and a <think> written again (the model does at budget 0).
    assert r.usage.completion_tokens_details.reasoning_tokens in (budget + 1, budget + 2)
    # One token a character or a filler "[i]" (filler text does not encode back to it).
    assert len(re.findall(r"\[\d+\]|.", reasoning, re.S)) <= budget
    assert greedy_thought.startswith(reasoning)
    assert message.content and choice.finish_reason == "length"
    assert r.usage.completion_tokens == MAX_TOKENS


def test_responses_reasoning_item_through_the_sdk(client: openai.OpenAI,
                                                  greedy_thought: str) -> None:
    r = client.responses.create(model=model_of(client), input="Hi", temperature=0,
                                max_output_tokens=MAX_TOKENS)
    assert r.status == "incomplete"
    (item,) = r.output
    assert item.type == "reasoning" and item.summary == []
    assert item.content is not None and item.content[0].text == greedy_thought
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens == MAX_TOKENS
    events = list(client.responses.create(model=model_of(client), input="Hi", temperature=0,
                                          max_output_tokens=MAX_TOKENS, stream=True))
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert "".join(deltas) == greedy_thought
    (done,) = [e for e in events if e.type == "response.reasoning_text.done"]
    assert done.text == greedy_thought


def test_messages_thinking_through_the_sdk(server: RemoteServer, client: openai.OpenAI,
                                           greedy_thought: str) -> None:
    claude = anthropic.Anthropic(base_url=server.base_url, api_key="EMPTY", max_retries=0)
    # adaptive: the template's default, thinking on. (enabled needs budget_tokens >= 1024 and
    # max_tokens above it: past this model's context of 1024.)
    thinking: anthropic.types.ThinkingConfigParam = {"type": "adaptive"}
    greedy = {"temperature": 0}  # this SDK takes no temperature argument any more
    message = claude.messages.create(model=model_of(client), max_tokens=MAX_TOKENS,
                                     messages=USER,  # type: ignore[arg-type]
                                     thinking=thinking, extra_body=greedy)
    (block,) = message.content
    assert block.type == "thinking" and block.thinking == greedy_thought
    assert message.stop_reason == "max_tokens"
    with claude.messages.stream(model=model_of(client), max_tokens=MAX_TOKENS,
                                messages=USER,  # type: ignore[arg-type]
                                thinking=thinking, extra_body=greedy) as stream:
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "thinking", None)) for b in final.content] == [
        ("thinking", greedy_thought)]
