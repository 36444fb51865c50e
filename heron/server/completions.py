"""POST /v1/completions: prepare the prompt(s) (``heron.server.pipeline``), generate, answer as
JSON or SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator

from heron.engine.client import new_request_id
from heron.engine.messages import TokenLogprobs
from heron.output_processor import ChoiceDelta
from heron.server.pipeline import prepare
from heron.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
)
from heron.server.serving import (
    Generation,
    ServingContext,
    StreamFormatter,
    engine_error,
    top_logprobs,
)

CompletionResult = CompletionResponse | ErrorResponse | AsyncIterator[str]


async def serve_completion(ctx: ServingContext, request: CompletionRequest) -> CompletionResult:
    """Prepare, submit and return the response (or an SSE stream, or an error value)."""
    prepared = await prepare(ctx, request)
    if isinstance(prepared, ErrorResponse):
        return prepared
    gen = Generation(ctx, new_request_id("cmpl"), prepared.prompts, prepared.params,
                     lora=prepared.lora)
    formatter = _CompletionFormatter(ctx, request, gen)
    if request.stream:
        return formatter.stream()
    return await formatter.full()


class _CompletionFormatter(StreamFormatter[CompletionRequest, CompletionChunk]):
    """Turns a Generation's deltas into OpenAI's completion JSON or chunks."""

    chunk_type = CompletionChunk

    def __init__(self, ctx: ServingContext, request: CompletionRequest, gen: Generation) -> None:
        super().__init__(ctx, request, gen)
        self.k = request.logprobs  # None: no logprobs
        self.offsets = [0] * gen.num_choices  # text_offset of the next token, per choice
        self.hidden_ids: frozenset[int] = (
            frozenset(getattr(ctx.tokenizer, "special_token_ids", ()))
            if request.skip_special_tokens is not False
            else frozenset()
        )

    async def full(self) -> CompletionResponse | ErrorResponse:
        n = self.gen.num_choices
        texts = [""] * n
        logprobs = [CompletionLogprobs() for _ in range(n)]
        finish: list[tuple[str | None, int | str | None]] = [(None, None)] * n
        try:
            async for d in self.gen.run():
                text, lp = self._piece(d)
                texts[d.index] += text
                _extend(logprobs[d.index], lp)
                if d.finish_reason is not None:
                    finish[d.index] = (d.finish_reason, d.stop_reason)
        except Exception as e:  # noqa: BLE001 - engine errors become error values
            return engine_error(e)
        choices = [
            CompletionChoice(
                index=i,
                text=texts[i],
                logprobs=logprobs[i] if self.k is not None else None,
                finish_reason=finish[i][0],
                stop_reason=finish[i][1],
            )
            for i in range(n)
        ]
        return CompletionResponse(
            id=self.gen.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self.gen.usage(),
        )

    def _chunks(self, d: ChoiceDelta) -> list[CompletionChunk]:
        text, lp = self._piece(d)
        if not (text or d.finish_reason is not None or (lp and lp.tokens)):
            return []
        choice = CompletionChoice(index=d.index, text=text, logprobs=lp,
                                  finish_reason=d.finish_reason, stop_reason=d.stop_reason)
        return [self._chunk([choice])]

    # ---- text and logprobs of one delta ---------------------------------------------------

    def _piece(self, d: ChoiceDelta) -> tuple[str, CompletionLogprobs | None]:
        """The delta's text (with the echoed prompt first) and its logprobs."""
        prompt = self.gen.prompts[d.prompt_index]
        echo = bool(self.request.echo and d.first)
        text = (prompt.text if echo else "") + d.text
        if self.k is None:
            return text, None
        lp = CompletionLogprobs()
        if echo:
            self._add_prompt_logprobs(lp, d)
        for entry in d.logprobs:
            self._add(lp, d.index, entry.token_ids[0], entry.logprobs[0], entry)
        return text, lp

    def _add_prompt_logprobs(self, lp: CompletionLogprobs, d: ChoiceDelta) -> None:
        prompt = self.gen.prompts[d.prompt_index]
        entries = self.gen.prompt_logprobs.get(d.prompt_index) or [None] * len(prompt.token_ids)
        for tid, entry in zip(prompt.token_ids, entries, strict=False):
            self._add(lp, d.index, tid, None if entry is None else entry.logprobs[0], entry)

    def _add(
        self,
        lp: CompletionLogprobs,
        index: int,
        token_id: int,
        logprob: float | None,
        entry: TokenLogprobs | None,
    ) -> None:
        word = self.ctx.token_strings([token_id])[0]
        lp.tokens.append(word)
        lp.token_logprobs.append(logprob)
        lp.text_offset.append(self.offsets[index])
        if token_id not in self.hidden_ids:  # skipped special tokens take no room in the text
            self.offsets[index] += len(word)
        if entry is None:
            lp.top_logprobs.append(None)
            return
        top = top_logprobs(entry, self.k or 0)
        words = self.ctx.token_strings([t for t, _ in top])
        lp.top_logprobs.append({w: v for w, (_, v) in zip(words, top, strict=True)})


def _extend(into: CompletionLogprobs, more: CompletionLogprobs | None) -> None:
    if more is None:
        return
    into.text_offset += more.text_offset
    into.token_logprobs += more.token_logprobs
    into.tokens += more.tokens
    into.top_logprobs += more.top_logprobs
