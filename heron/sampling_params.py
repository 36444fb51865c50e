"""SamplingParams: how one request is decoded. Field names follow vLLM's.

Every value is validated when the object is built; a bad value raises
``ValueError`` naming the field, the value and the allowed range.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Any

from heron.structured.params import StructuredOutputsParams

# Hard caps that keep one request from taking the whole engine.
MAX_LOGPROBS = 20
MAX_N = 128
# Every output step looks for each stop string and holds back text that could still become
# one, on the API process's event loop: both are bounded, as everyone waits while they run.
MAX_STOP_STRINGS = 256
MAX_STOP_CHARS = 8192  # all of a request's stop strings together
# Integers cross to the engine as msgpack int64 (seeds as uint64): every one is checked to fit.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_SEED_MASK = (1 << 64) - 1
MAX_QUOTE_CHARS = 200  # error messages quote at most this much of a value

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """Decoding parameters for one request (vLLM's field names and meanings).

    ``temperature == 0`` means greedy: an exact argmax, all other sampling knobs
    (top_k, top_p, min_p, seed) are then irrelevant. ``top_k`` of 0 or -1
    disables top-k. ``logprobs=k`` returns the sampled token's log-probability
    plus the ``k`` most likely alternatives at each step.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    # Constrain the output to a JSON schema, regex, choice or grammar (heron.structured).
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by the engine: token ids that end generation (EOS and friends).
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(self.stop is None or isinstance(self.stop, (list, tuple)), "stop", self.stop,
               "a string or a list of strings")
        self.stop = list(self.stop or [])
        self.stop_token_ids = _as_token_ids(self.stop_token_ids)
        self.logit_bias = _as_logit_bias(self.logit_bias)
        self._check_types()
        self._validate()
        if self.temperature < _GREEDY_EPS:
            # Greedy: normalise so that downstream code has one way to see it.
            self.temperature = 0.0
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        if self.top_k == -1:
            self.top_k = 0
        # Union, so that clone() keeps the ids the engine added (EOS and friends).
        self.all_stop_token_ids = set(self.all_stop_token_ids) | set(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)

    def _check_types(self) -> None:
        """Wrong types (strings, None, bools for numbers) are ValueErrors naming the field.

        Numbers are normalised to Python int/float (numpy scalars are accepted)."""
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty",
                     "temperature", "top_p", "min_p"):
            value = getattr(self, name)
            _check(_is_number(value), name, value, "a number")
            setattr(self, name, float(value))
        for name in ("n", "top_k", "min_tokens"):
            value = getattr(self, name)
            _check(_is_int(value), name, value, "an integer")
            setattr(self, name, _int64(name, value))
        for name in ("max_tokens", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or _is_int(value), name, value, "an integer or None")
            setattr(self, name, None if value is None else _int64(name, value))
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "an integer or None")
        if self.seed is not None:  # any integer seeds; the generator takes its low 64 bits
            self.seed = int(self.seed)
            if not INT64_MIN <= self.seed <= _SEED_MASK:  # what msgpack carries
                self.seed &= _SEED_MASK

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and 1 <= self.n <= MAX_N, "n", self.n, f"an integer in [1, {MAX_N}]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty, "in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        _check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", self.repetition_penalty, "in (0, 2]")
        _check(0.0 <= self.temperature <= 2.0, "temperature", self.temperature, "in [0, 2]")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", self.top_k, "-1, 0 (disabled) or a positive integer")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "in [0, 1]")
        _check(self.seed is None or isinstance(self.seed, int), "seed", self.seed, "an integer")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens", self.max_tokens, "a positive integer")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", self.min_tokens, "a non-negative integer")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                   f"at most max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS),
                   name, value, f"an integer in [0, {MAX_LOGPROBS}]")
        _check(all(isinstance(s, str) and s for s in self.stop or ()), "stop", self.stop,
               "non-empty strings")
        _check(len(self.stop or ()) <= MAX_STOP_STRINGS
               and sum(map(len, self.stop or ())) <= MAX_STOP_CHARS, "stop", self.stop,
               f"at most {MAX_STOP_STRINGS} strings of {MAX_STOP_CHARS} characters in all")
        _check(all(t >= 0 for t in self.stop_token_ids or ()), "stop_token_ids",
               self.stop_token_ids, "non-negative token ids")
        _check(self.structured_outputs is None
               or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", self.structured_outputs, "a StructuredOutputsParams or None")
        if self.logit_bias:
            _check(all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
                   "logit_bias", self.logit_bias, "values in [-100, 100]")
            _check(all(t >= 0 for t in self.logit_bias), "logit_bias", self.logit_bias, "non-negative token ids")


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int64(name: str, value: object) -> int:
    number = int(value)  # type: ignore[call-overload]
    _check(INT64_MIN <= number <= INT64_MAX, name, value, "a 64-bit integer")
    return number


def _as_token_ids(value: object) -> list[int]:
    """stop_token_ids as a list of ints (None -> [])."""
    items = [] if value is None else value
    if not isinstance(items, (list, tuple, set)) or not all(_is_int(t) for t in items):
        raise _invalid("stop_token_ids", value, "a list of integer token ids")
    return [_int64("stop_token_ids", t) for t in items]


def _as_logit_bias(value: object) -> dict[int, float] | None:
    """logit_bias as {token id: bias}; keys may be strings of digits (OpenAI sends JSON keys)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid("logit_bias", value, "a mapping of token ids to numbers")
    try:
        bias = {int(k): float(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise ValueError("logit_bias must be a mapping of token ids to numbers, "
                         f"got {short_repr(value)}") from None
    for token in bias:
        _int64("logit_bias", token)
    return bias


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise _invalid(name, value, allowed)


def _invalid(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{name} must be {allowed}, got {short_repr(value)}")


def short_repr(value: object, limit: int = MAX_QUOTE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: errors never echo a whole request back.
    Large containers are cut before they are rendered (a 1 MiB list costs no 1 MiB repr)."""
    if isinstance(value, (list, tuple, set)) and len(value) > limit:
        value = list(value)[:limit]
    elif isinstance(value, dict) and len(value) > limit:
        value = dict(list(value.items())[:limit])
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
