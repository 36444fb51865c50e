"""OpenAI's Responses API (``POST /v1/responses``): the request, the response and stream events.

The request converts itself like chat does (``to_spec``): ``instructions`` and the ``input``
items become chat messages (``developer`` is ``system``; ``function_call`` items become an
assistant message's tool calls, ``function_call_output`` items tool messages), flat function
tools become chat tools, ``text.format`` the output constraint. The preparation pipeline then
renders, tokenizes and checks it like any chat request.

A ``reasoning`` item (a thinking model's earlier output, sent back whole) is the reasoning of
the assistant turn it opens (``ChatMessage.assistant``): the chat template decides whether it
is part of the prompt (Qwen3's keeps it for the tool calls after the last user message). Items of other kinds (images,
files, built-in tools, item references) and fields heron cannot honour (``background``,
``truncation: auto``...) are refused with a 400 naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, PrivateAttr, computed_field

from heron.sampling_params import INT64_MAX, SamplingParams, short_repr
from heron.server.inputs import ChatInput, GenerateSpec, Limits, ToolUse
from heron.server.protocol import (
    MAX_MESSAGES,
    MAX_TOOLS,
    REASONING_KEY,
    ChatCompletionTool,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    OpenAIBaseModel,
    RequestBody,
    ToolCall,
    check_chat,
    parse_part,
    reasoning_template_kwargs,
    sse_event,
)
from heron.structured.params import StructuredOutputsParams
from heron.structured.tools import ToolSpec, check_allowed

MIN_OUTPUT_TOKENS = 16  # OpenAI refuses a smaller max_output_tokens
_TEXT_PARTS = ("input_text", "output_text", "text")


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ==== the request =================================================================================


class FunctionTool(OpenAIBaseModel):
    """A function the model may call (flat: no ``function`` wrapper, unlike chat)."""

    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(OpenAIBaseModel):
    type: Literal["function"]
    name: str


class AllowedToolsChoice(OpenAIBaseModel):
    """``{"type": "allowed_tools", "mode", "tools": [{"type": "function", "name"}, ...]}``:
    calls may name only the listed functions (mode auto: or answer in text; required: call
    one); the template still shows every tool."""

    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]

    def names(self) -> tuple[str, ...]:
        """The functions listed; ValueError naming an entry that is no function tool."""
        names = []
        for i, raw in enumerate(self.tools):
            kind = raw.get("type")
            if kind != "function":
                raise ValueError(f"tool_choice.tools[{i}].type {short_repr(kind)} is not "
                                 "supported: this server offers function tools only")
            names.append(parse_part(NamedFunctionChoice, raw, f"tool_choice.tools[{i}]").name)
        return tuple(names)


class TextFormat(OpenAIBaseModel):
    """``text.format``: plain text, any JSON object, or a named JSON schema (enforced)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None

    def to_constraint(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams.json_object()
        if self.schema_ is None:
            raise ValueError("text.format: type json_schema needs a schema")
        return StructuredOutputsParams.json_schema(self.schema_)


class TextConfig(OpenAIBaseModel):
    format: TextFormat | None = None
    verbosity: str | None = None


class _InputMessage(OpenAIBaseModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]


class _ReasoningItem(OpenAIBaseModel):
    """A reasoning item sent back: its ``content`` texts (``reasoning_text``), else its
    ``summary`` texts (OpenAI's models send summaries only)."""

    type: Literal["reasoning"]
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None

    def text(self) -> str:
        parts = self.content or self.summary
        return "\n".join(p["text"] for p in parts if isinstance(p.get("text"), str))


class _FunctionCallItem(OpenAIBaseModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class _FunctionCallOutputItem(OpenAIBaseModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[dict[str, Any]]


class ResponsesRequest(RequestBody):
    """POST /v1/responses."""

    MAX_ITEMS: ClassVar[dict[str, int]] = {"input": MAX_MESSAGES, "tools": MAX_TOOLS}

    # Fields whose non-default values heron cannot honour: a 400.
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "background": (None, False),
        "background_options": (None,),
        "conversation": (None,),
        "prompt": (None,),
        "truncation": (None, "disabled"),
        "top_logprobs": (None, 0),
        "moderation": (None,),
    }
    # OpenAI's, accepted and ignored: billing, caching, tracing; max_tool_calls counts calls
    # of built-in tools (none here); context_management compacts long conversations (here they
    # are kept whole); image and access_programs set options of tools heron does not offer.
    IGNORED: ClassVar[frozenset[str]] = frozenset((
        "metadata", "user", "service_tier", "prompt_cache_key", "prompt_cache_retention",
        "prompt_cache_options", "safety_identifier", "stream_options", "max_tool_calls",
        "context_management", "image", "access_programs"))

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: (Literal["none", "auto", "required"] | NamedFunctionChoice | AllowedToolsChoice
                  | None) = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = True
    previous_response_id: str | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    max_tool_calls: int | None = None
    stream_options: dict[str, Any] | None = None
    # Sampling knobs outside OpenAI's Responses API that chat takes (vLLM's Responses route
    # takes them too): honoured as there, not ignored.
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None

    # The turns of ``previous_response_id``, resolved by the endpoint before preparation.
    _history: list[ChatMessage] = PrivateAttr(default_factory=list)

    # ---- checks and conversion ------------------------------------------------------------

    def set_history(self, history: list[ChatMessage]) -> None:
        self._history = list(history)

    def to_spec(self, limits: Limits) -> GenerateSpec:
        """The request in neutral terms (after the history of ``previous_response_id``);
        ValueError naming the field."""
        self._check_fields()
        messages = self.chat_messages(self._history)
        if not messages:
            raise ValueError("input: at least one item is required")
        check_chat(messages, True, False, None)
        tools = self.function_tools()
        return GenerateSpec(
            input=ChatInput(
                messages=[m.to_template_dict() for m in messages],
                tools=[_chat_tool(t) for t in tools] or None,
                template_kwargs=self.reasoning_kwargs(),
                what="input",
            ),
            params=self.to_sampling_params(),
            tools=self.tool_use(tools),
            constraint=self.constraint_source(),
            max_tokens_field="max_output_tokens",
        )

    def _check_fields(self) -> None:
        limit = self.max_output_tokens
        if limit is not None and limit < MIN_OUTPUT_TOKENS:
            raise ValueError(f"max_output_tokens: integer below minimum value. Expected a value "
                             f">= {MIN_OUTPUT_TOKENS}, but got {short_repr(limit)} instead.")
        if limit is not None and limit > INT64_MAX:
            raise ValueError(f"max_output_tokens must be a 64-bit integer, got {short_repr(limit)}")
        self.reasoning_kwargs()  # a value that is no effort: ValueError
        unknown = sorted(set(self.include or []) - {"reasoning.encrypted_content"})
        if unknown:
            raise ValueError(f"include: {short_repr(unknown[0])} is not supported by this server")

    def reasoning_kwargs(self) -> dict[str, Any]:
        """``reasoning.effort`` for the chat template (as chat's ``reasoning_effort``);
        ``summary`` is accepted and gives none (a thinking model's reasoning item holds its
        text whole, with an empty summary)."""
        effort = (self.reasoning or {}).get("effort")
        return reasoning_template_kwargs(effort, "reasoning.effort", None)

    def to_sampling_params(self) -> SamplingParams:
        fields: dict[str, Any] = {
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "stop": self.stop, "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "repetition_penalty": self.repetition_penalty, "top_k": self.top_k,
            "min_p": self.min_p}
        return SamplingParams(max_tokens=self.max_output_tokens,
                              **{k: v for k, v in fields.items() if v is not None})

    def chat_messages(self, history: list[ChatMessage]) -> list[ChatMessage]:
        """``instructions`` (a system message), the earlier turns, then this request's input."""
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        return messages + history + self.input_messages()

    def input_messages(self) -> list[ChatMessage]:
        """This request's ``input`` as chat messages; ValueError naming the bad item."""
        if isinstance(self.input, str):
            return [ChatMessage(role="user", content=self.input)]
        messages: list[ChatMessage] = []
        for i, item in enumerate(self.input):
            _append_item(messages, item, f"input[{i}]")
        return messages

    def function_tools(self) -> list[FunctionTool]:
        tools = []
        for i, raw in enumerate(self.tools or []):
            kind = raw.get("type")
            if kind != "function":
                raise ValueError(f"tools[{i}].type {short_repr(kind)} is not supported: this server "
                                 "offers function tools only")
            tools.append(parse_part(FunctionTool, raw, f"tools[{i}]"))
        return tools

    def tool_use(self, tools: list[FunctionTool]) -> ToolUse | None:
        if not tools and self.tool_choice is None:
            return None
        specs = [ToolSpec.of(t.name, t.parameters) for t in tools]
        parallel = self.parallel_tool_calls is not False
        choice = self.tool_choice
        if isinstance(choice, NamedFunctionChoice):
            return ToolUse(specs, None, choice.name, parallel)
        if isinstance(choice, AllowedToolsChoice):
            allowed = choice.names()
            check_allowed([t.name for t in tools], allowed, "tool_choice.tools")
            return ToolUse(specs, choice.mode, None, parallel, allowed)
        return ToolUse(specs, choice, None, parallel)

    def constraint_source(self) -> tuple[str, StructuredOutputsParams] | None:
        fmt = self.text.format if self.text is not None else None
        constraint = fmt.to_constraint() if fmt is not None else None
        return ("text.format", constraint) if constraint is not None else None


def _append_item(messages: list[ChatMessage], raw: dict[str, Any], where: str) -> None:
    """One input item as chat messages: consecutive function calls share an assistant turn."""
    kind = raw.get("type", "message")
    last = messages[-1] if messages else None
    if kind == "message":
        item = parse_part(_InputMessage, raw, where)
        text = _text_of(item.content, f"{where}.content")
        if item.role == "assistant" and last is not None and _thought_only(last):
            last.content = text
        else:
            messages.append(ChatMessage(role=item.role, content=text))
    elif kind == "function_call":
        call = parse_part(_FunctionCallItem, raw, where)
        tool_call = ToolCall(id=call.call_id, function=FunctionCall(name=call.name,
                                                                    arguments=call.arguments))
        if last is not None and last.role == "assistant" and (last.tool_calls is not None
                                                              or _thought_only(last)):
            last.tool_calls = [*(last.tool_calls or []), tool_call]
        else:
            messages.append(ChatMessage(role="assistant", content="", tool_calls=[tool_call]))
    elif kind == "reasoning":
        reasoning = parse_part(_ReasoningItem, raw, where).text()
        if reasoning:  # the assistant turn it opens; its message or calls follow
            messages.append(ChatMessage.assistant("", reasoning=reasoning))
    elif kind == "function_call_output":
        out = parse_part(_FunctionCallOutputItem, raw, where)
        messages.append(ChatMessage(role="tool", tool_call_id=out.call_id,
                                    content=_text_of(out.output, f"{where}.output")))
    else:
        raise ValueError(f"{where}.type {short_repr(kind)} is not supported: this server takes message, "
                         "function_call, function_call_output and reasoning items")


def _thought_only(message: ChatMessage) -> bool:
    """An assistant turn opened by a reasoning item, with no text or calls yet."""
    return (message.role == "assistant" and not message.content and message.tool_calls is None
            and REASONING_KEY in (message.model_extra or {}))


def _text_of(content: str | list[dict[str, Any]], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}[{j}]: content parts of type {short_repr(kind)} are not supported; "
                             "this server takes text only")
        texts.append(part["text"])
    return "".join(texts)


def _chat_tool(tool: FunctionTool) -> dict[str, Any]:
    """A Responses function tool as chat templates see tools."""
    function = FunctionDefinition(name=tool.name, description=tool.description,
                                  parameters=tool.parameters)
    return ChatCompletionTool(function=function).model_dump(exclude_none=True)


# ==== the response ================================================================================


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class FunctionCallOutput(BaseModel):
    """A call the model made (``function_call`` item); its result comes back as input."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningOutput(BaseModel):
    """A thinking model's reasoning (``reasoning`` item, before the message): its text whole,
    no summary."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = ReasoningOutput | OutputMessage | FunctionCallOutput


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseObject(BaseModel):
    """A response, as returned, streamed (in events) and stored."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "in_progress"
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def start(cls, response_id: str, model: str, request: ResponsesRequest) -> ResponseObject:
        """The in-progress response that echoes the request's settings."""
        text = request.text.model_dump(by_alias=True, exclude_none=True) if request.text else None
        choice = request.tool_choice
        return cls(
            id=response_id, model=model, instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            previous_response_id=request.previous_response_id, store=request.store is not False,
            temperature=request.temperature, top_p=request.top_p,
            text=text or {"format": {"type": "text"}},
            tool_choice=choice.model_dump() if isinstance(choice, BaseModel) else choice or "auto",
            tools=list(request.tools or []), user=request.user, metadata=request.metadata or {})

    @computed_field  # type: ignore[prop-decorator]
    @property
    def output_text(self) -> str:
        """The text of every message item, joined (the SDKs' convenience, also in the JSON)."""
        return "".join(part.text for item in self.output if isinstance(item, OutputMessage)
                       for part in item.content)


def output_as_messages(output: list[OutputItem]) -> list[ChatMessage]:
    """A response's output as the chat turn it adds to a conversation (its reasoning
    included, as a reasoning item sent back in ``input`` is)."""
    text = "".join(p.text for item in output if isinstance(item, OutputMessage) for p in item.content)
    calls = [ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
             for item in output if isinstance(item, FunctionCallOutput)]
    reasoning = "\n".join(p.text for item in output if isinstance(item, ReasoningOutput)
                          for p in item.content)
    return [ChatMessage.assistant(text, calls or None, reasoning)]


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


def event_json(event_type: str, sequence_number: int, **fields: Any) -> str:
    """One stream event as SSE: ``event:`` names it, ``data:`` holds it with its type."""
    body = {"type": event_type, "sequence_number": sequence_number}
    for key, value in fields.items():
        body[key] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return sse_event(json.dumps(body, ensure_ascii=False), event_type)
