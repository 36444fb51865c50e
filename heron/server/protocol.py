"""The OpenAI wire format: pydantic request/response models in OpenAI's field order.

Requests convert themselves: ``to_spec`` gives the request in neutral terms (the input to
render or tokenize, ``SamplingParams``, tools, output constraint; ``heron.server.inputs``)
for the preparation pipeline (``heron.server.pipeline``). Fields marked "vLLM extra" are not OpenAI's
but follow vLLM's names and meanings. Unknown fields are accepted (OpenAI clients send many)
and sorted by the server: fields of the API that mean nothing here (``store``,
``service_tier``...) are ``IGNORED`` and logged once; fields that ask for something heron
cannot do (legacy ``functions``, audio...) are refused by ``unsupported_fields()`` with a 400;
fields the API does not have are refused by ``unknown_fields()`` with a 400, as OpenAI does.
None is silently dropped.

Errors are values: ``ErrorResponse`` carries its HTTP status and renders as
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Collection, Iterable, Sequence
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from heron.sampling_params import SamplingParams, short_repr
from heron.server.guards import lone_surrogate_path
from heron.server.inputs import (
    ChatInput,
    GenerateSpec,
    Limits,
    TextInput,
    ThinkingBudget,
    ToolUse,
)
from heron.structured.params import StructuredOutputsParams
from heron.structured.tools import ToolSpec, check_allowed

BaseModelT = TypeVar("BaseModelT", bound=BaseModel)

# ==== errors ======================================================================================


def _error_type(status: int) -> str:
    """OpenAI's convention: every client error is an invalid_request_error."""
    return "server_error" if status >= 500 else "invalid_request_error"


# Line breaks for Python's str.splitlines beyond SSE's CR and LF that a JSON encoder leaves raw
# inside strings (control characters below 0x20 it escapes already).
_RAW_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_event(json_text: str, event: str | None = None) -> str:
    """One server-sent event whose data is ``json_text``, with NEL, LINE SEPARATOR and
    PARAGRAPH SEPARATOR written as JSON escapes (the same string once parsed): a client that
    splits the stream into lines as ``str.splitlines`` does (httpx's ``aiter_lines``, and the
    clients built on it) cut an event holding one of them in two, and failed to parse it."""
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {json_text.translate(_RAW_LINE_BREAKS)}\n\n"


