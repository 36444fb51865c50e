"""Synthetic prompts for ``heron bench serve``, built from a model's tokenizer.

``random``: every prompt is random vocabulary tokens decoded to text, with input and output
lengths drawn uniformly from ``[len * (1 - r), len * (1 + r)]``. ``prefix``: the same, after a
common prefix of ``prefix_len`` tokens (one or a few distinct prefixes shared round robin),
to show what a prefix cache saves.

Decoding random ids and encoding the text again does not give the same ids back (merges
across token boundaries, byte-fallback pieces), so each prompt is adjusted, by truncating or
appending tokens, until its text encodes to the wanted count. The count includes the special
tokens the server adds (a bos token), so a completions request of ``input_len`` is
``input_len`` prompt tokens at the server.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Protocol

DATASETS = ("random", "prefix")
MAX_ADJUST_ROUNDS = 10
REPLACEMENT = "\ufffd"  # what a piece of a multi-byte character decodes to


class TextTokenizer(Protocol):
    """What the prompt builder needs; heron's ``Tokenizer`` has it."""

    vocab_size: int
    special_token_ids: frozenset[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_strings(self, ids: list[int]) -> list[str]: ...


@dataclass(frozen=True)
class SampleRequest:
    """One benchmark request: prompt text, its token count, and the output length to ask for."""

    prompt: str
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class DatasetSpec:
    """Which prompts to build; validated on construction."""

    name: str = "random"
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    prefix_len: int = 0
    num_prefixes: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {self.name!r}")
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be at least 1, got {self.num_prompts}")
        if self.input_len < 0 or self.output_len < 1:
            raise ValueError(
                "input_len must be >= 0 and output_len >= 1, got "
                f"{self.input_len} and {self.output_len}"
            )
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if self.prefix_len < 0 or self.num_prefixes < 1:
            raise ValueError("prefix_len must be >= 0 and num_prefixes >= 1")
        if self.name == "prefix" and self.prefix_len == 0:
            raise ValueError("the prefix dataset needs --prefix-len > 0")


def length_bounds(length: int, range_ratio: float, minimum: int = 0) -> tuple[int, int]:
    """Inclusive ``[floor(len * (1 - r)), ceil(len * (1 + r))]``, raised to ``minimum``."""
    low = max(math.floor(length * (1.0 - range_ratio)), minimum)
    high = max(math.ceil(length * (1.0 + range_ratio)), low)
    return low, high


def sample_requests(tokenizer: TextTokenizer, spec: DatasetSpec) -> list[SampleRequest]:
    """The prompts of ``spec`` (the same ones for the same tokenizer and seed).

    The ``prefix`` dataset is ``random`` with a shared prefix: both take ``prefix_len``, the
    prompt is the prefix followed by an ``input_len`` (range-ratio) random part.
    """
    rng = random.Random(spec.seed)
    allowed = allowed_token_ids(tokenizer)
    num_special = len(tokenizer.encode("", add_special_tokens=True))
    prefixes = [
        random_text(tokenizer, spec.prefix_len, rng, allowed) for _ in range(spec.num_prefixes)
    ]
    prefixes = prefixes if spec.prefix_len > 0 else [""]
    in_low, in_high = length_bounds(spec.input_len, spec.range_ratio)
    out_low, out_high = length_bounds(spec.output_len, spec.range_ratio, minimum=1)
    requests = []
    for index in range(spec.num_prompts):
        input_len, output_len = rng.randint(in_low, in_high), rng.randint(out_low, out_high)
        prefix = prefixes[index % len(prefixes)]
        target = max(spec.prefix_len + input_len - num_special, 0)
        text, count = text_of_length(tokenizer, prefix, target, rng, allowed)
        requests.append(SampleRequest(text, count + num_special, output_len))
    return requests


def allowed_token_ids(tokenizer: TextTokenizer) -> list[int]:
    """Ids that are not special and decode on their own to whole characters.

    Byte pieces (byte-level BPE, sentencepiece byte fallback) decode alone to a replacement
    character, which encodes to several tokens again and keeps the length from converging.
    """
    ids = [i for i in range(tokenizer.vocab_size) if i not in tokenizer.special_token_ids]
    strings = tokenizer.token_strings(ids)
    ids = [i for i, text in zip(ids, strings) if text and REPLACEMENT not in text]
    if not ids:
        raise ValueError("the tokenizer has no plain text tokens to build prompts from")
    return ids


def random_text(
    tokenizer: TextTokenizer, num_tokens: int, rng: random.Random, allowed: list[int]
) -> str:
    """Text of random tokens that encodes (without special tokens) to ``num_tokens`` tokens."""
    return text_of_length(tokenizer, "", num_tokens, rng, allowed)[0]


def text_of_length(
    tokenizer: TextTokenizer, head: str, target: int, rng: random.Random, allowed: list[int]
) -> tuple[str, int]:
    """``head`` plus random text, adjusted until it encodes to ``target`` tokens.

    Each round encodes the random part again and cuts or extends it by the difference.
    Returns the text and its token count (without special tokens): ``target`` unless
    ``MAX_ADJUST_ROUNDS`` rounds did not converge (then the closest attempt) or ``head``
    alone is already longer.
    """
    tail = rng.choices(allowed, k=max(target - _count(tokenizer, head), 0))
    best = _render(tokenizer, head, tail)
    text, count = best
    for _ in range(MAX_ADJUST_ROUNDS):
        if count == target or (count > target and not tail):
            break
        tail = tokenizer.encode(tokenizer.decode(tail), add_special_tokens=False) if tail else []
        if count > target:
            tail = _cut(tokenizer, tail, len(tail) - (count - target))
        else:
            tail += rng.choices(allowed, k=target - count)
        text, count = _render(tokenizer, head, tail)
        best = min(best, (text, count), key=lambda attempt: abs(attempt[1] - target))
    return best


def _cut(tokenizer: TextTokenizer, ids: list[int], keep: int) -> list[int]:
    """The first ``keep`` ids, fewer if needed so the text does not end inside a character."""
    ids = ids[: max(keep, 0)]
    while ids and tokenizer.decode(ids[-8:]).endswith(REPLACEMENT):
        ids.pop()
    return ids


def _render(tokenizer: TextTokenizer, head: str, tail: list[int]) -> tuple[str, int]:
    text = head + (tokenizer.decode(tail) if tail else "")
    return text, _count(tokenizer, text)


def _count(tokenizer: TextTokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0
