"""Per-request state inside the engine core: token ids in, token ids out.

A request's life::

    WAITING --schedule--> RUNNING --finish--> FINISHED_{STOPPED,LENGTH,ABORTED}
       ^                     |
       +----- preempt -------+   (blocks freed; num_computed_tokens reset to 0, recomputed later)

The scheduler's one rule: each step, ``num_computed_tokens`` catches up with
``num_tokens`` under the step's token budget. Prefill, chunked prefill, prefix
cache hits and recompute after preemption are all that same rule.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from heron.engine.sampling_batch import RequestTensors
    from heron.engine.structured import Grammar
    from heron.lora import LoRARequest
    from heron.pooling_params import PoolingParams
    from heron.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # its output constraint failed: stop_reason says why

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)


@dataclass
class Logprob:
    """One token's log-probability and its rank among the vocabulary (1 = most likely)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per generated token: {token_id: Logprob} holding the sampled token and the top-k alternatives.
LogprobsDict = dict[int, Logprob]


@dataclass(eq=False)
class Request:
    """The engine's view of one sequence. ``n > 1`` is fanned out into n Requests upstream."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: never None inside the engine
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    # prompt + output; the scheduler compares num_computed_tokens with len(token_ids)
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit length at first scheduling; -1 = not yet
    block_ids: list[int] = field(default_factory=list)
    # Tokens at the start whose K/V are in prefix-cache blocks shared since admission (0 if
    # none): the runner writes no K/V there (heron.engine.kv_cache, the last token's hit).
    num_shared_tokens: int = 0
    num_preemptions: int = 0
    stop_reason: int | str | None = None  # the stop token id that ended it, if any
    output_logprobs: list[LogprobsDict] = field(default_factory=list)
    # Made by the runner on a seeded request's first draw; advances only when this request draws.
    generator: torch.Generator | None = None
    # Made by the runner on its first sampled step: logit_bias and prompt ids as tensors.
    fixed_tensors: RequestTensors | None = None
    # Prompt logprobs (one entry per prompt position; the first is None), when asked.
    prompt_logprobs: list[LogprobsDict | None] | None = None
    # Structured outputs: the request's matcher state (masks its logits, advances per token).
    grammar: Grammar | None = None
    # Pooling requests: how to pool; the runner keeps the running sum (mean) or the last hidden
    # state in ``pooled`` and leaves the final vector there once the prompt is computed.
    pooling_params: PoolingParams | None = None
    pooled: torch.Tensor | None = None  # [hidden] float32
    # Fair admission (see Scheduler.add_request): the API request this sequence belongs to,
    # and its place in the waiting queue, (turn within its group, arrival number).
    group: str = ""
    admit_key: tuple[int, int] = (0, 0)
    # The LoRA adapter its tokens run with (None: the base model alone).
    lora_request: LoRARequest | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.prompt_logprobs is None and self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first token has none (a 1-token prompt: all)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def lora_id(self) -> int:
        """Its adapter's ``lora_int_id``; 0 for the base model."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def is_pooling(self) -> bool:
        return self.pooling_params is not None

    @property
    def needs_every_position(self) -> bool:
        """Pooling and prompt logprobs read every prompt position's hidden state: no prefix-cache
        hits for such a request (and a pooling request publishes none: its KV is not kept)."""
        return self.is_pooling or self.sampling_params.prompt_logprobs is not None

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's ``finish_reason``: "stop", "length", "abort" ("error" when its output
        constraint failed) or None while running."""
        return self.status.value if self.status.is_finished else None

    def append_output_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
