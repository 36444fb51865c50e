"""A thinking budget: vLLM's ``thinking_token_budget`` on chat, Anthropic's ``thinking.
budget_tokens``. The grammar walked with llguidance (a byte vocabulary plus ``<think>`` /
``</think>`` tokens): the budget forces ``</think>``, the answer after it stays free. Through
the app with a scripted engine (``tests.fake_engine``): the constraint the engine gets, the
rules where the budget cannot hold, Anthropic's checks."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from heron.server.app import build_app
from heron.structured.grammar import _byte_tokenizer, grammar_text
from heron.structured.params import StructuredOutputsParams as S
from heron.tokenizer.tokenizer import Tokenizer
from tests.fake_engine import EOS, MODEL, FakeEngine, serving_context, tokens
from tests.test_structured_unit import AB_SCHEMA, THINK, UNTHINK, _think_tokenizer
from tests.tiny_models import char_tokenizer


def walk(spec: S, pieces: list[str | int], tag_tokens: bool = True) -> tuple[bool, bool, list[int]]:
    """(every token fits, the output may end there, the tokens forced next)."""
    from llguidance import LLMatcher

    matcher = LLMatcher(_think_tokenizer() if tag_tokens else _byte_tokenizer(),
                        grammar_text(spec, think_tokens=tag_tokens))
    assert not matcher.is_error(), matcher.get_error()
    ids = [t for p in pieces for t in ([p] if isinstance(p, int) else list(p.encode()))]
    fits = all(matcher.consume_token(t) for t in ids)
    return fits, fits and matcher.is_accepting(), matcher.compute_ff_tokens() if fits else []


def test_the_budget_forces_the_closing_tag_then_any_text() -> None:
    spec = S.free_text("may_open", 3)
    assert walk(spec, [THINK, "abc"]) == (True, False, [UNTHINK])
    assert walk(spec, [THINK, "abcd"])[0] is False
    assert walk(spec, [THINK, "a", UNTHINK, "{any <b>answer</b>\n\n"])[:2] == (True, True)
    assert walk(spec, ["no reasoning at all"])[:2] == (True, True)
    opened = S.free_text("opened", 3)
    assert walk(opened, ["ab", UNTHINK, "x"])[:2] == (True, True)
    assert walk(opened, ["abc"]) == (True, False, [UNTHINK])
    assert walk(opened, ["x"])[:2] == (True, False)  # still inside the reasoning
    assert walk(S.free_text("may_open", 0), [THINK]) == (True, False, [UNTHINK])


def test_the_budget_bounds_the_reasoning_before_a_constraint() -> None:
    spec = S(AB_SCHEMA.kind, AB_SCHEMA.spec, think="may_open", think_budget=4)
    assert walk(spec, [THINK, "plan"]) == (True, False, [UNTHINK])
    assert walk(spec, [THINK, "plans"])[0] is False
    assert walk(spec, [THINK, "plan", UNTHINK, '\n\n{"a": 1}'])[:2] == (True, True)
    assert walk(spec, [THINK, "p", UNTHINK, "text"])[0] is False
    unbounded = S(AB_SCHEMA.kind, AB_SCHEMA.spec, think="may_open")
    assert walk(unbounded, [THINK, "plans and more"])[0] is True


def test_text_tags_leave_the_reasoning_unbounded() -> None:
    """Where the tags are text the engine compiles the reasoning without the budget."""
    spec = S(AB_SCHEMA.kind, AB_SCHEMA.spec, think="may_open", think_budget=2)
    assert grammar_text(spec) == grammar_text(S(AB_SCHEMA.kind, AB_SCHEMA.spec, think="may_open"))
    assert walk(spec, ["<think>a long plan</think>", '{"a": 1}'], tag_tokens=False)[:2] == (
        True, True)


def test_budget_fields_are_checked() -> None:
    with pytest.raises(ValueError, match="think_budget must be a non-negative"):
        S.free_text("may_open", -1)
    with pytest.raises(ValueError, match="think_budget must be a non-negative"):
        S("json", "{}", think_budget=3)  # no reasoning to bound


# ---- through the app ------------------------------------------------------------------------------

USER = [{"role": "user", "content": "Hi"}]
_TURNS = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
QWEN_TEMPLATE = _TURNS + ("{% if add_generation_prompt %}<assistant>{% if enable_thinking is "
                          "defined and not enable_thinking %}<think></think>{% endif %}{% endif %}")
PLAIN_TEMPLATE = _TURNS + "{% if add_generation_prompt %}<assistant>{% endif %}"


def serve(template: str = QWEN_TEMPLATE, tag_tokens: bool = True) -> tuple[TestClient, FakeEngine]:
    engine = FakeEngine(lambda request: tokens("Hi", [EOS], finish="stop", stop_reason=EOS),
                        max_model_len=4096)
    ctx = serving_context(engine, Tokenizer(char_tokenizer(think_tags=tag_tokens),
                                            chat_template=template, name=MODEL))
    return TestClient(build_app(ctx.config, ctx), base_url="http://127.0.0.1"), engine


def chat(client: TestClient, **fields: Any) -> Any:
    return client.post("/v1/chat/completions", json={"messages": USER, **fields})


def messages(client: TestClient, **fields: Any) -> Any:
    return client.post("/v1/messages", json={"model": MODEL, "messages": USER,
                                             "max_tokens": 2048, **fields})


def constraint(engine: FakeEngine) -> S | None:
    return engine.requests[-1].sampling_params.structured_outputs


def test_chat_thinking_token_budget_reaches_the_engine() -> None:
    client, engine = serve()
    assert chat(client, thinking_token_budget=5).status_code == 200
    assert constraint(engine) == S("text", "", think="may_open", think_budget=5)
    assert chat(client, thinking_token_budget=5,
                response_format={"type": "json_object"}).status_code == 200
    assert constraint(engine) == S("json", '{"type": "object"}', think="may_open", think_budget=5)
    assert chat(client, thinking_token_budget=-1).status_code == 200  # vLLM's "unlimited"
    assert constraint(engine) is None
    # Thinking off: nothing to bound.
    assert chat(client, thinking_token_budget=5,
                chat_template_kwargs={"enable_thinking": False}).status_code == 200
    assert constraint(engine) is None


@pytest.mark.parametrize("template,tag_tokens,value,message", [
    (QWEN_TEMPLATE, True, -2, "thinking_token_budget: must be a non-negative integer or -1 for "
                              "unlimited, got -2"),
    (PLAIN_TEMPLATE, True, 5, "thinking_token_budget: this model does not think (no reasoning "
                              "parser runs)"),
    (QWEN_TEMPLATE, False, 5, "thinking_token_budget: this model's vocabulary has no <think> / "
                              "</think> tokens, and a budget is enforced on those tokens only"),
])
def test_chat_thinking_token_budget_that_cannot_hold_is_a_400(template: str, tag_tokens: bool,
                                                              value: int, message: str) -> None:
    client, engine = serve(template, tag_tokens)
    r = chat(client, thinking_token_budget=value)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == message
    assert r.json()["error"]["param"] == "thinking_token_budget"
    assert engine.requests == []


def test_anthropic_budget_tokens_reaches_the_engine() -> None:
    client, engine = serve()
    r = messages(client, thinking={"type": "enabled", "budget_tokens": 1024})
    assert r.status_code == 200, r.text
    assert constraint(engine) == S("text", "", think="may_open", think_budget=1024)
    r = messages(client, thinking={"type": "enabled", "budget_tokens": 1500},
                 output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}})
    assert constraint(engine) == S("json", '{"type": "object"}', think="may_open",
                                   think_budget=1500)
    # Text tags: Anthropic's budget (which enabled requires) is ignored, not refused.
    client, engine = serve(tag_tokens=False)
    assert messages(client, thinking={"type": "enabled", "budget_tokens": 1024}).status_code == 200
    assert constraint(engine) is None


@pytest.mark.parametrize("fields,message", [
    ({"thinking": {"type": "enabled"}}, "thinking.enabled.budget_tokens: Field required"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1023}},
     "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}},
     "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our "
     "documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
     "#max-tokens-and-context-window-size"),
])
def test_anthropic_budget_checks(fields: dict[str, Any], message: str) -> None:
    client, engine = serve()
    r = messages(client, **fields)
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": message}}
    assert engine.requests == []


def test_the_engine_compiles_a_budget_for_either_spelling_of_the_tags() -> None:
    """With tag tokens the budget holds in the engine's matcher; a vocabulary without them (the
    byte one) compiles the reasoning unbounded, the answer free."""
    from heron.engine.structured import StructuredOutputManager
    from tests.test_structured_unit import THINK_EOS

    spec = S.free_text("may_open", 2)
    for tokenizer, output, bounded in (
            (_think_tokenizer(), [THINK, *b"ab", UNTHINK, *b"any"], True),
            (_byte_tokenizer(), list(b"<think>a long plan</think>any"), False)):
        manager = StructuredOutputManager(lambda: None, THINK_EOS + 1, [THINK_EOS])
        manager._ll_tokenizer = tokenizer  # type: ignore[assignment]
        matcher = manager._compile(spec)
        assert all(matcher.consume_token(t) for t in output) and matcher.is_accepting()
        if bounded:
            over = manager._compile(spec)
            assert not all(over.consume_token(t) for t in [THINK, *b"abc"])
