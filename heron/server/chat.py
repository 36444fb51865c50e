"""POST /v1/chat/completions: prepare (``heron.server.pipeline``), generate, answer as JSON or SSE.

With tools, the request's ``ToolPlan`` says how the output is constrained and which parser
reads tool calls out of it; calls become ``message.tool_calls`` (streamed as OpenAI does:
a first delta with id, type and name, then argument pieces) and ``finish_reason`` becomes
"tool_calls" when the model stopped after calling.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from heron.engine.client import new_request_id
from heron.engine.messages import TokenLogprobs
from heron.output_processor import ChoiceDelta
from heron.server.pipeline import prepare
from heron.server.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ErrorResponse,
    FunctionCall,
    ToolCall,
    TopLogprob,
)
from heron.server.serving import (
    Generation,
    ServingContext,
    StreamFormatter,
    engine_error,
    top_logprobs,
)
from heron.structured.tool_parsers import ToolCallDelta, ToolCallStream, ToolParser, new_call_id

ChatResult = ChatCompletionResponse | ErrorResponse | AsyncIterator[str]


async def serve_chat(ctx: ServingContext, request: ChatCompletionRequest) -> ChatResult:
    """Prepare, submit and return the response (or an SSE stream, or an error value)."""
    prepared = await prepare(ctx, request)
    if isinstance(prepared, ErrorResponse):
        return prepared
    gen = Generation(ctx, new_request_id("chatcmpl"), prepared.prompts, prepared.params)
    formatter = _ChatFormatter(ctx, request, gen, prepared.tool_parser)
    if request.stream:
        return formatter.stream()
    return await formatter.full()


def tool_finish_reason(finish_reason: str | None, has_calls: bool) -> str | None:
    """A model that stopped after calling tools finished with "tool_calls" (OpenAI's)."""
    return "tool_calls" if has_calls and finish_reason == "stop" else finish_reason


class _ChatFormatter(StreamFormatter[ChatCompletionRequest, ChatCompletionChunk]):
    """Turns a Generation's deltas into OpenAI's chat JSON or chunks."""

    chunk_type = ChatCompletionChunk

    def __init__(
        self,
        ctx: ServingContext,
        request: ChatCompletionRequest,
        gen: Generation,
        parser: ToolParser | None = None,
    ) -> None:
        super().__init__(ctx, request, gen)
        self.parser = parser
        self.top_k = (request.top_logprobs or 0) if request.logprobs else None
        self.tool_streams: dict[int, ToolCallStream] = {}

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
        choices = []
        for i, text in enumerate(texts):
            message = self._message(text)
            choices.append(
                ChatCompletionChoice(
                    index=i,
                    message=message,
                    logprobs=ChatChoiceLogprobs(content=logprobs[i])
                    if self.top_k is not None
                    else None,
                    finish_reason=tool_finish_reason(finish[i][0], bool(message.tool_calls)),
                    stop_reason=finish[i][1],
                )
            )
        return ChatCompletionResponse(
            id=self.gen.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self.gen.usage(),
        )

    def _message(self, text: str) -> ChatResponseMessage:
        """The assistant message: tool calls parsed out of ``text`` when the request has tools."""
        if self.parser is None:
            return ChatResponseMessage(content=text)
        parsed = self.parser.parse(text, final=True)
        if not parsed.calls:
            return ChatResponseMessage(content=parsed.content)
        calls = [
            ToolCall(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in parsed.calls
        ]
        return ChatResponseMessage(content=parsed.content or None, tool_calls=calls)

    # ---- SSE ------------------------------------------------------------------------------

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
        text, calls, has_calls = self._split_tool_calls(d)
        if text or logprobs or calls:
            chunks.append(
                self._chunk(
                    [
                        ChatStreamChoice(
                            index=d.index,
                            delta=DeltaMessage(
                                content=text if text or not calls else None,
                                tool_calls=[_delta_tool_call(c) for c in calls] or None,
                            ),
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
                            finish_reason=tool_finish_reason(d.finish_reason, has_calls),
                            stop_reason=d.stop_reason,
                        )
                    ]
                )
            )
        return chunks

    def _split_tool_calls(self, d: ChoiceDelta) -> tuple[str, list[ToolCallDelta], bool]:
        """(content to send, tool-call pieces to send, whether the choice has calls so far)."""
        if self.parser is None:
            return d.text, [], False
        stream = self.tool_streams.setdefault(d.index, ToolCallStream(self.parser))
        text, calls = stream.feed(d.text, final=d.finish_reason is not None)
        return text, calls, bool(stream.call_ids)

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


def _delta_tool_call(delta: ToolCallDelta) -> DeltaToolCall:
    return DeltaToolCall(
        index=delta.index,
        id=delta.id,
        type="function" if delta.id is not None else None,
        function=DeltaFunctionCall(name=delta.name, arguments=delta.arguments),
    )
