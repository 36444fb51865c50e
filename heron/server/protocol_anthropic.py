"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``): the request,
the message it answers with, stream events and Anthropic's error shape.

The request converts itself into chat terms (``to_spec``): ``system`` is a system message,
``text`` blocks are content, an assistant's ``tool_use`` blocks are its tool calls (arguments
as JSON text), a user's ``tool_result`` blocks are tool messages; custom tools (``input_schema``)
become functions. ``tool_choice`` maps as auto -> auto, any -> required, tool -> named,
none -> none. The preparation pipeline then renders, tokenizes and checks it like chat.

``thinking`` goes to the chat template of a model that thinks as Qwen3's switch:
``enabled`` -> ``enable_thinking`` true, ``disabled`` -> false, ``adaptive`` -> the template's
default. ``enabled`` requires ``budget_tokens`` (at least 1024, below ``max_tokens``, as
Anthropic checks): the reasoning holds at most that many tokens, then ``</think>`` is forced,
where the vocabulary has ``<think>`` / ``</think>`` tokens (ignored where the tags are text). A
model that does not think refuses ``enabled`` with a 400. Its reasoning comes back as ``thinking``
blocks (empty ``signature``), unless ``display`` is ``omitted``.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from heron.sampling_params import SamplingParams, short_repr
from heron.server.inputs import ChatInput, GenerateSpec, Limits, ThinkingBudget, ToolUse
from heron.server.protocol import (
    MAX_MESSAGES,
    MAX_TOOLS,
    ChatCompletionTool,
    ChatMessage,
    ErrorResponse,
    FunctionCall,
    FunctionDefinition,
    OpenAIBaseModel,
    RequestBody,
    ToolCall,
    check_chat,
    parse_part,
    sse_event,
)
from heron.structured.params import StructuredOutputsParams
from heron.structured.tools import ToolSpec

# HTTP status -> Anthropic's error type.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def new_tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


# ==== errors ======================================================================================


def anthropic_error(error: ErrorResponse) -> dict[str, Any]:
    """An error value in Anthropic's shape: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = _ERROR_TYPES.get(error.status_code, "api_error" if error.status_code >= 500
                            else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.error.message}}


# ==== the request =================================================================================


class TextBlock(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ThinkingBlock(OpenAIBaseModel):
    """An assistant turn's thinking sent back (its ``signature`` is not checked)."""

    type: Literal["thinking"]
    thinking: str


