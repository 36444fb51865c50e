"""Ollama's API (``/api/generate``, ``/api/chat``, ``/api/embed``, ``/api/tags``...): requests,
the ``options`` map, the answers, and Ollama's error shape ``{"error": "message"}``.

Requests convert themselves like the OpenAI ones (``to_spec``): ``/api/generate`` is a chat of
one user turn (and ``system``) rendered with the model's chat template, or with ``raw`` the
prompt itself; ``/api/chat`` messages become chat messages (tool calls' ``arguments`` objects as
JSON text; ``tool_name`` as the tool message's name). ``format`` is ``"json"`` or a JSON
schema (structured outputs, enforced). ``options`` map onto ``SamplingParams``:

    honoured   temperature, top_p, top_k, min_p, seed, num_predict, stop, repeat_penalty,
               presence_penalty, frequency_penalty
    ignored    runtime and loading hints (num_ctx, num_gpu, num_thread, num_batch, ...), and
               option names Ollama does not have (as Ollama does: it warns and goes on)
    refused    sampling Ollama has and heron does not (mirostat, tfs_z, typical_p ...) at any
               value but the one that leaves the output unchanged: a 400

Fields of the API heron cannot honour (images, template, context, suffix, think...) are a 400
unless empty; a field the API does not have is a 400, as on every route.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

from heron.sampling_params import SamplingParams, short_repr
from heron.server.inputs import ChatInput, GenerateSpec, Limits, TextInput, ToolUse
from heron.server.protocol import (
    MAX_MESSAGES,
    MAX_TOOLS,
    ChatCompletionTool,
    ChatMessage,
    ErrorResponse,
    FunctionCall,
    OpenAIBaseModel,
    RequestBody,
    ToolCall,
    check_chat,
    parse_part,
    reasoning_template_kwargs,
)
from heron.structured.params import StructuredOutputsParams
from heron.structured.tool_parsers import new_call_id
from heron.structured.tools import ToolSpec

OLLAMA_PREFIX = "/api/"
# The Ollama API level heron answers GET /api/version with: the release whose routes and
# fields heron speaks (tools, JSON-schema formats, /api/embed, think and thinking: 0.9); clients
# that gate a feature on the version see one that has what these routes do.
OLLAMA_API_VERSION = "0.9.0"


def ollama_error(error: ErrorResponse) -> dict[str, Any]:
    """An error value in Ollama's shape."""
    return {"error": error.error.message}


