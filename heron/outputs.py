"""Results of the offline API, shaped like vLLM's RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field

from heron.engine.request import LogprobsDict


@dataclass
class CompletionOutput:
    """One generated sequence (one of the ``n`` of a request)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[LogprobsDict] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and its ``n`` completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[LogprobsDict | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EmbeddingOutput:
    """A prompt's pooled vector (``LLM.embed``), as ``/v1/embeddings`` computes it."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """One prompt of ``LLM.embed`` and its vector (vLLM's shape: ``.outputs.embedding``)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclass
class ScoringOutput:
    """A pair's score (``LLM.score``), as ``/v1/score`` computes it."""

    score: float


@dataclass
class ScoringRequestOutput:
    """One pair of ``LLM.score`` (vLLM's shape: ``.outputs.score``); ``prompt_token_ids``:
    the pair as the cross-encoder read it (empty where the score is a cosine of two
    embeddings)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: ScoringOutput
    finished: bool = True