class ToolUseBlock(OpenAIBaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(OpenAIBaseModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(block.text for block in self.content)


class AnthropicMessage(OpenAIBaseModel):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class CustomTool(OpenAIBaseModel):
    type: Literal["custom"] | None = None
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(OpenAIBaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(OpenAIBaseModel):
    type: str
    budget_tokens: int | None = None
    display: Literal["summarized", "omitted"] | None = None  # omitted: no thinking blocks

    def template_kwargs(self, thinks: bool) -> dict[str, Any]:
        """What the setting tells the chat template (``thinks``: the model thinks, a reasoning
        parser runs); ValueError when it asks for thinking a model cannot do."""
        if self.type not in ("enabled", "disabled", "adaptive"):
            raise ValueError(f"thinking.type: {short_repr(self.type)} is not one of enabled, "
                             "disabled, adaptive")
        if self.type == "enabled":
            self.check_budget()
        if not thinks:
            # "adaptive" leaves thinking to the model: this one never does, which honours it.
            if self.type == "enabled":
                raise ValueError("thinking: extended thinking is not supported by this model")
            return {}
        return {} if self.type == "adaptive" else {"enable_thinking": self.type == "enabled"}

    def check_budget(self) -> None:
        """Anthropic's checks of ``enabled``'s ``budget_tokens`` (its messages)."""
        if self.budget_tokens is None:
            raise ValueError("thinking.enabled.budget_tokens: Field required")
        if self.budget_tokens < MIN_THINKING_BUDGET:
            raise ValueError("thinking.enabled.budget_tokens: Input should be greater than or "
                             f"equal to {MIN_THINKING_BUDGET}")

    def budget(self, max_tokens: int) -> ThinkingBudget | None:
        """The bound on the reasoning (``enabled`` only); ValueError unless below max_tokens."""
        if self.type != "enabled" or self.budget_tokens is None:
            return None
        if self.budget_tokens >= max_tokens:
            raise ValueError("`max_tokens` must be greater than `thinking.budget_tokens`. Please "
                             "consult our documentation at https://docs.claude.com/en/docs/"
                             "build-with-claude/extended-thinking#max-tokens-and-context-window-size")
        return ThinkingBudget(self.budget_tokens, "thinking.budget_tokens", strict=False)


MIN_THINKING_BUDGET = 1024  # Anthropic's least budget_tokens

# The fields a Messages request has beyond what makes its prompt.
_GENERATION_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "stop_sequences", "stream",
                      "metadata", "output_config")


class CountTokensRequest(RequestBody):
    """POST /v1/messages/count_tokens: what the prompt of a Messages request would hold."""

    MAX_ITEMS: ClassVar[dict[str, int]] = {"messages": MAX_MESSAGES, "tools": MAX_TOOLS}

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "mcp_servers": (None, []),
        "container": (None,),
        "compaction": (None,),  # asks for a summary instead of an answer
        "thread": (None,),  # server-held conversations: the earlier turns would be missing
    }
    # Anthropic's, accepted and ignored: caching, billing, routing and tracing settings, speed
    # modes; context_management clears old tool results of long conversations (here they are
    # kept whole). A count also takes the rest of a Messages request (the same body sent to
    # both routes): its prompt does not depend on them.
    IGNORED: ClassVar[frozenset[str]] = frozenset((
        "cache_control", "speed", "user_profile_id", "workspace_id", "service_tier",
        "inference_geo", "diagnostics", "billing_policy", "fallbacks", "fallback_credit_token",
        "context_management", *_GENERATION_FIELDS))

    model: str
    messages: list[AnthropicMessage]
    system: str | list[TextBlock] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    def to_spec(self, limits: Limits) -> GenerateSpec:
        """The request in neutral terms; ValueError naming the field."""
        template_kwargs = ({} if self.thinking is None
                           else self.thinking.template_kwargs(limits.thinks))
        messages = self.chat_messages()
        check_chat(messages, True, False, None)
        tools = self.custom_tools()
        template_tools = [_chat_tool(t) for t in tools] or None
        return GenerateSpec(
            input=ChatInput(messages=[m.to_template_dict() for m in messages],
                            tools=template_tools, template_kwargs=template_kwargs,
                            what="messages"),
            params=self.to_sampling_params(),
            tools=self.tool_use(tools),
            constraint=self.constraint_source(),
        )

    def constraint_source(self) -> tuple[str, StructuredOutputsParams] | None:
        return None

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(max_tokens=None)

    def chat_messages(self) -> list[ChatMessage]:
        if not self.messages:
            raise ValueError("messages: at least one message is required")
        out = []
        system = self.system_text()
        if system:
            out.append(ChatMessage(role="system", content=system))
        for i, message in enumerate(self.messages):
            out += _convert_message(message, f"messages.{i}")
        return out

    def system_text(self) -> str:
        if self.system is None or isinstance(self.system, str):
            return self.system or ""
        return "\n".join(block.text for block in self.system)

    def custom_tools(self) -> list[CustomTool]:
        tools = []
        for i, raw in enumerate(self.tools or []):
            kind = raw.get("type")
            if kind not in (None, "custom"):
                raise ValueError(f"tools.{i}.type: {short_repr(kind)} is not supported: this server offers "
                                 "custom tools (name, description, input_schema) only")
            tools.append(parse_part(CustomTool, raw, f"tools.{i}", dotted=True))
        return tools

    def tool_use(self, tools: list[CustomTool]) -> ToolUse | None:
        if not tools and self.tool_choice is None:
            return None
        choice: Literal["none", "auto", "required"] | None = None
        named, parallel = None, True
        if self.tool_choice is not None:
            tc = self.tool_choice
            if tc.type == "tool" and not tc.name:
                raise ValueError("tool_choice.name: required when tool_choice.type is 'tool'")
            named = tc.name if tc.type == "tool" else None
            choice = _TOOL_CHOICES.get(tc.type)
            parallel = not tc.disable_parallel_tool_use
        if choice == "auto" and not tools:
            choice = None  # Anthropic accepts auto without tools: it means no tools
        specs = [ToolSpec.of(t.name, t.input_schema) for t in tools]
        return ToolUse(specs, choice, named, parallel)


class OutputFormat(OpenAIBaseModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(OpenAIBaseModel):
    """``output_config``: ``format`` constrains the text to a JSON schema (enforced); ``effort``
    means nothing to a model that does not reason and is ignored."""

    format: OutputFormat | None = None
    effort: str | None = None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    IGNORED: ClassVar[frozenset[str]] = CountTokensRequest.IGNORED - set(_GENERATION_FIELDS)

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    metadata: dict[str, Any] | None = None
    output_config: OutputConfig | None = None

    def to_spec(self, limits: Limits) -> GenerateSpec:
        spec = super().to_spec(limits)
        budget = None if self.thinking is None else self.thinking.budget(self.max_tokens)
        return dataclasses.replace(spec, thinking_budget=budget)

    def constraint_source(self) -> tuple[str, StructuredOutputsParams] | None:
        fmt = self.output_config.format if self.output_config is not None else None
        if fmt is None:
            return None
        return "output_config.format", StructuredOutputsParams.json_schema(fmt.schema_)

    def to_sampling_params(self) -> SamplingParams:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be at least 1, got {self.max_tokens}")
        if self.temperature is not None and not 0.0 <= self.temperature <= 1.0:
            raise ValueError(f"temperature: must be in [0, 1], got {self.temperature}")
        if "" in (self.stop_sequences or ()):
            raise ValueError("stop_sequences: must be non-empty strings, got an empty one")
        fields: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p,
                                  "top_k": self.top_k,
                  "stop": self.stop_sequences}
        return SamplingParams(max_tokens=self.max_tokens,
                              **{k: v for k, v in fields.items() if v is not None})


_TOOL_CHOICES: dict[str, Literal["none", "auto", "required"]] = {
    "auto": "auto", "any": "required", "none": "none"}


def _convert_message(message: AnthropicMessage, where: str) -> list[ChatMessage]:
    """One Anthropic turn as chat messages: a user turn's tool results become tool messages
    (in order, around its text); an assistant turn's tool_use blocks become its tool calls,
    its thinking blocks its reasoning for the template (``ChatMessage.assistant``); a
    ``redacted_thinking`` block holds nothing readable and is left out."""
    if isinstance(message.content, str):
        return [ChatMessage(role=message.role, content=message.content)]
    out: list[ChatMessage] = []
    texts: list[str] = []
    calls: list[ToolCall] = []
    thoughts: list[str] = []
    for j, raw in enumerate(message.content):
        kind = raw.get("type") if isinstance(raw, dict) else None
        at = f"{where}.content.{j}"
        if kind == "text":
            texts.append(parse_part(TextBlock, raw, at, dotted=True).text)
        elif kind == "tool_use" and message.role == "assistant":
            use = parse_part(ToolUseBlock, raw, at, dotted=True)
            calls.append(ToolCall(id=use.id, function=FunctionCall(
                name=use.name, arguments=json.dumps(use.input, ensure_ascii=False))))
        elif kind == "thinking" and message.role == "assistant":
            thoughts.append(parse_part(ThinkingBlock, raw, at, dotted=True).thinking)
        elif kind == "redacted_thinking" and message.role == "assistant":
            continue  # encrypted by Anthropic: nothing here can read it
        elif kind == "tool_result" and message.role == "user":
            if texts:
                out.append(ChatMessage(role="user", content="".join(texts)))
                texts = []
            result = parse_part(ToolResultBlock, raw, at, dotted=True)
            out.append(ChatMessage(role="tool", tool_call_id=result.tool_use_id,
                                   content=result.text()))
        else:
            raise ValueError(f"{at}.type: {short_repr(kind)} blocks are not supported in {message.role} "
                             "messages; this server takes text, tool_use (assistant) and "
                             "tool_result (user) blocks")
    if message.role == "assistant":
        out.append(ChatMessage.assistant("".join(texts), calls or None, "\n".join(thoughts)))
    elif texts or not out:
        out.append(ChatMessage(role=message.role, content="".join(texts)))
    return out


def _chat_tool(tool: CustomTool) -> dict[str, Any]:
    function = FunctionDefinition(name=tool.name, description=tool.description,
                                  parameters=tool.input_schema)
    return ChatCompletionTool(function=function).model_dump(exclude_none=True)


# ==== the answer ==================================================================================


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingContent(BaseModel):
    """A thinking model's reasoning; no signature (nothing here checks one sent back)."""

    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""


class ToolUseContent(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class AnthropicUsage(BaseModel):
    input_tokens: int
    output_tokens: int


class AnthropicResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ThinkingContent | TextContent | ToolUseContent] = Field(default_factory=list)
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None = None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class TokenCount(BaseModel):
    input_tokens: int


def stop_reason_of(finish_reason: str | None, stop_reason: int | str | None,
                   has_calls: bool) -> tuple[str | None, str | None]:
    """(Anthropic's stop_reason, stop_sequence) for a finished choice."""
    if has_calls and finish_reason == "stop":
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "stop" and isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return ("end_turn", None) if finish_reason is not None else (None, None)


def event(event_type: str, **fields: Any) -> str:
    """One stream event as SSE: ``event:`` names it, ``data:`` holds it with its type."""
    body: dict[str, Any] = {"type": event_type}
    for key, value in fields.items():
        body[key] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return sse_event(json.dumps(body, ensure_ascii=False), event_type)
