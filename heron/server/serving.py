"""What the endpoints share: the serving context, and the generation driver.

``Generation`` runs one API request through the engine client: the output processor's
``RequestState`` (``heron.output_processor``, shared with the offline ``LLM``) fans it out
into engine sequences and turns each engine output into a ``ChoiceDelta`` (new text, token
ids, logprobs, finish and stop reasons); ``Generation`` aborts a sequence a stop string ended,
records metrics and counts usage. The endpoint modules only format the deltas as OpenAI JSON
or SSE chunks.
"""

from __future__ import annotations

import asyncio
import functools
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
from heron.engine.messages import EngineInfo, TokenLogprobs
from heron.output_processor import ChoiceDelta, Prompt, RequestState
from heron.sampling_params import MAX_QUOTE_CHARS
from heron.server.guards import FieldNameLog, printable
from heron.server.inputs import Limits, RequestFields
from heron.server.offload import offload, on_lane
from heron.server.protocol import (
    CompletionTokensDetails,
    ErrorResponse,
    PromptTokensDetails,
    SamplingFields,
    UsageInfo,
    bad_request,
    make_error,
    param_of,
    sse_event,
)
from heron.server.reasoning import (
    THINK_CLOSE,
    THINK_OPEN,
    ReasoningParser,
    resolve_reasoning_parser,
)
from heron.server.response_store import ResponseStore
from heron.structured.grammar import SpecValidator
from heron.structured.tools import MarkerTokens

