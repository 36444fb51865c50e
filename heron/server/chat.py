"""POST /v1/chat/completions: prepare (``heron.server.pipeline``), generate, answer as JSON or SSE.

With tools, the request's ``ToolPlan`` says how the output is constrained and which parser
reads tool calls out of it; calls become ``message.tool_calls`` (streamed as OpenAI does:
a first delta with id, type and name, then argument pieces) and ``finish_reason`` becomes
"tool_calls" when the model stopped after calling.

A model that thinks (``heron.server.reasoning``): its reasoning goes to ``message.reasoning``
and ``message.reasoning_content`` (streamed as ``delta.reasoning`` / ``reasoning_content``
pieces before the content's), tool calls are read from the content only, the content is null
when a finish came inside the reasoning, and usage counts ``completion_tokens_details.
reasoning_tokens``.
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
    UsageInfo,
)
from heron.server.reasoning import ReasoningStream
from heron.server.serving import (
    Generation,
    ServingContext,
    StreamFormatter,
    engine_error,
    top_logprobs,
)
from heron.structured.tool_parsers import ToolCallDelta, ToolCallStream, ToolParser

ChatResult = ChatCompletionResponse | ErrorResponse | AsyncIterator[str]


async def serve_chat(ctx: ServingContext, request: ChatCompletionRequest) -> ChatResult:
    """Prepare, submit and return the response (or an SSE stream, or an error value)."""
    prepared = await prepare(ctx, request)
    if isinstance(prepared, ErrorResponse):
        return prepared
    gen = Generation(ctx, new_request_id("chatcmpl"), prepared.prompts, prepared.params,
                     prepared.reasoning, prepared.lora)
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
        self.reasoning_streams: dict[int, ReasoningStream] = {}

    # ---- one JSON response ----------------------------------------------------------------

    async def full(self) -> ChatCompletionResponse | ErrorResponse:
        texts = [""] * self.gen.num_choices
        reasonings = [""] * len(texts)
        logprobs: list[list[ChatTokenLogprob]] = [[] for _ in texts]
        finish: list[tuple[str | None, int | str | None]] = [(None, None)] * len(texts)
        try:
            async for d in self.gen.run():
                reasoning, content = self._split_reasoning(d)
                texts[d.index] += content
                reasonings[d.index] += reasoning
                logprobs[d.index] += self._logprobs(d.logprobs)
                if d.finish_reason is not None:
                    finish[d.index] = (d.finish_reason, d.stop_reason)
        except Exception as e:  # noqa: BLE001 - engine errors become error values
            return engine_error(e)
        choices = []
        for i, text in enumerate(texts):
            message = self._message(text, reasonings[i])
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
            usage=self._usage(),
        )

    def _message(self, text: str, reasoning: str = "") -> ChatResponseMessage:
        """The assistant message: tool calls parsed out of ``text`` (the content) when the
        request has tools; the reasoning under both its names."""
        message = self._content_message(text)
        if reasoning:
            message.reasoning = message.reasoning_content = reasoning
            message.content = message.content or None
        return message

    def _content_message(self, text: str) -> ChatResponseMessage:
        if self.parser is None:
            return ChatResponseMessage(content=text)
        parsed = self.parser.parse(text, final=True)
        if not parsed.calls:
            return ChatResponseMessage(content=parsed.content)
        calls = [
            ToolCall(id=c.id or self.parser.new_call_id(),
                     function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in parsed.calls
        ]
        return ChatResponseMessage(content=parsed.content or None, tool_calls=calls)

    def _split_reasoning(self, d: ChoiceDelta) -> tuple[str, str]:
        """(reasoning, content) that this delta adds; all content without a reasoning parser."""
        if self.gen.reasoning is None:
            return "", d.text
        stream = self.reasoning_streams.setdefault(d.index, ReasoningStream(self.gen.reasoning))
        return stream.feed(d.text, len(d.token_ids), final=d.finish_reason is not None)

    def _usage(self) -> UsageInfo:
        if self.gen.reasoning is None:
            return self.gen.usage()
        return self.gen.usage(sum(s.reasoning_tokens for s in self.reasoning_streams.values()))

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
        reasoning, content = self._split_reasoning(d)
        text, calls, has_calls = self._split_tool_calls(d, content)
        if reasoning or text or logprobs or calls:
            chunks.append(
                self._chunk(
                    [
                        ChatStreamChoice(
                            index=d.index,
                            delta=DeltaMessage(
                                content=text if text or not (calls or reasoning) else None,
                                reasoning=reasoning or None,
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

    def _split_tool_calls(self, d: ChoiceDelta,
                          content: str) -> tuple[str, list[ToolCallDelta], bool]:
        """(content to send, tool-call pieces to send, whether the choice has calls so far)
        of the delta's ``content``."""
        if self.parser is None:
            return content, [], False
        stream = self.tool_streams.setdefault(d.index, ToolCallStream(self.parser))
        text, calls = stream.feed(content, final=d.finish_reason is not None)
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
