"""Large request bodies: their CPU work runs on the heavy lane, off the event loop.

The real app against the scripted engine (``tests.fake_engine``), driven in one event loop
through httpx's ASGI transport. A step of a large request (validation, the chat template,
tokenization, token-id checks) is made to block on a ``threading.Event``; while it blocks,
another request must be answered, which only happens if the step does not run on the loop.
Without the lane, the step blocks the loop until its gate gives up, and the test fails on
``gate.opened`` (the gate was never opened by the test) and the thread name. No timings.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from heron.server import pipeline, protocol
from heron.server.app import build_app
from heron.server.offload import LANE_SLOTS, LARGE_BODY_BYTES
from heron.server.protocol import MAX_MESSAGES, MAX_TOOLS
from heron.tokenizer.tokenizer import Tokenizer
from tests.fake_engine import MODEL, FakeEngine, char_tokenizer_for_serving, serving_context, tokens

GATE_TIMEOUT_S = 10.0  # how long a gate blocks when nobody opens it (only without the fix)
TEXT = "word " * (LARGE_BODY_BYTES // 5 + 100)  # one string past the large-body size
PAD = "x" * (LARGE_BODY_BYTES + 100)
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


class Gate:
    """Wraps ``fn``: the first ``blocking`` calls record their thread, say they are inside
    and wait until the test opens the gate; later calls pass straight through."""

    def __init__(self, fn: Callable[..., Any], blocking: int = 1) -> None:
        self.fn = fn
        self.blocking = blocking
        self.lock = threading.Lock()
        self.inside = 0
        self.most_inside = 0
        self.calls = 0
        self.threads: list[str] = []
        self.opened = threading.Event()
        self.was_opened: list[bool] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.calls += 1
            block = self.calls <= self.blocking
            if block:
                self.inside += 1
                self.most_inside = max(self.most_inside, self.inside)
                self.threads.append(threading.current_thread().name)
        if block:
            self.was_opened.append(self.opened.wait(GATE_TIMEOUT_S))
            with self.lock:
                self.inside -= 1
        return self.fn(*args, **kwargs)

    async def wait_inside(self, count: int) -> None:
        """Until ``count`` calls are blocked inside, or one gave up waiting (or, should the
        step never be reached, for about GATE_TIMEOUT_S)."""
        for _ in range(int(GATE_TIMEOUT_S * 100)):
            if self.inside >= count or self.was_opened:
                return
            await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return char_tokenizer_for_serving()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(lambda request: tokens("a"))


@pytest.fixture
def client(engine: FakeEngine, tokenizer: Tokenizer) -> Iterator[httpx.AsyncClient]:
    ctx = serving_context(engine, tokenizer)
    app = build_app(ctx.config, ctx)
    yield httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")
    app.state.lane.close()


async def answered_while_blocked(client: httpx.AsyncClient, gate: Gate, path: str,
                                 body: object) -> tuple[httpx.Response, httpx.Response]:
    """Post ``body`` to ``path``; once its gated step blocks, GET /v1/models, then open the
    gate. (The large request's answer, /v1/models' answer.)"""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert len(content) >= LARGE_BODY_BYTES
    large = asyncio.create_task(client.post(path, content=content,
                                            headers={"Content-Type": "application/json"}))
    await gate.wait_inside(1)
    other = await client.get("/v1/models")
    gate.opened.set()
    return await large, other


def assert_ran_on_the_lane(gate: Gate, other: httpx.Response) -> None:
    assert other.status_code == 200, other.text
    assert gate.was_opened == [True]  # /v1/models was answered while the step blocked
    assert gate.threads[0].startswith("heron-heavy"), gate.threads


def test_a_large_body_is_validated_off_the_event_loop(
        client: httpx.AsyncClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The body's validation (its Unicode walk, one of pydantic's steps) blocks; meanwhile
    another request is answered. The body is then answered as usual."""
    gate = Gate(protocol.lone_surrogate_path)
    monkeypatch.setattr(protocol, "lone_surrogate_path", gate)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "user": PAD}
    large, other = asyncio.run(answered_while_blocked(client, gate, "/v1/chat/completions", body))
    assert_ran_on_the_lane(gate, other)
    assert large.status_code == 200, large.text
    assert large.json()["choices"][0]["message"]["content"] == "a"
    assert len(engine.requests) == 1


