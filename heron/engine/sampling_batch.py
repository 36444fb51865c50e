"""The sampler's input for one step: per-row parameters as tensors, built once by the runner.

Row ``i`` of a ``SamplingBatch`` is row ``i`` of the step's logits. The runner describes each
row with a ``SamplingRow`` (its ``SamplingParams``, its tokens so far, its own generator when it
is seeded) and, for constrained rows, fills a ``GrammarMask``; ``SamplingBatch.build`` turns
that into what the sampler reads::

    SamplingBatch
      num_rows      B
      draw          rows that draw (not greedy): temperature, top-k, top-p, min-p [n] tensors,
                    one generator per row (None: the sampler's engine-wide one); None if all greedy
      logprobs      rows that asked for logprobs, and how many alternatives each
      penalties     logit bias, min_tokens bans, repetition / presence / frequency penalties as
                    flat ``row * V + token`` indices into the [B, V] logits; None if no row has any
      grammar       a token bitmask for the constrained rows; None if no row is constrained

Every list above is built from plain values: the sampler never sees a request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from heron.sampling_params import SamplingParams

_SEED_MASK = (1 << 64) - 1  # torch generators take seeds in [0, 2**64)


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator for a request's ``seed`` (any int: reduced to torch's 64-bit range)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed & _SEED_MASK)
    return gen


@dataclass(frozen=True)
class SamplingRow:
    """What the batch reads of one request that samples this step."""

    params: SamplingParams
    token_ids: Sequence[int]  # prompt + output so far
    num_prompt_tokens: int
    generator: torch.Generator | None = None  # a seeded request's own (advances per draw)
    fixed: RequestTensors | None = None  # made from params and the prompt here when None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(frozen=True)
class RequestTensors:
    """What the penalties read of a request that does not change while it runs, as tensors the
    runner makes once and keeps on the request: walking a large logit_bias mapping, or a long
    prompt for repetition_penalty, on every step held up the step of every request in the batch
    (in process, default model: 20,000 bias entries made a token 16.6 ms against 7.95; building
    one row's penalties with repetition_penalty took 0.83 ms at an 8,000-token prompt and 3.1 ms
    at 32,000, 0.07-0.09 ms from the kept tensors)."""

    bias_ids: torch.Tensor  # [N] int64: logit_bias entries inside the vocabulary
    bias_values: torch.Tensor  # [N] float32
    prompt_ids: torch.Tensor  # [P] int64: the prompt's ids inside the vocabulary where
    #                           repetition_penalty reads them, else empty

    @classmethod
    def of(cls, params: SamplingParams, prompt: Sequence[int], vocab: int,
           device: torch.device) -> RequestTensors:
        bias = [(t, b) for t, b in (params.logit_bias or {}).items() if 0 <= t < vocab]
        seen = [t for t in prompt if 0 <= t < vocab] if params.repetition_penalty != 1.0 else []
        return cls(_ints([t for t, _ in bias], device), _floats([b for _, b in bias], device),
                   _ints(seen, device))


@dataclass(frozen=True)
class GrammarMask:
    """Allowed tokens of the constrained rows: bit ``t`` of word ``w`` allows token 32w + t."""

    bitmask: torch.Tensor  # [n, ceil(V / 32)] int32, on the CPU (where grammars fill it)
    rows: list[int]  # the batch row of each bitmask row


@dataclass(frozen=True)
class DrawParams:
    """Temperature and truncation of the rows that draw a token (greedy rows are not here)."""

    rows: list[int]  # batch rows, ascending
    temperature: torch.Tensor  # [n] float32
    top_k: torch.Tensor  # [n] int64; 0 = off (also when k >= V)
    top_p: torch.Tensor  # [n] float32; 1.0 = off
    min_p: torch.Tensor  # [n] float32; 0.0 = off
    generators: list[torch.Generator | None]  # [n]; None: the sampler's engine-wide generator
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    top_p_without_k: bool  # some row has top-p but no top-k: its nucleus size is unbounded


@dataclass(frozen=True)
class LogprobRows:
    """Rows that asked for logprobs, and the number of top alternatives each wants."""

    rows: list[int]
    num_top: list[int]


@dataclass(frozen=True)
class Penalties:
    """Logit edits before temperature, as flat indices ``row * V + token`` into [B, V] logits.

    Empty index tensors where no row asks for that edit; a token seen twice appears twice.
    """

    bias_index: torch.Tensor  # [N] int64: logit_bias entries inside the vocabulary
    bias_values: torch.Tensor  # [N] float32
    banned_index: torch.Tensor  # [M] int64: stop ids of rows still short of min_tokens
    repetition: torch.Tensor  # [B] float32 (1.0 = off)
    seen_index: torch.Tensor  # [S] int64: prompt + output tokens of rows with repetition != 1
    frequency: torch.Tensor  # [B] float32
    presence: torch.Tensor  # [B] float32
    output_index: torch.Tensor  # [O] int64: output tokens of rows with presence / frequency

    @property
    def has_repetition(self) -> bool:
        return self.seen_index.numel() > 0

    @property
    def has_presence_frequency(self) -> bool:
        return self.output_index.numel() > 0


@dataclass(frozen=True)
class SamplingBatch:
    """One step's sampling inputs; see the module docstring for the layout."""

    num_rows: int
    draw: DrawParams | None
    logprobs: LogprobRows | None
    penalties: Penalties | None
    grammar: GrammarMask | None

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device,
              grammar: GrammarMask | None = None) -> SamplingBatch:
        asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        num_top = [rows[i].params.logprobs or 0 for i in asked]
        return cls(
            num_rows=len(rows),
            draw=_draw_params(rows, vocab_size, device),
            logprobs=LogprobRows(asked, num_top) if asked else None,
            penalties=_penalties(rows, vocab_size, device, grammar) if _any_penalty(rows) else None,
            grammar=grammar,
        )


