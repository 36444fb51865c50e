"""ServerConfig: the HTTP layer's settings (the engine's live in heron.config)."""

from __future__ import annotations

from dataclasses import dataclass

from heron.pooling_params import POOLING_TYPES
from heron.sampling_params import MAX_LOGPROBS, MAX_N
from heron.server.reasoning import REASONING_PARSERS

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")


@dataclass(frozen=True)
class ServerConfig:
    """Where to listen, who may call, and the per-request caps the API enforces with a 400."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, every endpoint but /health wants "Bearer <key>"
    served_model_names: tuple[str, ...] = ()  # empty: the model's display name
    allowed_origins: tuple[str, ...] = ()  # CORS; empty disables CORS headers
    # Host names served besides loopback ones ("*": any); see heron.server.security
    allowed_hosts: tuple[str, ...] = ()
    max_request_bytes: int = 4 << 20
    max_n: int = 16
    # prompts x n of one request: each is an engine sequence (vLLM's max_num_seqs default)
    max_seqs_per_request: int = 256
    max_logprobs: int = MAX_LOGPROBS
    stats_interval_s: float = 5.0  # period of the "running/waiting/KV/tok/s" log line while busy
    startup_timeout_s: float | None = None  # engine load; None waits as long as it takes
    graceful_shutdown_s: float = 5.0
    # tool_choice "auto": read calls in this format from free text (hermes, llama3_json,
    # mistral, pythonic); None:
    # constrain the output to "text or a call" in the hermes format (the built-in template's).
    tool_call_parser: str | None = None
    # How a model's <think>...</think> is read out of its output (heron.server.reasoning):
    # auto, none, qwen3, deepseek_r1.
    reasoning_parser: str = "auto"
    # /v1/embeddings: how the final hidden states become one vector (mean or last token).
    pooling: str = "mean"
    enable_web_ui: bool = True  # the chat page at /
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's, behind its
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING): off unless asked for
    allow_runtime_lora: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset to disable auth)")
        if self.max_request_bytes < 1024:
            raise ValueError(
                f"max_request_bytes must be at least 1024, got {self.max_request_bytes}"
            )
        if not 1 <= self.max_n <= MAX_N:
            raise ValueError(f"max_n must be in [1, {MAX_N}], got {self.max_n}")
        if self.max_seqs_per_request < 1:
            raise ValueError(
                f"max_seqs_per_request must be positive, got {self.max_seqs_per_request}"
            )
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(
                f"max_logprobs must be in [0, {MAX_LOGPROBS}], got {self.max_logprobs}"
            )
        if self.stats_interval_s <= 0:
            raise ValueError(f"stats_interval_s must be positive, got {self.stats_interval_s}")
        if any(not name for name in self.served_model_names):
            raise ValueError("served model names must not be empty")
        if self.pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_TYPES)}, "
                             f"got {self.pooling!r}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                             f"got {self.tool_call_parser!r}")
        if self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                             f"got {self.reasoning_parser!r}")
