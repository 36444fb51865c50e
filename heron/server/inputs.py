"""What an endpoint asks for, in neutral terms: the input of the preparation pipeline.

Each protocol model (OpenAI chat and completions today; Responses, Anthropic Messages and
embeddings alike) converts itself into a ``GenerateSpec``: the input to tokenize (a chat to
render, or prompts), the ``SamplingParams``, the tools offered and the output constraint it
asks for. ``heron.server.pipeline.prepare`` takes it from there; nothing below the protocol
models knows which API a request came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from heron.sampling_params import SamplingParams
    from heron.structured.params import StructuredOutputsParams
    from heron.structured.tools import ToolSpec


@dataclass(frozen=True)
class Limits:
    """The server's caps and the model's vocabulary, checked while a request converts itself."""

    max_n: int
    max_logprobs: int
    vocab_size: int
    max_seqs_per_request: int = 256  # prompts x n: each one engine sequence
    thinks: bool = False  # the model thinks (a reasoning parser runs): Anthropic's thinking


@dataclass(frozen=True)
class ChatInput:
    """A conversation for the chat template: messages and tools as the template sees them
    (tools in OpenAI's ``{"type": "function", "function": {...}}`` form)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    # How errors name the input ("messages" for OpenAI chat).
    what: str = "messages"


@dataclass(frozen=True)
class TextInput:
    """Prompts as text or token ids; one choice group per prompt."""

    prompts: list[str | list[int]]
    add_special_tokens: bool = True
    # Decode token-id prompts to text (completions' ``echo`` repeats the prompt).
    decode_token_prompts: bool = False
    what: str = "prompt"


@dataclass(frozen=True)
class ToolUse:
    """The functions a request offers and how the model may use them.

    ``choice``: "none", "auto", "required", or None when the request did not say; ``named``:
    the one function a named choice forces; ``allowed``: the only functions calls may name
    (OpenAI's ``allowed_tools`` choice; None: all). (The chat template shows the tools from
    ``ChatInput.tools``, all of them.)"""

    specs: list[ToolSpec]
    choice: Literal["none", "auto", "required"] | None = None
    named: str | None = None
    parallel: bool = True
    allowed: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ThinkingBudget:
    """A bound on the reasoning: at most ``tokens`` between ``<think>`` and ``</think>``.
    ``field``: the request's name for it (errors name it); ``strict``: refuse (400) where it
    cannot be enforced (tags that are text, a model that does not think) rather than ignore it."""

    tokens: int
    field: str
    strict: bool = True


@dataclass(frozen=True)
class GenerateSpec:
    """One request to generate, in neutral terms.

    ``params``: validated sampling parameters whose ``max_tokens`` is what the request asked
    for (None: up to the context); the pipeline adds the output constraint. ``constraint``:
    the response format the request asked for, with the name of the field that set it.
    ``max_tokens_field``: the request's name for ``params.max_tokens`` (errors name it).
    ``thinking_budget``: the bound the request puts on the reasoning, if any."""

    input: ChatInput | TextInput
    params: SamplingParams
    tools: ToolUse | None = None
    constraint: tuple[str, StructuredOutputsParams] | None = None
    max_tokens_field: str = "max_tokens"
    thinking_budget: ThinkingBudget | None = None


class RequestFields(Protocol):
    """What every endpoint checks first: the model name and the fields sent."""

    @property
    def model(self) -> str | None: ...

    def unknown_fields(self) -> list[str]: ...

    def unsupported_fields(self) -> list[str]: ...

    def ignored_fields(self) -> list[str]: ...


class GenerateRequest(RequestFields, Protocol):
    """What the pipeline needs of a protocol model."""

    def to_spec(self, limits: Limits) -> GenerateSpec:
        """This request in neutral terms; ValueError naming the field when a value is wrong."""
        ...
