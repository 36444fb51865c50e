"""What the endpoints share: the serving context, and the generation driver.

``Generation`` fans one API request out into engine sequences (n choices per prompt,
seed + i when seeded), feeds their token ids through incremental detokenizers, finishes
a sequence when a stop string appears (aborting it in the core), and yields one
``ChoiceDelta`` per engine output: the new text, its logprobs, and the finish reason.
The endpoint modules only format those deltas as OpenAI JSON or SSE chunks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from pydantic import BaseModel

from heron.engine.client import (
    ConstraintFailedError,
    EngineClient,
    EngineError,
    RequestRejectedError,
)
from heron.engine.messages import EngineInfo, EngineOutput, EngineRequest, TokenLogprobs
from heron.sampling_params import MAX_QUOTE_CHARS
from heron.server.guards import FieldNameLog, printable
from heron.server.inputs import Limits, RequestFields
from heron.server.protocol import (
    ErrorResponse,
    PromptTokensDetails,
    SamplingFields,
    UsageInfo,
    bad_request,
    make_error,
    param_of,
)
from heron.server.response_store import ResponseStore
from heron.structured.grammar import SpecValidator

if TYPE_CHECKING:
    from heron.sampling_params import SamplingParams
    from heron.server.config import ServerConfig
    from heron.server.metrics import ServerMetrics
    from heron.server.router import Router
    from heron.tokenizer.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

_THREAD_TOKENIZE_CHARS = 20_000  # longer texts are tokenized off the event loop


@dataclass
class ServingContext:
    """Everything an endpoint needs; one per app (no module globals)."""

    config: ServerConfig
    engine: EngineClient | Router  # a Router spreads requests over data-parallel engines
    tokenizer: Tokenizer
    info: EngineInfo
    model_names: tuple[str, ...]
    model_root: str
    metrics: ServerMetrics
    specs: SpecValidator = field(default_factory=SpecValidator)
    ignored_fields: FieldNameLog = field(default_factory=FieldNameLog)
    responses: ResponseStore = field(default_factory=ResponseStore)  # /v1/responses state

    @property
    def default_model(self) -> str:
        return self.model_names[0]

    def check_model(self, name: str | None) -> ErrorResponse | None:
        if name is None or name in self.model_names:
            return None
        return make_error(
            404,
            f"The model `{printable(name, MAX_QUOTE_CHARS)}` does not exist; this server serves "
            f"{', '.join(self.model_names)}.",
            param="model",
            code="model_not_found",
        )

    @property
    def limits(self) -> Limits:
        return Limits(self.config.max_n, self.config.max_logprobs, self.info.vocab_size,
                      self.config.max_seqs_per_request)

    def check_fields(self, request: RequestFields) -> ErrorResponse | None:
        """Refuse fields we cannot honour; log (once per name) fields we ignore."""
        unsupported = request.unsupported_fields()
        if unsupported:
            return bad_request(
                f"{unsupported[0]} is not supported by this server",
                param=unsupported[0],
                code="unsupported_parameter",
            )
        self.ignored_fields.note(request.ignored_fields())
        return None

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) > _THREAD_TOKENIZE_CHARS:
            return await asyncio.to_thread(
                self.tokenizer.encode, text, add_special_tokens=add_special_tokens
            )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def token_strings(self, ids: list[int]) -> list[str]:
        return list(self.tokenizer.token_strings(ids))


def value_error(e: ValueError) -> ErrorResponse:
    message = str(e)
    return bad_request(message, param=param_of(message))


# ==== the generation driver =======================================================================


@dataclass
class Prompt:
    """One tokenized prompt; ``text`` is what ``echo`` repeats."""

    token_ids: list[int]
    text: str


@dataclass
class ChoiceDelta:
    """What one engine output added to one choice."""

    index: int
    prompt_index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first: bool = False  # the choice's first delta (streams send the role / the echo then)


class _Choice:
    """One engine sequence: its detokenizer, counts and timings."""

    def __init__(
        self, index: int, prompt_index: int, detok: IncrementalDetokenizer, params: SamplingParams
    ) -> None:
        self.index = index
        self.prompt_index = prompt_index
        self.detok = detok
        self.stop_token_ids = set(params.stop_token_ids or ())
        self.num_tokens = 0
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self.started = False
        self.last_time: float | None = None

    def consume(self, out: EngineOutput) -> ChoiceDelta:
        ids = list(out.new_token_ids)
        self.num_tokens += len(ids)
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        # An eos / stop token that ended the request adds no text (include_stop_str_in_output
        # aside). A structured output that completed also stops, with no stop token: its last
        # token is text.
        by_token = out.finish_reason == "stop" and out.stop_reason is not None
        stop = self.detok.update(ids, stop_terminated=by_token) if ids else None
        # vLLM's stop_reason: the stop string or the stop_token_ids entry; None for an eos.
        stop_reason: int | str | None = (
            out.stop_reason if out.stop_reason in self.stop_token_ids else None)
        if stop is not None:
            self.finish_reason, stop_reason = "stop", stop
            text = self.detok.get_delta()
        elif out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            text = self.detok.flush()
        else:
            text = self.detok.get_delta()
        delta = ChoiceDelta(
            self.index,
            self.prompt_index,
            text,
            ids,
            list(out.new_logprobs or []),
            self.finish_reason,
            stop_reason if self.finish_reason else None,
            first=not self.started,
        )
        self.started = True
        return delta


class Generation:
    """The engine sequences behind one API request: ``len(prompts) * n`` choices.

    Choice ``p * n + i`` is the i-th sample of prompt p (OpenAI's numbering).
    """

    def __init__(
        self, ctx: ServingContext, request_id: str, prompts: list[Prompt], params: SamplingParams
    ) -> None:
        from heron.tokenizer.tokenizer import IncrementalDetokenizer

        self.ctx = ctx
        self.request_id = request_id
        self.prompts = prompts
        self.n = params.n
        self.requests: list[EngineRequest] = []
        self.choices: dict[str, _Choice] = {}
        self.prompt_logprobs: dict[int, list[TokenLogprobs | None]] = {}
        self.arrival = time.monotonic()
        for p, prompt in enumerate(prompts):
            for i in range(params.n):
                seed = None if params.seed is None else params.seed + i
                child = params.clone(n=1, seed=seed)
                rid = f"{request_id}-{p}-{i}"
                detok = IncrementalDetokenizer(ctx.tokenizer, prompt.token_ids, child)
                self.choices[rid] = _Choice(p * params.n + i, p, detok, child)
                self.requests.append(
                    EngineRequest(
                        request_id=rid,
                        prompt_token_ids=prompt.token_ids,
                        sampling_params=child,
                        arrival_time=self.arrival,
                    )
                )

    @property
    def num_choices(self) -> int:
        return len(self.choices)

    async def run(self) -> AsyncIterator[ChoiceDelta]:
        """Yield deltas until every choice finished; leaving early aborts what still runs.

        Raises RequestRejectedError (the core refused it) or EngineError (the core died).
        """
        async with self.ctx.engine.stream(self.requests) as stream:
            async for out in stream:
                choice = self.choices[out.request_id]
                if out.prompt_logprobs is not None:
                    self.prompt_logprobs.setdefault(choice.prompt_index, list(out.prompt_logprobs))
                delta = choice.consume(out)
                self._observe(choice, bool(out.new_token_ids))
                if choice.finish_reason is not None and not out.finished:
                    stream.finish(out.request_id)  # a stop string: abort it in the core
                yield delta

    def _observe(self, choice: _Choice, got_token: bool) -> None:
        now = time.monotonic()
        metrics = self.ctx.metrics
        if got_token:
            if choice.last_time is None:
                metrics.observe_first_token(now - self.arrival)
            else:
                metrics.observe_inter_token(now - choice.last_time)
            choice.last_time = now
        if choice.finish_reason is not None:
            metrics.observe_finished(
                choice.finish_reason,
                now - self.arrival,
                len(self.prompts[choice.prompt_index].token_ids),
                choice.num_tokens,
            )

    def usage(self) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        completion = sum(c.num_tokens for c in self.choices.values())
        cached: dict[int, int] = {}
        for c in self.choices.values():
            cached[c.prompt_index] = max(cached.get(c.prompt_index, 0), c.num_cached_tokens)
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached.values())),
        )


def engine_error(e: Exception) -> ErrorResponse:
    """An exception from the engine side turned into an error value."""
    if isinstance(e, RequestRejectedError):
        return value_error(e)
    if isinstance(e, ConstraintFailedError):
        return bad_request(str(e), code="constraint_failed")
    if isinstance(e, EngineError):
        return make_error(503, f"the engine is unavailable: {e}", code="engine_unavailable")
    logger.exception("unexpected error while generating")
    return make_error(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")


def sse(data: str) -> str:
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")


RequestT = TypeVar("RequestT", bound=SamplingFields)
ChunkT = TypeVar("ChunkT", bound=BaseModel)


class StreamFormatter(Generic[RequestT, ChunkT]):
    """What chat and completions share when writing a Generation as SSE.

    A subclass sets ``chunk_type`` (its pydantic chunk model) and turns one delta into
    chunks with ``_chunks``; the loop, the usage chunk, error events and ``[DONE]`` live here.
    """

    chunk_type: type[ChunkT]

    def __init__(self, ctx: ServingContext, request: RequestT, gen: Generation) -> None:
        self.ctx = ctx
        self.request = request
        self.gen = gen
        self.model = request.model or ctx.default_model
        self.created = int(time.time())

    def _chunks(self, d: ChoiceDelta) -> list[ChunkT]:
        raise NotImplementedError

    async def stream(self) -> AsyncIterator[str]:
        try:
            async for d in self.gen.run():
                for chunk in self._chunks(d):
                    yield self._dump(chunk)
        except Exception as e:  # noqa: BLE001 - an error event, then [DONE]
            yield sse(engine_error(e).model_dump_json())
            yield SSE_DONE
            return
        if self.request.include_usage:
            yield self._dump(self._chunk([], usage=True))
        yield SSE_DONE

    def _chunk(self, choices: list, usage: bool = False) -> ChunkT:
        with_usage = usage or self.request.continuous_usage
        return self.chunk_type(
            id=self.gen.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self.gen.usage() if with_usage else None,
        )

    def _dump(self, chunk: ChunkT) -> str:
        exclude = None if self.request.include_usage else {"usage"}
        return sse(chunk.model_dump_json(exclude=exclude))


def top_logprobs(entry: TokenLogprobs, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) pairs of one position, best first."""
    pairs = sorted(zip(entry.token_ids, entry.logprobs, strict=True), key=lambda p: -p[1])
    seen: set[int] = set()
    out = []
    for tid, lp in pairs:
        if tid not in seen:
            seen.add(tid)
            out.append((tid, lp))
    return out[:k]