if TYPE_CHECKING:
    from heron.lora import LoRARequest
    from heron.sampling_params import SamplingParams
    from heron.server.config import ServerConfig
    from heron.server.metrics import ServerMetrics
    from heron.server.model_facts import ModelFacts
    from heron.server.router import Router
    from heron.tokenizer.tokenizer import Tokenizer

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
    facts: ModelFacts | None = None  # the model's catalogue entry (Ollama's /api/tags)
    # LoRA adapters a request's ``model`` may name (--lora-modules), by name
    loras: dict[str, LoRARequest] = field(default_factory=dict)
    max_lora_rank: int | None = None  # None: LoRA is not enabled
    last_lora_id: int = 0  # the largest lora_int_id handed out (ids are never reused)

    @property
    def default_model(self) -> str:
        return self.model_names[0]

    def check_model(self, name: str | None) -> ErrorResponse | None:
        if name is None or name in self.model_names or name in self.loras:
            return None
        served = ", ".join((*self.model_names, *self.loras))
        return make_error(
            404,
            f"The model `{printable(name, MAX_QUOTE_CHARS)}` does not exist; this server serves "
            f"{served}.",
            param="model",
            code="model_not_found",
        )

    def lora_for(self, name: str | None) -> LoRARequest | None:
        """The adapter a request's ``model`` names (None: the base model)."""
        return None if name is None else self.loras.get(name)

    @property
    def limits(self) -> Limits:
        return Limits(self.config.max_n, self.config.max_logprobs, self.info.vocab_size,
                      self.config.max_seqs_per_request, self.reasoning_parser is not None)

    @functools.cached_property
    def think_tags_are_tokens(self) -> bool:
        """``<think>`` and ``</think>`` are added tokens of the vocabulary (Qwen3's, R1's), as
        the engine's grammars spell them (a thinking budget is enforced on them only)."""
        added = self.tokenizer.hf.get_added_vocab()
        return THINK_OPEN in added and THINK_CLOSE in added

    @functools.cached_property
    def tool_markers(self) -> MarkerTokens | None:
        """Under --tool-call-parser mistral: the ids of ``[TOOL_CALLS]`` and ``[ARGS]`` where
        they are special tokens of the vocabulary (grammars name them; ``[ARGS]``: a v11+
        vocabulary, whose calls are ``name[ARGS]{...}``)."""
        if self.config.tool_call_parser != "mistral":
            return None
        added = self.tokenizer.hf.get_added_vocab()
        special = self.tokenizer.special_token_ids

        def token(text: str) -> int | None:
            return added[text] if added.get(text) in special else None

        return MarkerTokens(token("[TOOL_CALLS]"), token("[ARGS]"))

    @functools.cached_property
    def reasoning_parser(self) -> str | None:
        """The reasoning parser that runs (``--reasoning-parser``, auto resolved); None: none."""
        return resolve_reasoning_parser(self.config.reasoning_parser, self.tokenizer.chat_template)

    def check_fields(self, request: RequestFields) -> ErrorResponse | None:
        """Refuse fields the API does not have and fields we cannot honour; log (once per
        name) fields we ignore."""
        unknown = request.unknown_fields()
        if unknown:
            name = printable(unknown[0])
            return bad_request(f"Unknown parameter: '{name}'.", param=name,
                               code="unknown_parameter")
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
        """``text``'s token ids: on the heavy lane for a large request, on a thread for a
        long text, else here."""
        if on_lane():
            return await offload(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        if len(text) > _THREAD_TOKENIZE_CHARS:
            return await asyncio.to_thread(
                self.tokenizer.encode, text, add_special_tokens=add_special_tokens
            )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def token_strings(self, ids: list[int]) -> list[str]:
        return list(self.tokenizer.token_strings(ids))


def value_error(e: ValueError, request: object = None) -> ErrorResponse:
    """A 400 whose ``param`` is the field path the message starts with (one of ``request``'s
    fields when it is given: "the prompt..." names no field)."""
    message = str(e)
    fields = None
    if isinstance(request, BaseModel):
        fields = {*type(request).model_fields, *(request.model_extra or {})}
    return bad_request(message, param=param_of(message, fields))


# ==== the generation driver =======================================================================


class Generation:
    """One API request in flight: its choices (``RequestState``, the output processor's) run
    through the engine client, with the server's metrics and usage."""

    def __init__(
        self, ctx: ServingContext, request_id: str, prompts: list[Prompt], params: SamplingParams,
        reasoning: ReasoningParser | None = None, lora: LoRARequest | None = None,
    ) -> None:
        self.ctx = ctx
        self.request_id = request_id
        self.arrival = time.monotonic()
        self.reasoning = reasoning  # how the output's thinking is read (None: all content)
        content_start = None if reasoning is None else (lambda: reasoning.scanner().advance)
        self.state = RequestState(request_id, prompts, params, ctx.tokenizer, self.arrival,
                                  content_start, lora)
        self._last_token_time: dict[int, float] = {}

    @property
    def prompts(self) -> list[Prompt]:
        return self.state.prompts

    @property
    def num_choices(self) -> int:
        return self.state.num_choices

    @property
    def prompt_logprobs(self) -> dict[int, list[TokenLogprobs | None]]:
        return self.state.prompt_logprobs

    async def run(self) -> AsyncIterator[ChoiceDelta]:
        """Yield deltas until every choice finished; leaving early aborts what still runs.

        Raises RequestRejectedError (the core refused it) or EngineError (the core died).
        """
        async with self.ctx.engine.stream(self.state.requests) as stream:
            async for out in stream:
                delta = self.state.process(out)
                if delta is None:
                    continue
                if delta.abort:
                    stream.finish(out.request_id)  # a stop string: abort it in the core
                self._observe(delta)
                yield delta

    def _observe(self, delta: ChoiceDelta) -> None:
        now = time.monotonic()
        metrics = self.ctx.metrics
        if delta.token_ids:
            last = self._last_token_time.get(delta.index)
            if last is None:
                metrics.observe_first_token(now - self.arrival)
            else:
                metrics.observe_inter_token(now - last)
            self._last_token_time[delta.index] = now
        if delta.finish_reason is not None:
            metrics.observe_finished(
                delta.finish_reason,
                now - self.arrival,
                len(self.prompts[delta.prompt_index].token_ids),
                len(self.state.choice(delta.index).token_ids),
            )

    def usage(self, reasoning_tokens: int | None = None) -> UsageInfo:
        """The request's usage; ``reasoning_tokens`` (a model that thinks) adds
        ``completion_tokens_details``."""
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        choices = self.state.choices.values()
        completion = sum(len(c.token_ids) for c in choices)
        cached: dict[int, int] = {}
        for c in choices:
            cached[c.prompt_index] = max(cached.get(c.prompt_index, 0), c.num_cached_tokens)
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached.values())),
            completion_tokens_details=None if reasoning_tokens is None
            else CompletionTokensDetails(reasoning_tokens=reasoning_tokens),
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
    return sse_event(data)


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
            usage=self._usage() if with_usage else None,
        )

    def _usage(self) -> UsageInfo:
        return self.gen.usage()

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
