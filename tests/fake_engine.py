"""A scripted engine for the serving tier: the real app, protocol, pipeline and output processor,
with no model loaded.

``FakeEngine`` has the surface of ``heron.engine.client.EngineClient`` that the server uses
(``stream``, ``is_alive``, ``dead_reason``, ``stats``, ``info``). For each submitted sequence a
script returns what the core would send: ``EngineOutput``s, or an exception to raise at that
point (``EngineError``: the core died; ``RequestRejectedError``: it refused the request). A
stream hands the sequences' outputs out in turn, one each per round, like engine steps.

    engine = FakeEngine(lambda req: tokens("Hello", finish="length"))
    ctx = serving_context(engine, tokenizer)
    client = TestClient(build_app(ctx.config, ctx), base_url="http://127.0.0.1")
"""

from __future__ import annotations

import string
from collections import deque
from collections.abc import AsyncIterator, Callable
from types import TracebackType

import msgspec

from heron.engine.messages import EngineInfo, EngineOutput, EngineRequest, EngineStats
from heron.server.config import ServerConfig
from heron.server.metrics import ServerMetrics
from heron.server.serving import ServingContext
from heron.tokenizer.tokenizer import Tokenizer
from tests.tiny_models import VOCAB, char_tokenizer

MODEL = "fake-model"
EOS = 2  # "</s>" in the character tokenizer
Script = Callable[[EngineRequest], list[EngineOutput | Exception]]


def char_id(c: str) -> int:
    """The character tokenizer's id of one printable character."""
    return 4 + string.printable.index(c)


def tokens(*pieces: str | list[int], finish: str | None = "length",
           stop_reason: int | str | None = None, cached: int = 0) -> list[EngineOutput]:
    """One output per piece (a string: its characters' ids; or ids); the last one finishes."""
    outs = [EngineOutput(request_id="", new_token_ids=[char_id(c) for c in p] if isinstance(
        p, str) else list(p), num_cached_tokens=cached) for p in pieces]
    outs[-1] = msgspec.structs.replace(outs[-1], finish_reason=finish, stop_reason=stop_reason)
    return outs


class FakeEngine:
    """Answers every sequence from ``script``; records what it was sent and what was aborted."""

    def __init__(self, script: Script, max_model_len: int = 256) -> None:
        self.script = script
        self.info = EngineInfo(max_model_len=max_model_len, vocab_size=VOCAB, num_kv_blocks=16,
                               block_size=16, device="cpu", dtype="float32", eos_token_ids=[EOS])
        self.stats = EngineStats()
        self.requests: list[EngineRequest] = []
        self.aborted: list[str] = []
        self.dead_reason: str | None = None

        self.streams: list[FakeStream] = []

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None

    @property
    def num_in_flight(self) -> int:
        """Sequences still streaming (not finished, not aborted)."""
        return sum(len(stream.pending) for stream in self.streams)

    def stream(self, requests: list[EngineRequest]) -> FakeStream:
        self.requests += requests
        scripts = {r.request_id: deque(self._outputs(r)) for r in requests}
        self.streams.append(FakeStream(self, scripts))
        return self.streams[-1]

    def _outputs(self, request: EngineRequest) -> list[EngineOutput | Exception]:
        return [o if isinstance(o, Exception) else msgspec.structs.replace(
            o, request_id=request.request_id) for o in self.script(request)]


class FakeStream:
    """``OutputStream``'s behaviour: round-robin outputs until every sequence finished;
    ``finish`` and leaving the ``async with`` abort what still runs."""

    def __init__(self, engine: FakeEngine,
                 scripts: dict[str, deque[EngineOutput | Exception]]) -> None:
        self._engine = engine
        self._scripts = scripts

    @property
    def pending(self) -> list[str]:
        return list(self._scripts)

    async def __aenter__(self) -> FakeStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.abort_all()

    def __aiter__(self) -> AsyncIterator[EngineOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[EngineOutput]:
        while self._scripts:
            for rid in list(self._scripts):
                queue = self._scripts.get(rid)
                if not queue:
                    self._scripts.pop(rid, None)
                    continue
                item = queue.popleft()
                if isinstance(item, Exception):
                    self.abort_all()
                    raise item
                if item.finished:
                    self._scripts.pop(rid)
                yield item

    def finish(self, request_id: str) -> None:
        if self._scripts.pop(request_id, None) is not None:
            self._engine.aborted.append(request_id)

    def abort_all(self) -> None:
        self._engine.aborted += sorted(self._scripts)
        self._scripts.clear()


def char_tokenizer_for_serving() -> Tokenizer:
    hf = char_tokenizer()
    return Tokenizer(hf, chat_template=hf.chat_template, name=MODEL)


def serving_context(engine: FakeEngine, tokenizer: Tokenizer, **config: object) -> ServingContext:
    """The context the app runs on: the fake engine, the character tokenizer."""
    return ServingContext(
        config=ServerConfig(**config),  # type: ignore[arg-type]
        engine=engine,  # type: ignore[arg-type]
        tokenizer=tokenizer,
        info=engine.info,
        model_names=(MODEL,),
        model_root=MODEL,
        metrics=ServerMetrics(engine, MODEL),  # type: ignore[arg-type]
    )