def _draw_params(rows: Sequence[SamplingRow], vocab: int,
                 device: torch.device) -> DrawParams | None:
    drawing = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not drawing:
        return None
    params = [rows[i].params for i in drawing]
    top_ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_ps = [p.top_p for p in params]
    min_ps = [p.min_p for p in params]
    return DrawParams(
        rows=drawing,
        temperature=_floats([p.temperature for p in params], device),
        top_k=torch.tensor(top_ks, dtype=torch.int64, device=device),
        top_p=_floats(top_ps, device),
        min_p=_floats(min_ps, device),
        generators=[rows[i].generator for i in drawing],
        use_top_k=any(top_ks),
        use_top_p=any(p < 1.0 for p in top_ps),
        use_min_p=any(p > 0.0 for p in min_ps),
        top_p_without_k=any(p < 1.0 and k == 0 for p, k in zip(top_ps, top_ks, strict=True)),
    )


def _any_penalty(rows: Sequence[SamplingRow]) -> bool:
    """Whether any row has a bias, an active min_tokens or a penalty."""
    for r in rows:
        p = r.params
        if p.logit_bias or p.repetition_penalty != 1.0:
            return True
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            return True
        if p.all_stop_token_ids and r.num_output_tokens < p.min_tokens:
            return True
    return False


def _penalties(rows: Sequence[SamplingRow], vocab: int, device: torch.device,
               grammar: GrammarMask | None = None) -> Penalties:
    params = [r.params for r in rows]
    fixed = [r.fixed or RequestTensors.of(r.params, r.token_ids[:r.num_prompt_tokens], vocab, device)
             for r in rows]
    banned = _min_tokens_bans(rows, vocab, grammar)
    seen: list[torch.Tensor] = []  # repetition_penalty: prompt and output ids
    output: list[torch.Tensor] = []  # presence / frequency: output ids
    for i, (r, f) in enumerate(zip(rows, fixed, strict=True)):
        repetition = r.params.repetition_penalty != 1.0
        counted = r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0
        if not (repetition or counted):
            continue
        out = _ints([t for t in r.token_ids[r.num_prompt_tokens:] if 0 <= t < vocab], device)
        if repetition:
            seen += [f.prompt_ids + i * vocab, out + i * vocab]
        if counted:
            output.append(out + i * vocab)
    return Penalties(
        bias_index=_cat([f.bias_ids + i * vocab for i, f in enumerate(fixed)], torch.int64, device),
        bias_values=_cat([f.bias_values for f in fixed], torch.float32, device),
        banned_index=_ints(banned, device),
        repetition=_floats([p.repetition_penalty for p in params], device),
        seen_index=_cat(seen, torch.int64, device),
        frequency=_floats([p.frequency_penalty for p in params], device),
        presence=_floats([p.presence_penalty for p in params], device),
        output_index=_cat(output, torch.int64, device),
    )


def _min_tokens_bans(rows: Sequence[SamplingRow], vocab: int,
                     grammar: GrammarMask | None) -> list[int]:
    """Flat indices of the stop ids that min_tokens bans: those of each row still short of its
    min_tokens, except in a constrained row whose grammar allows no other token (JSON's '{'
    listed in stop_token_ids). There the grammar wins: the output must match it, and a stop id
    sampled before min_tokens does not end the output; banned, nothing would be left."""
    constrained = {} if grammar is None else {row: j for j, row in enumerate(grammar.rows)}
    banned = []
    for i, r in enumerate(rows):
        if r.num_output_tokens >= r.params.min_tokens:
            continue
        stops = [t for t in r.params.all_stop_token_ids if 0 <= t < vocab]
        if grammar is not None and i in constrained and stops:
            allowed = unpack_bitmask(grammar.bitmask[constrained[i]][None], vocab)[0]  # [V]
            if int(allowed.sum()) == int(allowed[stops].sum()):
                continue
        banned += [i * vocab + t for t in stops]
    return banned


def _cat(parts: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)


def _ints(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _floats(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, W] int32 bitmask -> [n, vocab_size] bool (little-endian bytes: byte b of word w holds
    tokens 32w + 8b .. 32w + 8b + 7)."""
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [n, 4W]
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = (as_bytes.unsqueeze(-1) >> shifts) & 1  # [n, 4W, 8]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()