def ndjson_line(json_text: str) -> str:
    """One line of a newline-delimited JSON stream (Ollama's), with the line breaks
    ``str.splitlines`` knows written as JSON escapes (see ``sse_event``)."""
    return json_text.translate(_RAW_LINE_BREAKS) + "\n"


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body; ``status_code`` is the HTTP status (not part of the JSON)."""

    error: ErrorInfo
    status_code: int = Field(default=400, exclude=True)


def make_error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> ErrorResponse:
    return ErrorResponse(
        error=ErrorInfo(message=message, type=_error_type(status), param=param, code=code),
        status_code=status,
    )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return make_error(400, message, param=param, code=code)


_PATH_HEAD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\[[0-9]+\]|\.[A-Za-z0-9_]+)*")


def param_of(message: str, fields: Collection[str] | None = None) -> str | None:
    """The field a message starts with: 'temperature must be in [0, 2], got 3' ->
    'temperature', 'input[2].call_id: Field required' -> 'input[2].call_id'. With ``fields``
    (the request's top-level names), a head whose first name is not one of them is no field."""
    match = _PATH_HEAD.match(message)
    if match is None or message[match.end():match.end() + 1] not in ("", " ", ":"):
        return None
    path = match.group(0)
    root = re.split(r"[.\[]", path, maxsplit=1)[0]
    return path if fields is None or root in fields else None


# Type names pydantic puts into an error's location for the member of a union that failed
# ('str', 'list[ContentPart]', 'function-after[...]', a model's class name): no field names.
_BUILTIN_LABELS = frozenset(("str", "int", "float", "bool", "list", "dict", "none", "body"))


def _is_type_label(part: str) -> bool:
    return (part in _BUILTIN_LABELS or "[" in part or "-" in part
            or (part[:1].isupper() and part in _model_names()))


@functools.cache
def _model_names() -> frozenset[str]:
    names: set[str] = set()
    stack: list[type] = [BaseModel]
    while stack:
        cls = stack.pop()
        names.add(cls.__name__)
        stack.extend(cls.__subclasses__())
    return frozenset(names)


def loc_path(loc: Iterable[object], dotted: bool = False) -> str:
    """An error location as a field path: ('body', 'messages', 2, 'list[Part]', 0, 'text') ->
    'messages[2][0].text' (OpenAI's spelling), or 'messages.2.0.text' with ``dotted``
    (Anthropic's); type labels of union members are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not dotted:
            out += f"[{part}]"
        elif isinstance(part, int) or not _is_type_label(str(part)):
            out += f".{part}" if out else str(part)
    return out


def telling_error(errors: Sequence[Any], dotted: bool = False) -> tuple[str, str]:
    """(field path, message) of the most telling of pydantic's errors: the deepest one, since
    a union reports each member's failure and the member the input meant goes deepest; the
    members' messages at that place joined ('Input should be a valid string or a valid
    list'). Our own validators' messages win over type mismatches."""
    own = [e for e in errors if e.get("type") == "value_error"]
    pool = own or list(errors)
    located = [(loc_path(e.get("loc", ()), dotted), e) for e in pool]
    depth = max(_depth(path) for path, _ in located)
    path = next(p for p, _ in located if _depth(p) == depth)
    messages = list(dict.fromkeys(_message(e) for p, e in located if p == path))
    return path, _join_alternatives(messages)


def _depth(path: str) -> int:
    return path.count(".") + path.count("[") + (1 if path else 0)


def _message(error: Any) -> str:
    text = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return re.sub(r" or instance of \w+", "", text)


def _join_alternatives(messages: list[str]) -> str:
    head = "Input should be "
    if len(messages) > 1 and all(m.startswith(head) for m in messages):
        return head + " or ".join(m.removeprefix(head) for m in messages)
    return messages[0]


def parse_part(model: type[BaseModelT], raw: Any, where: str, dotted: bool = False) -> BaseModelT:
    """Validate one part of a request (an input item, a content block) as ``model``; a bad
    part is a ValueError naming where it is: ``input[2].call_id: Field required``."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        path, message = telling_error(e.errors(), dotted)
        if path and not path.startswith("["):
            path = "." + path
        raise ValueError(f"{where}{path}: {message}") from None


# OpenAI's effort levels (its SDK's ReasoningEffort; Codex CLI sends xhigh).
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def reasoning_template_kwargs(effort: Any, param: str,
                              explicit: dict[str, Any] | None) -> dict[str, Any]:
    """What a reasoning effort tells the chat template, as vLLM passes it: ``reasoning_effort``
    (templates that take it, as gpt-oss's) and ``enable_thinking`` (Qwen3's switch: off for
    none and minimal); keys the request's ``chat_template_kwargs`` set win. A template that
    takes neither ignores them (a model that does not reason). ValueError naming ``param`` for
    a value that is no effort."""
    if effort is None:
        return {}
    if effort not in REASONING_EFFORTS:
        raise ValueError(f"{param}: {short_repr(effort)} is not one of "
                         f"{', '.join(REASONING_EFFORTS)}")
    kwargs = {"reasoning_effort": effort, "enable_thinking": effort not in ("none", "minimal")}
    return {k: v for k, v in kwargs.items() if k not in (explicit or {})}


# ==== shared request parts ========================================================================


class OpenAIBaseModel(BaseModel):
    """Fields the model does not declare are kept (``model_extra``): inside a message they
    reach the chat template; at the top of a request body the server sorts them
    (``unknown_fields``, ``unsupported_fields``, ``ignored_fields``).

    Types are strict, as OpenAI's are: ``"4"`` or ``true`` is no integer, ``"yes"`` no bool.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    # Fields clients may send whose non-default values heron cannot honour: a 400.
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {}
    # Fields of the API that mean nothing here (billing, caching hints, tracing ids...):
    # accepted (typed where the model declares them) and logged once.
    IGNORED: ClassVar[frozenset[str]] = frozenset()

    def ignored_fields(self) -> list[str]:
        """The IGNORED fields this request sets."""
        extra = self.model_extra or {}
        return sorted(k for k in self.IGNORED if k in extra or getattr(self, k, None) is not None)

    def unknown_fields(self) -> list[str]:
        """Fields the API does not have (a typo, another server's knob): OpenAI refuses
        them, and so does heron, rather than answer as if they were not there."""
        known = self.UNSUPPORTED.keys() | self.IGNORED
        return sorted(k for k in (self.model_extra or {}) if k not in known)

    def unsupported_fields(self) -> list[str]:
        """Extra fields set to something other than a harmless value (None, [], "none"...)."""
        extra = self.model_extra or {}
        return sorted(
            k for k, harmless in self.UNSUPPORTED.items() if k in extra and extra[k] not in harmless
        )


FIELD_ERROR = "heron_field_error"  # a validation error that names its field in ctx["param"]


def field_error(param: str, message: str) -> PydanticCustomError:
    """A validation error for ``param`` raised from a model-level validator (pydantic would
    otherwise place it at the body, naming no field)."""
    return PydanticCustomError(FIELD_ERROR, "{param}: {message}",
                               {"param": param, "message": message})


def array_too_long(param: str, limit: int, length: int) -> PydanticCustomError:
    """OpenAI's 400 for a list past its limit (``array_above_max_length``)."""
    return PydanticCustomError(
        FIELD_ERROR, "Invalid '{param}': array too long. Expected an array with maximum length "
        "{limit}, but got an array with length {length} instead.",
        {"param": param, "limit": limit, "length": length, "code": "array_above_max_length"})


# Lists a request may hold, checked before anything walks the body. Every item costs CPU in
# the API process (validation, conversion, the chat template) before the context check can
# refuse the prompt: 100,000 messages, ~3.4 MB of JSON, cost seconds of it. No chat that fits a
# context comes near these; OpenAI refuses more than 128 tools.
MAX_MESSAGES = 16_384  # messages (the Responses API: input items)
MAX_TOOLS = 1024


class RequestBody(OpenAIBaseModel):
    """A whole request body: every string and key in it must be valid Unicode, the mappings
    named in ``MAX_ENTRIES`` hold at most that many entries, and the lists named in
    ``MAX_ITEMS`` at most that many items.

    JSON can spell a lone UTF-16 surrogate (``"\\ud800"``); Python keeps it in a str that no
    tokenizer, log line or UTF-8 response can take. Such a body is a 400 naming the field.
    Sizes are checked first, before anything walks the body.
    """

    MAX_ENTRIES: ClassVar[dict[str, int]] = {}
    MAX_ITEMS: ClassVar[dict[str, int]] = {}

    @model_validator(mode="before")
    @classmethod
    def _unicode_only(cls, data: Any) -> Any:
        for name, limit in cls.MAX_ENTRIES.items():
            value = data.get(name) if isinstance(data, dict) else None
            if isinstance(value, dict) and len(value) > limit:
                raise field_error(name, f"at most {limit} entries are allowed, got {len(value)}")
        for name, limit in cls.MAX_ITEMS.items():
            value = data.get(name) if isinstance(data, dict) else None
            if isinstance(value, list) and len(value) > limit:
                raise array_too_long(name, limit, len(value))
        path = lone_surrogate_path(data)
        if path is not None:
            raise field_error(path, "the text holds a lone UTF-16 surrogate (such as \\ud800), "
                                    "which is not valid Unicode")
        return data


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM extra: usage on every chunk


class JsonSchemaFormat(OpenAIBaseModel):
    """``response_format.json_schema``: OpenAI's named schema (always enforced, strict or not)."""

    model_config = ConfigDict(populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def to_constraint(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams.json_object()
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise ValueError("type json_schema needs json_schema.schema")
        return StructuredOutputsParams.json_schema(self.json_schema.schema_)


class StructuredOutputsRequest(BaseModel):
    """vLLM extra ``structured_outputs``: exactly one of json, regex, choice, grammar, json_object."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def to_constraint(self) -> StructuredOutputsParams:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, "json_" if name == "json" else name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("set exactly one of json, regex, choice, grammar, json_object; got "
                             f"{', '.join(given) or 'none'}")
        if self.json_ is not None:
            return StructuredOutputsParams.json_schema(self.json_)
        if self.regex is not None:
            return StructuredOutputsParams.regex(self.regex)
        if self.choice is not None:
            return StructuredOutputsParams.choice(self.choice)
        if self.grammar is not None:
            return StructuredOutputsParams.grammar(self.grammar)
        return StructuredOutputsParams.json_object()


# logit_bias entries a request may hold. OpenAI documents no limit but refuses more than 300;
# each entry costs the API process's event loop ~6 us to validate and convert (200,000 held
# every stream on the server up ~1.3 s there, ~2.9 s in all). Banning many tokens is a job for
# structured outputs (a regex, a grammar).
MAX_LOGIT_BIAS = 1024

# vLLM extras heron does not implement, with the values that ask for nothing: any other value
# is a 400 (a vLLM client that sends one expects it to change the output).
VLLM_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "prompt_logprobs": (None,),
    "truncate_prompt_tokens": (None,),
    "logits_processors": (None, []),
    "return_tokens_as_token_ids": (None, False),
    "structural_tag": (None,),
    "guided_whitespace_pattern": (None,),
}


class SamplingFields(RequestBody):
    """The sampling knobs chat and completions share (OpenAI's, then vLLM's extras)."""

    MAX_ENTRIES: ClassVar[dict[str, int]] = {"logit_bias": MAX_LOGIT_BIAS}

    model: str | None = None
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int | None = 1
    presence_penalty: float | None = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = 0
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    # Structured output: OpenAI's response_format; vLLM's structured_outputs and its older
    # guided_* spellings. At most one of them per request.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def output_constraint(self) -> StructuredOutputsParams | None:
        """The one output constraint the request asks for (ValueError naming the field when it
        asks for two, or a malformed one), or None."""
        source = self.constraint_source()
        return source[1] if source else None

    def constraint_source(self) -> tuple[str, StructuredOutputsParams] | None:
        """(the field that set it, the constraint); see ``output_constraint``."""
        found: list[tuple[str, StructuredOutputsParams]] = []
        candidates: list[tuple[str, Any, Any]] = [
            ("response_format", self.response_format, lambda v: v.to_constraint()),
            ("structured_outputs", self.structured_outputs, lambda v: v.to_constraint()),
            ("guided_json", self.guided_json, StructuredOutputsParams.json_schema),
            ("guided_regex", self.guided_regex, StructuredOutputsParams.regex),
            ("guided_choice", self.guided_choice, StructuredOutputsParams.choice),
            ("guided_grammar", self.guided_grammar, StructuredOutputsParams.grammar),
        ]
        for name, value, convert in candidates:
            if value is None:
                continue
            try:
                constraint = convert(value)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            if constraint is not None:
                found.append((name, constraint))
        if len(found) > 1:
            raise ValueError(f"{found[1][0]} cannot be combined with {found[0][0]}: "
                             "a request takes one output constraint")
        return found[0] if found else None

    def _sampling_kwargs(self) -> dict[str, Any]:
        """Only the fields the caller set; SamplingParams' defaults fill the rest."""
        fields = {
            "n": self.n,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.seed,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "logit_bias": self.logit_bias,
        }
        return {k: v for k, v in fields.items() if v is not None}

    def check_limits(self, max_n: int, max_logprobs: int, vocab_size: int) -> None:
        """Server caps and vocabulary bounds; ValueError naming the field."""
        if self.n is not None and not 1 <= self.n <= max_n:
            raise ValueError(f"n must be an integer in [1, {max_n}], got {short_repr(self.n)}")
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 64):
            raise ValueError(f"seed must fit in 64 bits, got {short_repr(self.seed)}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        bad_key = next((k for k in self.logit_bias or {} if not _TOKEN_ID_KEY.fullmatch(k)), None)
        if bad_key is not None:
            raise ValueError("logit_bias keys must be token ids in plain decimal digits, "
                             f"got {short_repr(bad_key)}")
        for name, ids in (
            ("logit_bias", [int(k) for k in self.logit_bias or {}]),
            ("stop_token_ids", self.stop_token_ids or []),
        ):
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise ValueError(
                    f"{name} names token id {bad}, outside the vocabulary [0, {vocab_size - 1}]"
                )


_TOKEN_ID_KEY = re.compile(r"[0-9]{1,19}")  # ASCII digits only: no sign, blanks, "_" or "١"


# ==== chat completions ============================================================================

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# The key of an assistant message's earlier reasoning in the dict a chat template sees: the one
# thinking templates read (Qwen3's renders it for the turns after the last user message, the
# tool calls in progress, as Anthropic and Ollama keep the thinking of those turns).
REASONING_KEY = "reasoning_content"
# Template arguments the server sets itself; chat_template_kwargs may not override them.
RESERVED_TEMPLATE_KWARGS = (
    "messages",
    "conversation",
    "tools",
    "documents",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "return_dict",
    "return_tensors",
    "return_assistant_tokens_mask",
    "padding",
    "truncation",
    "max_length",
)
TEXT_PART_TYPES = ("text", "input_text")


class ContentPart(OpenAIBaseModel):
    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value not in TEXT_PART_TYPES:
            raise ValueError(
                f"content parts of type {short_repr(value)} are not supported; this server takes "
                "text only"
            )
        return value


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends and returns it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages

    @field_validator("role")
    @classmethod
    def _known_role(cls, value: str) -> str:
        if value not in CHAT_ROLES:
            raise ValueError(
                f"unknown role {short_repr(value)}; use one of {', '.join(CHAT_ROLES)}"
            )
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)

    @classmethod
    def assistant(cls, content: str, tool_calls: list[ToolCall] | None = None,
                  reasoning: str = "") -> ChatMessage:
        """An assistant turn; ``reasoning``, its thinking sent back (a Responses reasoning
        item, Anthropic thinking blocks, Ollama's ``thinking``), reaches the chat template
        under ``REASONING_KEY``, as chat's ``reasoning_content`` does."""
        extra = {REASONING_KEY: reasoning} if reasoning else {}
        return cls(role="assistant", content=content, tool_calls=tool_calls, **extra)

    def to_template_dict(self) -> dict[str, Any]:
        """The dict a chat template sees: text content; 'developer' is a system message."""
        out: dict[str, Any] = dict(self.model_extra or {})
        out["role"] = "system" if self.role == "developer" else self.role
        out["content"] = self.text()
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls is not None:
            out["tool_calls"] = [_template_tool_call(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def check_chat(messages: list[ChatMessage], add_generation_prompt: bool,
               continue_final_message: bool, template_kwargs: dict[str, Any] | None) -> None:
    """ValueError naming the field when a conversation cannot be rendered as asked."""
    if not messages:
        raise ValueError("messages must hold at least one message")
    for i, msg in enumerate(messages):
        if msg.content is None and msg.role != "assistant":
            raise ValueError(f"messages[{i}].content is required for role {msg.role!r}")
    reserved = sorted(set(template_kwargs or {}) & set(RESERVED_TEMPLATE_KWARGS))
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)}")
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt set to false")
        if messages[-1].role != "assistant":
            raise ValueError(
                "continue_final_message needs the last message to be an assistant message"
            )


def _template_tool_call(call: ToolCall) -> dict[str, Any]:
    """A call as templates expect it: arguments as a mapping when they are a JSON object."""
    try:
        arguments: Any = json.loads(call.function.arguments)
    except (ValueError, RecursionError):  # no JSON, or JSON Python cannot read: the text
        arguments = call.function.arguments
    if not isinstance(arguments, dict):
        arguments = call.function.arguments
    return {"id": call.id, "type": call.type,
            "function": {"name": call.function.name, "arguments": arguments}}


class FunctionDefinition(OpenAIBaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatCompletionTool(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class AllowedFunction(OpenAIBaseModel):
    """An entry of chat's allowed tools: ``{"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: NamedFunction


class AllowedTools(OpenAIBaseModel):
    mode: Literal["auto", "required"]
    tools: list[AllowedFunction]


class AllowedToolsChoice(OpenAIBaseModel):
    """``{"type": "allowed_tools", "allowed_tools": {"mode", "tools"}}``: calls may name only
    the listed functions (mode auto: or answer in text; required: call one); the template still
    shows every tool."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "functions": (None, []),
        "function_call": (None, "none", "auto"),
        "audio": (None,),
        "modalities": (None, ["text"]),
        **VLLM_UNSUPPORTED,
        "echo": (None, False),
        "chat_template": (None,),
        "documents": (None, []),
        "web_search_options": (None,),
        "moderation": (None,),
    }
    IGNORED: ClassVar[frozenset[str]] = frozenset((
        "store", "metadata", "service_tier", "prediction", "verbosity", "prompt_cache_key",
        "prompt_cache_retention", "prompt_cache_options", "safety_identifier", "user"))

    MAX_ITEMS: ClassVar[dict[str, int]] = {"messages": MAX_MESSAGES, "tools": MAX_TOOLS}

    messages: list[ChatMessage]
    tools: list[ChatCompletionTool] | None = None
    tool_choice: (Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice
                  | None) = None
    parallel_tool_calls: bool | None = True
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    reasoning_effort: str | None = None  # to the chat template (reasoning_template_kwargs)
    # OpenAI's, accepted and ignored (IGNORED): billing, caching, tracing, style hints.
    # Predicted outputs only speed OpenAI up: the output is the same without them.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prediction: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    # vLLM extras
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_token_budget: int | None = None  # at most this many reasoning tokens; -1: unbounded

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens``, or the older ``max_tokens``; OpenAI refuses both at once."""
        if self.max_completion_tokens is not None and self.max_tokens is not None:
            raise ValueError("max_tokens: setting 'max_tokens' and 'max_completion_tokens' at the "
                             "same time is not supported")
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def to_spec(self, limits: Limits) -> GenerateSpec:
        """The request in neutral terms; ValueError naming the field when a value is wrong."""
        self.check_messages()
        self.check_limits(limits.max_n, limits.max_logprobs, limits.vocab_size)
        return GenerateSpec(
            input=self.chat_input(),
            params=self.to_sampling_params(self.requested_max_tokens(), limits.max_logprobs),
            tools=self.tool_use(),
            constraint=self.constraint_source(),
            thinking_budget=self.thinking_budget(),
        )

    def thinking_budget(self) -> ThinkingBudget | None:
        """vLLM's ``thinking_token_budget``: a non-negative number of tokens, or -1 (none)."""
        budget = self.thinking_token_budget
        if budget is None or budget == -1:
            return None
        if budget < 0:
            raise ValueError(f"thinking_token_budget: must be a non-negative integer or -1 for "
                             f"unlimited, got {short_repr(budget)}")
        return ThinkingBudget(budget, "thinking_token_budget")

    def check_messages(self) -> None:
        check_chat(self.messages, bool(self.add_generation_prompt),
                   bool(self.continue_final_message), self.chat_template_kwargs)

    def chat_input(self) -> ChatInput:
        return ChatInput(
            messages=[m.to_template_dict() for m in self.messages],
            tools=self.template_tools(),
            add_generation_prompt=bool(self.add_generation_prompt),
            continue_final_message=bool(self.continue_final_message),
            template_kwargs={**reasoning_template_kwargs(
                self.reasoning_effort, "reasoning_effort", self.chat_template_kwargs),
                **(self.chat_template_kwargs or {})},
        )

    def tool_specs(self) -> list[ToolSpec]:
        return [ToolSpec.of(t.function.name, t.function.parameters) for t in self.tools or []]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template sees them (None when there are none)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def tool_use(self) -> ToolUse | None:
        """The tools and tool_choice (None without tools or tool_choice)."""
        if not self.tools and self.tool_choice is None:
            return None
        parallel = self.parallel_tool_calls is not False
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return ToolUse(self.tool_specs(), None, choice.function.name, parallel)
        if isinstance(choice, AllowedToolsChoice):
            allowed = tuple(t.function.name for t in choice.allowed_tools.tools)
            check_allowed([t.function.name for t in self.tools or []], allowed,
                          "tool_choice.allowed_tools.tools", ".function.name")
            return ToolUse(self.tool_specs(), choice.allowed_tools.mode, None, parallel, allowed)
        return ToolUse(self.tool_specs(), choice, None, parallel)

    def to_sampling_params(
        self,
        max_tokens: int | None,
        max_logprobs: int,
        structured_outputs: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        """ValueError (naming the field) when a value is out of range. ``structured_outputs``:
        the constraint of the tool plan (``heron.server.pipeline``)."""
        top = self.top_logprobs
        if top is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if top is not None and not 0 <= top <= max_logprobs:
            raise ValueError(f"top_logprobs must be an integer in [0, {max_logprobs}], got {top}")
        logprobs = (top or 0) if self.logprobs else None
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs,
                              structured_outputs=structured_outputs, **self._sampling_kwargs())


# ==== completions =================================================================================

PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "suffix": (None, ""), "best_of": (None, 1), **VLLM_UNSUPPORTED}
    IGNORED: ClassVar[frozenset[str]] = frozenset(("user",))

    prompt: PromptInput
    echo: bool | None = False
    logprobs: int | None = None
    # vLLM extra
    add_special_tokens: bool | None = True

    def to_spec(self, limits: Limits) -> GenerateSpec:
        """The request in neutral terms; ValueError naming the field when a value is wrong."""
        self.check_limits(limits.max_n, limits.max_logprobs, limits.vocab_size)
        raw = self.prompt
        prompts = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
        if not prompts:
            raise ValueError("prompt must not be empty")
        _check_sequences(len(prompts), self.n or 1, limits.max_seqs_per_request)
        return GenerateSpec(
            input=TextInput(
                prompts=list(prompts),  # type: ignore[arg-type]
                add_special_tokens=bool(self.add_special_tokens),
                decode_token_prompts=bool(self.echo),
            ),
            params=self.to_sampling_params(self.max_tokens, limits.max_logprobs),
            constraint=self.constraint_source(),
        )

    def to_sampling_params(
        self,
        max_tokens: int | None,
        max_logprobs: int,
        structured_outputs: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        """ValueError (naming the field) when a value is out of range."""
        lp = self.logprobs
        if lp is not None and not 0 <= lp <= max_logprobs:
            raise ValueError(f"logprobs must be an integer in [0, {max_logprobs}], got {lp}")
        prompt_logprobs = lp if self.echo else None
        return SamplingParams(
            max_tokens=max_tokens,
            logprobs=lp,
            prompt_logprobs=prompt_logprobs,
            structured_outputs=structured_outputs,
            **self._sampling_kwargs(),
        )


def _check_sequences(num_prompts: int, n: int, limit: int) -> None:
    """ValueError naming the field when prompts x n engine sequences exceed the server's cap."""
    if num_prompts * n > limit:
        raise ValueError(
            f"{'prompt' if num_prompts > 1 else 'n'}: this request asks for {num_prompts} "
            f"prompt(s) x n={n} = {num_prompts * n} sequences; this server takes at most {limit} "
            "per request (--max-seqs-per-request)"
        )


# ==== responses ===================================================================================


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class UsageInfo(BaseModel):
    """Token counts; ``completion_tokens_details`` only for a model that thinks (left out of
    the JSON otherwise)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None

    @model_serializer(mode="wrap")
    def _drop_details(self, handler: Any) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if out.get("completion_tokens_details") is None:
            out.pop("completion_tokens_details", None)
        return out


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    """The assistant's message; a model that thinks puts its thinking in ``reasoning`` (vLLM's
    name now) and ``reasoning_content`` (DeepSeek's and llama.cpp's, vLLM's before)."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    reasoning: str | None = None
    reasoning_content: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM extra: the stop string or token id that ended it


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer
    def _drop_none(self) -> dict[str, Any]:
        return {k: v for k, v in (("name", self.name), ("arguments", self.arguments)) if v is not None}


class DeltaToolCall(BaseModel):
    """A streamed piece of tool call ``index``: the first has id, type and name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer
    def _drop_none(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"], out["type"] = self.id, self.type or "function"
        out["function"] = self.function.model_dump()
        return out


class DeltaMessage(BaseModel):
    """A streamed message piece; absent fields are left out of the JSON (not null)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None  # a thinking model's reasoning piece, under both names
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer
    def _drop_none(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: v for k, v in (("role", self.role), ("content", self.content),
                              ("reasoning", self.reasoning),
                              ("reasoning_content", self.reasoning)) if v is not None
        }
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ==== models, tokenize, version ===================================================================


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "heron"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    # heron extra: the routes that serve this model (the chat ones need a chat template)
    endpoints: list[str] = Field(default_factory=list)


class LoadLoRAAdapterRequest(RequestBody):
    """POST /v1/load_lora_adapter (vLLM's): a PEFT directory served under a new name."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(RequestBody):
    """POST /v1/unload_lora_adapter (vLLM's): stop serving an adapter's name."""

    lora_name: str
    lora_int_id: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(RequestBody):
    """POST /tokenize: either ``prompt`` or chat ``messages`` (rendered with the template)."""

    MAX_ITEMS: ClassVar[dict[str, int]] = {"messages": MAX_MESSAGES}

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = False

    def to_input(self) -> ChatInput | TextInput:
        """What to tokenize (``prompt`` if given, else ``messages``); ValueError naming the
        field when it cannot be."""
        if self.messages is None:
            return TextInput([self.prompt or ""], add_special_tokens=bool(self.add_special_tokens))
        check_chat(self.messages, bool(self.add_generation_prompt),
                   bool(self.continue_final_message), self.chat_template_kwargs)
        return ChatInput(
            messages=[m.to_template_dict() for m in self.messages],
            add_generation_prompt=bool(self.add_generation_prompt),
            continue_final_message=bool(self.continue_final_message),
            template_kwargs=dict(self.chat_template_kwargs or {}),
        )


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class EngineHealth(BaseModel):
    engine: int
    up: bool
    pid: int | None = None
    reason: str | None = None


class HealthStatus(BaseModel):
    """GET /health's JSON body while the model loads (``{"status": "loading"}``) and with
    several data-parallel engines (their report); one engine that is up answers no body."""

    status: Literal["loading", "ok", "degraded", "down"]
    engines: list[EngineHealth] | None = None
