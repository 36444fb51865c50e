"""Typed messages between the API side and the engine core (msgspec structs; never pickle).

The same structs are used in-process by the offline ``LLM`` and, encoded with
msgspec msgpack, over ZMQ by the server's engine client.
"""

from __future__ import annotations

import msgspec

from heron.lora import LoRARequest
from heron.pooling_params import PoolingParams
from heron.sampling_params import SamplingParams


class EngineRequest(msgspec.Struct, kw_only=True):
    """One sequence to generate. ``n > 1`` is fanned out into n EngineRequests upstream.

    With ``pooling_params`` it is a pooling request instead: the prompt is computed like a
    prefill, nothing is sampled (``sampling_params`` is not used) and the one output carries
    the pooled vector in ``EngineOutput.embedding``.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    pooling_params: PoolingParams | None = None
    arrival_time: float = 0.0
    # The API request it belongs to ("" = itself): the scheduler admits waiting sequences in
    # fair turns across groups, so one request of many prompts x n cannot hold others back.
    group: str = ""
    lora_request: LoRARequest | None = None  # the adapter beside the base model (None: none)


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Log-probabilities for one generated (or prompt) position."""

    token_ids: list[int]  # the chosen token first, then the top-k alternatives
    logprobs: list[float]
    ranks: list[int]


class EngineOutput(msgspec.Struct, kw_only=True):
    """What one step produced for one request: new token ids, and the finish reason when done."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # sent once, with the first token
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # Pooling requests: the pooled vector, float32 little-endian bytes (hidden_size of them / 4).
    embedding: bytes | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineStats(msgspec.Struct, kw_only=True):
    """A snapshot for /metrics and the periodic log line."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


class EngineInfo(msgspec.Struct, kw_only=True):
    """Facts the API side needs once at startup."""

    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    block_size: int
    device: str
    dtype: str
    eos_token_ids: list[int]
    hidden_size: int = 0  # the length of a pooled vector
    num_labels: int = 0  # the classification head's (0: none): a classify request's vector


# ---- the engine client <-> engine core protocol (msgspec msgpack over ZMQ) ----------------------
#
#   API process (EngineClient)            engine core process
#       PUSH  --- ClientMessage --->      PULL   (add / abort / shutdown)
#       PULL  <--- CoreMessage ----       PUSH   (ready / failed / outputs / rejected)
#                                         PUSH   (heartbeat, from its own thread and socket)


class AddRequests(msgspec.Struct, tag="add", kw_only=True):
    """Queue these sequences (the n choices of one API request travel together)."""

    requests: list[EngineRequest]


class AbortRequests(msgspec.Struct, tag="abort", kw_only=True):
    """Stop these sequences now and free their KV blocks (unknown ids are ignored)."""

    request_ids: list[str]


class ShutdownCore(msgspec.Struct, tag="shutdown"):
    """Leave the busy loop and exit."""


ClientMessage = AddRequests | AbortRequests | ShutdownCore


class CoreReady(msgspec.Struct, tag="ready", kw_only=True):
    """Sent once, when the model is loaded and the KV cache allocated."""

    info: EngineInfo


class CoreFailed(msgspec.Struct, tag="failed", kw_only=True):
    """The core could not start, or died; ``message`` says why."""

    message: str


class CoreOutputs(msgspec.Struct, tag="outputs", kw_only=True):
    """Outputs of one step, and a fresh stats snapshot when one is due."""

    outputs: list[EngineOutput]
    stats: EngineStats | None = None


class RequestRejected(msgspec.Struct, tag="rejected", kw_only=True):
    """``EngineCore.add_request`` refused a request (its ValueError message)."""

    request_id: str
    message: str


class Heartbeat(msgspec.Struct, tag="heartbeat", kw_only=True):
    """The core process is alive: sent every ~0.5 s by its heartbeat thread.

    ``steps`` counts the steps its loop finished and ``busy`` says whether it has work, so the
    API side can tell a live, stepping engine from a stopped (SIGSTOP) or stuck one.
    """

    steps: int
    busy: bool


CoreMessage = CoreReady | CoreFailed | CoreOutputs | RequestRejected | Heartbeat