CHAT = [{"role": "user", "content": TEXT}]
TEMPLATE_ROUTES = [
    ("/v1/chat/completions", {"messages": CHAT}),
    ("/v1/messages", {"model": MODEL, "messages": CHAT, "max_tokens": 1}),
    ("/v1/messages/count_tokens", {"model": MODEL, "messages": CHAT}),
    ("/v1/responses", {"input": TEXT}),
    ("/api/chat", {"model": MODEL, "messages": CHAT}),
    ("/tokenize", {"messages": CHAT}),
]


@pytest.mark.parametrize("path,body", TEMPLATE_ROUTES, ids=[p for p, _ in TEMPLATE_ROUTES])
def test_the_chat_template_of_a_large_body_runs_off_the_event_loop(
        client: httpx.AsyncClient, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch,
        path: str, body: dict[str, Any]) -> None:
    gate = Gate(tokenizer.apply_chat_template)
    monkeypatch.setattr(tokenizer, "apply_chat_template", gate)
    large, other = asyncio.run(answered_while_blocked(client, gate, path, body))
    assert_ran_on_the_lane(gate, other)
    assert large.status_code in (200, 400), large.text  # 400: past the fake's context


MANY_PROMPTS = ["Hi " * 100] * (LARGE_BODY_BYTES // 300 + 10)  # each too short for a thread
ENCODE_ROUTES = [
    ("/v1/completions", {"prompt": MANY_PROMPTS, "max_tokens": 1}),
    ("/v1/embeddings", {"input": MANY_PROMPTS}),
    ("/api/embed", {"model": MODEL, "input": MANY_PROMPTS}),
    ("/v1/score", {"text_1": "q", "text_2": MANY_PROMPTS}),
    ("/v1/rerank", {"query": "q", "documents": MANY_PROMPTS}),
]


@pytest.mark.parametrize("path,body", ENCODE_ROUTES, ids=[p for p, _ in ENCODE_ROUTES])
def test_tokenizing_a_large_body_runs_off_the_event_loop(
        client: httpx.AsyncClient, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch,
        path: str, body: dict[str, Any]) -> None:
    """Many short prompts (each below the length that went to a thread on its own)."""
    gate = Gate(tokenizer.encode)
    monkeypatch.setattr(tokenizer, "encode", gate)
    large, other = asyncio.run(answered_while_blocked(client, gate, path, body))
    assert_ran_on_the_lane(gate, other)
    assert large.status_code in (200, 400), large.text


@pytest.mark.parametrize("path,body", ENCODE_ROUTES[-2:], ids=["score", "rerank"])
def test_a_cross_encoders_pairs_of_a_large_body_are_tokenized_off_the_event_loop(
        client: httpx.AsyncClient, engine: FakeEngine, tokenizer: Tokenizer,
        monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, Any]) -> None:
    monkeypatch.setattr(engine.info, "num_labels", 1)  # a cross-encoder: pairs, not texts
    gate = Gate(tokenizer.encode_pair)
    monkeypatch.setattr(tokenizer, "encode_pair", gate)
    large, other = asyncio.run(answered_while_blocked(client, gate, path, body))
    assert_ran_on_the_lane(gate, other)
    assert large.status_code in (200, 400), large.text


