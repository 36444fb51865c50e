"""POST /v1/chat/completions: render the chat template, generate, answer as JSON or SSE."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from heron.engine.client import new_request_id
from heron.engine.messages import TokenLogprobs
from heron.server.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    ErrorResponse,
    TopLogprob,
)
from heron.server.serving import (
    SSE_DONE,
    ChoiceDelta,
    Generation,
    Prompt,
    ServingContext,
    engine_error,
    sse,
    top_logprobs,
    value_error,
)

ChatResult = ChatCompletionResponse | ErrorResponse | AsyncIterator[str]


async def render_chat_prompt(ctx: ServingContext, request: ChatCompletionRequest) -> Prompt:
    """The chat template applied to the messages, tokenized. ValueError on a template error."""
    messages = [m.to_template_dict() for m in request.messages]
    try:
        text = ctx.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=bool(request.add_generation_prompt),
            continue_final_message=bool(request.continue_final_message),
            **(request.chat_template_kwargs or {}),
        )
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - jinja raises many kinds; all mean "bad messages"
        raise ValueError(f"the chat template could not render these messages: {e}") from e
    return Prompt(await ctx.encode(text, add_special_tokens=False), text)


async def serve_chat(ctx: ServingContext, request: ChatCompletionRequest) -> ChatResult:
    """Validate, submit and return the response (or an SSE stream, or an error value)."""
    error = ctx.check_model(request.model) or ctx.check_fields(request)
    if error is not None:
        return error
    try:
        request.check_messages()
        request.check_limits(ctx.config.max_n, ctx.config.max_logprobs, ctx.info.vocab_size)
        prompt = await render_chat_prompt(ctx, request)
        max_tokens = request.requested_max_tokens()
        error = ctx.check_context(len(prompt.token_ids), max_tokens, what="messages")
        if error is not None:
            return error
        params = request.to_sampling_params(max_tokens, ctx.config.max_logprobs)
    except ValueError as e:
        return value_error(e)
    gen = Generation(ctx, new_request_id("chatcmpl"), [prompt], params)
    formatter = _ChatFormatter(ctx, request, gen)
    if request.stream:
        return formatter.stream()
    return await formatter.full()


class _ChatFormatter:
    """Turns a Generation's deltas into OpenAI's chat JSON or chunks."""

    def __init__(
        self, ctx: ServingContext, request: ChatCompletionRequest, gen: Generation
    ) -> None:
        self.ctx = ctx
        self.request = request
        self.gen = gen
        self.model = request.model or ctx.default_model
        self.created = int(time.time())
        self.top_k = (request.top_logprobs or 0) if request.logprobs else None

    # ---- one JSON response ----------------------------------------------------------------

    async def full(self) -> ChatCompletionResponse | ErrorResponse:
        texts = [""] * self.gen.num_choices
        logprobs: list[list[ChatTokenLogprob]] = [[] for _ in texts]
        finish: list[tuple[str | None, int | str | None]] = [(None, None)] * len(texts)
        try:
            async for d in self.gen.run():
                texts[d.index] += d.text
                logprobs[d.index] += self._logprobs(d.logprobs)
                if d.finish_reason is not None:
                    finish[d.index] = (d.finish_reason, d.stop_reason)
        except Exception as e:  # noqa: BLE001 - engine errors become error values
            return engine_error(e)
        choices = [
            ChatCompletionChoice(
                index=i,
                message=ChatResponseMessage(content=texts[i]),
                logprobs=ChatChoiceLogprobs(content=logprobs[i])
                if self.top_k is not None
                else None,
                finish_reason=finish[i][0],
                stop_reason=finish[i][1],
            )
            for i in range(len(texts))
        ]
        return ChatCompletionResponse(
            id=self.gen.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self.gen.usage(),
        )

    # ---- SSE ------------------------------------------------------------------------------

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

    def _chunks(self, d: ChoiceDelta) -> list[ChatCompletionChunk]:
        chunks = []
        if d.first:
            chunks.append(
                self._chunk(
                    [
                        ChatStreamChoice(
                            index=d.index, delta=DeltaMessage(role="assistant", content="")
                        )
                    ]
                )
            )
        logprobs = self._logprobs(d.logprobs)
        if d.text or logprobs:
            chunks.append(
                self._chunk(
                    [
                        ChatStreamChoice(
                            index=d.index,
                            delta=DeltaMessage(content=d.text),
                            logprobs=ChatChoiceLogprobs(content=logprobs)
                            if self.top_k is not None
                            else None,
                        )
                    ]
                )
            )
        if d.finish_reason is not None:
            chunks.append(
                self._chunk(
                    [
                        ChatStreamChoice(
                            index=d.index,
                            delta=DeltaMessage(),
                            finish_reason=d.finish_reason,
                            stop_reason=d.stop_reason,
                        )
                    ]
                )
            )
        return chunks

    def _chunk(self, choices: list[ChatStreamChoice], usage: bool = False) -> ChatCompletionChunk:
        with_usage = usage or self.request.continuous_usage
        return ChatCompletionChunk(
            id=self.gen.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self.gen.usage() if with_usage else None,
        )

    def _dump(self, chunk: ChatCompletionChunk) -> str:
        exclude = None if self.request.include_usage else {"usage"}
        return sse(chunk.model_dump_json(exclude=exclude))

    # ---- logprobs -------------------------------------------------------------------------

    def _logprobs(self, entries: list[TokenLogprobs]) -> list[ChatTokenLogprob]:
        if self.top_k is None or not entries:
            return []
        return [self._token_logprob(e) for e in entries]

    def _token_logprob(self, entry: TokenLogprobs) -> ChatTokenLogprob:
        top = top_logprobs(entry, self.top_k or 0)
        words = self.ctx.token_strings([entry.token_ids[0]] + [t for t, _ in top])
        return ChatTokenLogprob(
            token=words[0],
            logprob=entry.logprobs[0],
            bytes=list(words[0].encode()),
            top_logprobs=[
                TopLogprob(token=w, logprob=lp, bytes=list(w.encode()))
                for w, (_, lp) in zip(words[1:], top, strict=True)
            ],
        )