def now_rfc3339() -> str:
    """The time as Ollama writes it: RFC 3339 in UTC with a ``Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# ==== options =====================================================================================

# Hints about loading and running the model: heron's are set when it starts.
_RUNTIME_HINTS = frozenset((
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
    "vocab_only", "use_mmap", "use_mlock", "num_thread", "numa", "embedding_only", "num_keep",
    "penalize_newline"))
# Options Ollama has whose every value but the neutral one changes the output.
_NEUTRAL = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0}


class OllamaOptions(BaseModel):
    """``options``: the ones heron honours are typed (a wrong type is a 400, as on Ollama)."""

    model_config = ConfigDict(extra="allow", strict=True)

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    num_predict: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_last_n: int | None = None
    # Only read by mirostat (refused unless 0): ignored.
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None

    def ignored(self) -> list[str]:
        """Option names set here that change nothing: hints, and names Ollama does not have."""
        extra = [k for k, v in (self.model_extra or {}).items()
                 if k not in _NEUTRAL and v is not None]
        tuning = [k for k in ("mirostat_tau", "mirostat_eta") if getattr(self, k) is not None]
        return sorted(extra + tuning)

    def check(self) -> None:
        """ValueError naming the option that asks for sampling heron does not do."""
        extra = self.model_extra or {}
        for name, neutral in _NEUTRAL.items():
            value = extra.get(name)
            if value is not None and value != neutral:
                raise ValueError(f"options.{name}: {short_repr(value)} is not supported by this "
                                 f"server (only {neutral}, which leaves sampling unchanged)")
        penalised = any(v not in (None, 0.0) for v in (self.presence_penalty,
                                                        self.frequency_penalty))
        penalised = penalised or self.repeat_penalty not in (None, 1.0)
        if penalised and self.repeat_last_n not in (None, -1):
            raise ValueError(f"options.repeat_last_n: {self.repeat_last_n} is not supported by "
                             "this server: its penalties look at the whole context (-1)")

    def to_sampling_params(self) -> SamplingParams:
        self.check()
        fields: dict[str, Any] = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "seed": None if self.seed == -1 else self.seed,
            "stop": self.stop, "repetition_penalty": self.repeat_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 64):
            raise ValueError(f"options.seed must fit in 64 bits, got {short_repr(self.seed)}")
        # num_predict -1 (the default: no limit) and -2 (fill the context): up to the context.
        limit = self.num_predict if self.num_predict is not None and self.num_predict > 0 else None
        try:
            return SamplingParams(max_tokens=limit,
                                  **{k: v for k, v in fields.items() if v is not None})
        except ValueError as e:
            raise ValueError(f"options.{_ollama_spelling(str(e))}") from None


# SamplingParams' names for options Ollama spells otherwise (its errors start with the name).
_SPELLINGS = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}


def _ollama_spelling(message: str) -> str:
    """A SamplingParams error as the option was sent: "max_tokens must..." -> "num_predict..."."""
    name, _, rest = message.partition(" ")
    return f"{_SPELLINGS[name]} {rest}" if name in _SPELLINGS else message


# ==== requests ====================================================================================


def _format_constraint(value: str | dict[str, Any] | None) -> StructuredOutputsParams | None:
    if value is None or value == "":
        return None
    if value == "json":
        return StructuredOutputsParams.json_object()
    if isinstance(value, dict):
        return StructuredOutputsParams.json_schema(value)
    raise ValueError(f"format: invalid format {short_repr(value)}: expected \"json\" or a JSON "
                     "schema")


class OllamaRequest(RequestBody):
    """What every Ollama request body has: the model, ``keep_alive`` (heron keeps its one model
    loaded until it stops: ignored) and ``options``."""

    IGNORED: ClassVar[frozenset[str]] = frozenset(("keep_alive",))
    # Fields of Ollama's API heron cannot honour, with the values that ask for nothing.
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {}

    model: str | None = None
    keep_alive: float | str | None = None
    options: OllamaOptions | None = None

    def unknown_fields(self) -> list[str]:
        """None: Ollama ignores fields it does not know (its clients send some), so these
        routes do too, logging them (``ignored_fields``), unlike the OpenAI routes."""
        return []

    def ignored_fields(self) -> list[str]:
        known = self.UNSUPPORTED.keys() | self.IGNORED
        names = super().ignored_fields() + sorted(k for k in self.model_extra or {}
                                                  if k not in known)
        return names + [f"options.{k}" for k in (self.options.ignored() if self.options else [])]


class GenerationRequest(OllamaRequest):
    """The fields /api/generate and /api/chat share."""

    IGNORED: ClassVar[frozenset[str]] = frozenset(("keep_alive", "truncate", "shift"))
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "logprobs": (None, False), "top_logprobs": (None, 0), "debug_render_only": (None, False),
        "_debug_render_only": (None, False)}

    stream: bool | None = True
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None
    truncate: bool | None = None  # the prompt is never cut: a prompt too long is a 400
    shift: bool | None = None

    def template_kwargs(self) -> dict[str, Any]:
        """``think`` for the chat template: a bool is Qwen3's ``enable_thinking`` switch, a
        level (gpt-oss's low / medium / high) is chat's ``reasoning_effort``; a template that
        takes neither ignores them."""
        if isinstance(self.think, bool):
            return {"enable_thinking": self.think}
        return reasoning_template_kwargs(self.think, "think", None)

    def sampling_params(self) -> SamplingParams:
        options = self.options or OllamaOptions()
        return options.to_sampling_params()

    def constraint_source(self) -> tuple[str, StructuredOutputsParams] | None:
        constraint = _format_constraint(self.format)
        return ("format", constraint) if constraint is not None else None


class GenerateRequest(GenerationRequest):
    """POST /api/generate."""

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        **GenerationRequest.UNSUPPORTED, "width": (None,), "height": (None,), "steps": (None,)}

    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = False
    images: list[str] | None = None

    @property
    def loads_only(self) -> bool:
        """An empty prompt asks Ollama to load the model: the answer is done at once."""
        return not self.prompt

    def to_spec(self, limits: Limits) -> GenerateSpec:
        self._check_fields()
        return GenerateSpec(input=self._input(), params=self.sampling_params(),
                            constraint=self.constraint_source(), max_tokens_field="num_predict")

    def _check_fields(self) -> None:
        if self.raw and (self.template or self.system or self.context):
            raise ValueError("raw: raw mode does not support template, system, or context")
        for name, why in (("template", "the model's own chat template is always used"),
                          ("context", "send the conversation to /api/chat instead"),
                          ("suffix", "this server does not fill in the middle"),
                          ("images", "this server takes text only")):
            if getattr(self, name):
                raise ValueError(f"{name}: not supported by this server: {why}")

    def _input(self) -> ChatInput | TextInput:
        prompt = self.prompt or ""
        if self.raw:
            return TextInput(prompts=[prompt], what="prompt")
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": prompt})
        return ChatInput(messages=messages, template_kwargs=self.template_kwargs(),
                         what="prompt")


class OllamaFunction(OpenAIBaseModel):
    index: int | None = None
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class OllamaToolCall(OpenAIBaseModel):
    id: str | None = None
    type: Literal["function"] | None = None
    function: OllamaFunction

    def to_tool_call(self) -> ToolCall:
        arguments = self.function.arguments
        text = arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                       ensure_ascii=False)
        return ToolCall(id=self.id or new_call_id(),
                        function=FunctionCall(name=self.function.name, arguments=text))


class OllamaMessage(OpenAIBaseModel):
    """A turn of /api/chat; fields Ollama does not have are dropped, as Ollama drops them."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[str] | None = None
    thinking: str | None = None  # an earlier turn's: the template decides (as in Ollama)
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None  # LangChain's ChatOllama sends it

    def to_chat_message(self, where: str) -> ChatMessage:
        if self.images:
            raise ValueError(f"{where}.images: not supported by this server: it takes text only")
        calls = [c.to_tool_call() for c in self.tool_calls] if self.tool_calls else None
        if self.role == "assistant":
            return ChatMessage.assistant(self.content or "", calls, self.thinking or "")
        return ChatMessage(role=self.role, content=self.content or "", name=self.tool_name,
                           tool_calls=calls, tool_call_id=self.tool_call_id)


class ChatRequest(GenerationRequest):
    """POST /api/chat: no tool_choice in Ollama's API, so tools are offered as "auto"."""

    MAX_ITEMS: ClassVar[dict[str, int]] = {"messages": MAX_MESSAGES, "tools": MAX_TOOLS}

    messages: list[OllamaMessage] | None = None
    tools: list[dict[str, Any]] | None = None

    @property
    def loads_only(self) -> bool:
        """No messages asks Ollama to load the model: the answer is done at once."""
        return not self.messages

    def to_spec(self, limits: Limits) -> GenerateSpec:
        messages = [m.to_chat_message(f"messages[{i}]")
                    for i, m in enumerate(self.messages or [])]
        check_chat(messages, True, False, None)
        tools = [parse_part(ChatCompletionTool, t, f"tools[{i}]")
                 for i, t in enumerate(self.tools or [])]
        specs = [ToolSpec.of(t.function.name, t.function.parameters) for t in tools]
        template_tools = [t.model_dump(exclude_none=True) for t in tools] or None
        return GenerateSpec(
            input=ChatInput(messages=[m.to_template_dict() for m in messages],
                            tools=template_tools, template_kwargs=self.template_kwargs()),
            params=self.sampling_params(),
            tools=ToolUse(specs) if specs else None,
            constraint=self.constraint_source(),
            max_tokens_field="num_predict",
        )


class EmbedRequest(OllamaRequest):
    """POST /api/embed: ``input`` one text or several. ``options`` mean nothing to a pooled
    vector (ignored); ``truncate`` is never needed: an input too long is a 400."""

    IGNORED: ClassVar[frozenset[str]] = frozenset(("keep_alive", "truncate", "options"))

    input: str | list[str] = ""
    truncate: bool | None = None
    dimensions: int | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingsRequest(OllamaRequest):
    """POST /api/embeddings (Ollama's older route): one ``prompt``."""

    IGNORED: ClassVar[frozenset[str]] = frozenset(("keep_alive", "options"))

    prompt: str = ""


class ModelRequest(RequestBody):
    """/api/show, /api/pull, /api/push, /api/delete: a model (``name``: its older spelling)."""

    IGNORED: ClassVar[frozenset[str]] = frozenset((
        "verbose", "system", "template", "options", "insecure", "username", "password"))

    model: str | None = None
    name: str | None = None
    stream: bool | None = True

    @property
    def model_name(self) -> str:
        return self.model or self.name or ""


# ==== answers =====================================================================================


class _Compact(BaseModel):
    """Fields that are None are left out of the JSON (Ollama's omitempty)."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class OllamaFunctionOut(BaseModel):
    index: int
    name: str
    arguments: dict[str, Any]


class OllamaToolCallOut(BaseModel):
    id: str
    function: OllamaFunctionOut


class OllamaMessageOut(_Compact):
    role: Literal["assistant"] = "assistant"
    content: str = ""
    thinking: str | None = None  # a thinking model's reasoning (the reasoning parser's)
    tool_calls: list[OllamaToolCallOut] | None = None


class _Line(_Compact):
    """One line of a generation: its text so far, then on the last (``done``) why it stopped
    and its counts and timings (nanoseconds)."""

    model: str
    created_at: str = Field(default_factory=now_rfc3339)
    done: bool = False
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class GenerateLine(_Line):
    response: str = ""
    thinking: str | None = None


class ChatLine(_Line):
    message: OllamaMessageOut = Field(default_factory=OllamaMessageOut)


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class ModelEntry(BaseModel):
    """One model in /api/tags (and, with the running fields, /api/ps)."""

    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class RunningModel(ModelEntry):
    expires_at: str | None = None  # held until the server stops
    size_vram: int
    context_length: int


class ModelList(BaseModel):
    models: list[ModelEntry]


class RunningList(BaseModel):
    models: list[RunningModel]


class ShowResponse(BaseModel):
    license: str = ""
    modelfile: str
    parameters: str = ""
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int = 0
    prompt_eval_count: int


class EmbeddingsResponse(BaseModel):
    embedding: list[float]


class StatusResponse(BaseModel):
    status: str


class OllamaVersion(BaseModel):
    version: str
    heron_version: str


def human_count(n: int) -> str:
    """A parameter count as Ollama shows it: 268098176 -> "268.10M", 8030261248 -> "8.0B"."""
    for scale, unit, digits in ((1e12, "T", 1), (1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 2)):
        if n >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return str(n) if n > 0 else "unknown"