def test_token_id_prompts_of_a_large_body_are_checked_off_the_event_loop(
        client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(pipeline.check_token_ids)
    monkeypatch.setattr(pipeline, "check_token_ids", gate)
    body = {"prompt": [[5] * 100] * (LARGE_BODY_BYTES // 300 + 10), "max_tokens": 1}
    large, other = asyncio.run(answered_while_blocked(client, gate, "/v1/completions", body))
    assert_ran_on_the_lane(gate, other)
    assert large.status_code == 200, large.text


def test_at_most_lane_slots_large_bodies_are_worked_on_at_once(
        client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five large bodies at once: LANE_SLOTS of them are validated, the others wait (unparsed)
    for a slot; all are answered once the gate opens."""
    gate = Gate(protocol.lone_surrogate_path, blocking=5)
    monkeypatch.setattr(protocol, "lone_surrogate_path", gate)
    lane = client._transport.app.state.lane  # type: ignore[attr-defined]
    body = json.dumps({"prompt": "Hi", "max_tokens": 1, "user": PAD}).encode()

    async def scenario() -> tuple[list[httpx.Response], int, int]:
        posts = [asyncio.create_task(client.post("/v1/completions", content=body, headers={
            "Content-Type": "application/json"})) for _ in range(5)]
        await gate.wait_inside(LANE_SLOTS)
        for _ in range(int(GATE_TIMEOUT_S * 100)):
            if lane.queued >= 5 - LANE_SLOTS or gate.was_opened:
                break
            await asyncio.sleep(0.01)
        inside, queued = gate.inside, lane.queued
        gate.opened.set()
        return await asyncio.gather(*posts), inside, queued

    answers, inside, queued = asyncio.run(scenario())
    assert (inside, queued) == (LANE_SLOTS, 5 - LANE_SLOTS)
    assert gate.most_inside == LANE_SLOTS
    assert [r.status_code for r in answers] == [200] * 5


def test_echo_does_not_decode_a_prompt_as_long_as_the_context(
        client: httpx.AsyncClient, engine: FakeEngine, tokenizer: Tokenizer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt is refused for its length; decoding it first only held the GIL (the
    tokenizer keeps it while it decodes: ~0.5 s for 700,000 ids)."""
    decoded: list[int] = []
    monkeypatch.setattr(tokenizer, "decode", lambda ids, *a, **k: decoded.append(len(ids)) or "")
    limit = engine.info.max_model_len

    async def post(ids: list[int]) -> httpx.Response:
        return await client.post("/v1/completions", json={"prompt": ids, "echo": True,
                                                          "max_tokens": 1})

    r = asyncio.run(post([5] * limit))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert decoded == []
    asyncio.run(post([5] * (limit - 1)))
    assert decoded[0] == limit - 1


# ---- the same answers on the lane as off it ---------------------------------------------------


def _padded(raw: bytes) -> bytes:
    """``raw`` (a JSON object's text, maybe broken past its first key) with a long field
    first: the same defect in a body the lane parses."""
    assert raw.startswith(b"{")
    return b'{"pad": "' + PAD.encode() + b'", ' + raw[1:]


BAD_BODIES = [
    ("/v1/chat/completions", b'{"messages": [}'),
    ("/v1/messages", b'{"model": "m", "messages": [}'),
    ("/api/chat", b'{"model": "m", "messages": [}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}'),
    ("/v1/messages", b'{"model": "m", "max_tokens": 1, "messages": [{"role": "x"}]}'),
    ("/v1/completions", b'{"prompt": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("/api/chat", b'{"model": "m", "messages": [], "options": {"seed": ' + b"1" * 5000 + b"}}"),
    ("/v1/completions", b'{"prompt": "ab\\ud800"}'),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": "4"}'),
]


@pytest.mark.parametrize("path,raw", BAD_BODIES, ids=[f"{p}-{i}" for i, (p, _) in
                                                      enumerate(BAD_BODIES)])
def test_a_bad_large_body_is_answered_as_a_small_one(
        client: httpx.AsyncClient, engine: FakeEngine, path: str, raw: bytes) -> None:
    """Bad JSON, a bad field, nesting too deep, an integer too long, a lone surrogate: the
    status and body a large body gets from the lane are those FastAPI's path gives."""
    async def both() -> list[httpx.Response]:
        return [await client.post(path, content=body, headers={
            "Content-Type": "application/json"}) for body in (raw, _padded(raw))]

    small, large = asyncio.run(both())
    assert small.status_code == 400, small.text
    assert (large.status_code, large.content) == (small.status_code, small.content)
    assert engine.requests == []


def test_a_large_body_that_is_not_utf8_names_the_byte(client: httpx.AsyncClient) -> None:
    raw = _padded(b'{"prompt": "ab\xff"}')
    r = asyncio.run(client.post("/v1/completions", content=raw,
                                headers={"Content-Type": "application/json"}))
    offset = raw.index(b"\xff")
    assert (r.status_code, r.json()) == (400, {"error": {
        "message": f"the request body is not valid UTF-8: byte 0xff at offset {offset} "
                   "(invalid start byte)", "type": "invalid_request_error", "param": None,
        "code": "invalid_json"}})


# ---- caps -------------------------------------------------------------------------------------


def _too_long(param: str, limit: int) -> str:
    return (f"Invalid '{param}': array too long. Expected an array with maximum length {limit}, "
            f"but got an array with length {limit + 1} instead.")


MESSAGE = {"role": "user", "content": "Hi"}
CAPS = [
    ("/v1/chat/completions", {"messages": [MESSAGE] * (MAX_MESSAGES + 1)}, "messages",
     MAX_MESSAGES),
    ("/v1/chat/completions", {"messages": [MESSAGE], "tools": [TOOL] * (MAX_TOOLS + 1)},
     "tools", MAX_TOOLS),
    ("/v1/responses", {"input": [MESSAGE] * (MAX_MESSAGES + 1)}, "input", MAX_MESSAGES),
    ("/v1/responses", {"input": "Hi", "tools": [{"type": "function", "name": "f"}] *
                       (MAX_TOOLS + 1)}, "tools", MAX_TOOLS),
    ("/tokenize", {"messages": [MESSAGE] * (MAX_MESSAGES + 1)}, "messages", MAX_MESSAGES),
]


@pytest.mark.parametrize("path,body,param,limit", CAPS,
                         ids=[f"{p}-{param}" for p, _, param, _ in CAPS])
def test_lists_past_their_cap_are_refused_before_the_body_is_walked(
        client: httpx.AsyncClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch,
        path: str, body: dict[str, Any], param: str, limit: int) -> None:
    """OpenAI's answer to a list past its limit, before the Unicode walk and validation."""
    walked: list[object] = []
    monkeypatch.setattr(protocol, "lone_surrogate_path", lambda data: walked.append(data))
    r = asyncio.run(client.post(path, json=body))
    assert (r.status_code, r.json()) == (400, {"error": {
        "message": _too_long(param, limit), "type": "invalid_request_error", "param": param,
        "code": "array_above_max_length"}})
    assert walked == [] and engine.requests == []


def test_caps_in_anthropic_and_ollama_shapes(client: httpx.AsyncClient) -> None:
    async def post(path: str, body: dict[str, Any]) -> httpx.Response:
        return await client.post(path, json=body)

    many = [MESSAGE] * (MAX_MESSAGES + 1)
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = asyncio.run(post(path, {"model": MODEL, "messages": many, "max_tokens": 1}))
        assert (r.status_code, r.json()) == (400, {"type": "error", "error": {
            "type": "invalid_request_error", "message": _too_long("messages", MAX_MESSAGES)}})
    r = asyncio.run(post("/v1/messages", {"model": MODEL, "messages": [MESSAGE], "max_tokens": 1,
                                          "tools": [{"name": "f", "input_schema": {}}] *
                                          (MAX_TOOLS + 1)}))
    assert (r.status_code, r.json()["error"]["message"]) == (400, _too_long("tools", MAX_TOOLS))
    r = asyncio.run(post("/api/chat", {"model": MODEL, "messages": many}))
    assert (r.status_code, r.json()) == (400, {"error": _too_long("messages", MAX_MESSAGES)})
    r = asyncio.run(post("/api/chat", {"model": MODEL, "messages": [MESSAGE],
                                       "tools": [TOOL] * (MAX_TOOLS + 1)}))
    assert (r.status_code, r.json()) == (400, {"error": _too_long("tools", MAX_TOOLS)})


def test_lists_at_their_cap_are_served(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    """At the cap the request goes on (here to the context check: the fake's context is 256)."""
    async def post(path: str, body: dict[str, Any]) -> httpx.Response:
        return await client.post(path, json=body)

    r = asyncio.run(post("/v1/chat/completions", {"messages": [MESSAGE] * MAX_MESSAGES}))
    assert (r.status_code, r.json()["error"]["code"]) == (400, "context_length_exceeded")
    r = asyncio.run(post("/v1/chat/completions", {"messages": [MESSAGE], "max_tokens": 1,
                                                  "tools": [TOOL] * MAX_TOOLS}))
    assert r.status_code in (200, 400) and "array too long" not in r.text, r.text
