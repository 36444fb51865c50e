"""Batched sampling: one call turns a step's logits into one token per request.

Pipeline, applied to the whole ``[B, V]`` batch at once (row ``i`` belongs to ``requests[i]``)::

    raw logits (any float dtype) --float32--> logits
      |-- log_softmax(raw) ----------------------------> logprobs (rows that asked)
      v
    + logit_bias                        (OpenAI: added to the logit)
    min_tokens: stop ids -> -inf        (while num_output_tokens < min_tokens)
    repetition_penalty                  (HF/vLLM: prompt+output tokens, x>0: x/p, x<0: x*p)
    presence / frequency penalties      (OpenAI: x -= f * count + p * (count > 0), output only)
    grammar masks -> -inf               (structured outputs: one bitmask for the constrained rows)
      |
      |-- greedy rows ------------------> argmax (exact)
      v
    / temperature -> top_k -> top_p -> min_p -> softmax -> inverse-CDF draw

Truncation keeps every token whose logit reaches a per-row threshold (the k-th largest
logit for top-k, the last logit of the nucleus for top-p, ``max + log(min_p)`` for min-p),
so ties are treated alike whatever else is in the batch. top-p finds its nucleus with a
partial ``topk`` (1024 candidates, widened only when the nucleus is larger), never a full
sort of the vocabulary unless it must.

Drawing: each row takes one uniform ``u`` in [0, 1) and picks the first token whose
cumulative probability exceeds ``u`` times the row total (a two-level search with float64
sums, see ``_inverse_cdf``; on CPU one compiled call does the softmax and the search,
``heron_sample_rows`` in ``cpu_kernels/elementwise.c``: 0.25 ms for 262,144 logits where the
PyTorch operators take 0.7 ms warm and ~1.5 ms in an engine step). A seeded request takes
its ``u`` from its own generator (``Request.generator``), and every step of the pipeline
is row-local, so its tokens do not depend on which other requests share the batch or on
their order; unseeded rows share the sampler's engine-wide generator. One number per row
instead of one per vocabulary entry: an exponential race over 262144 entries costs ~5 ms
of random numbers per row on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from heron.engine.request import Logprob, LogprobsDict, Request
from heron.kernels.cpu import Elementwise, elementwise

_SEED_MASK = (1 << 64) - 1  # torch generators take seeds in [0, 2**64)


@dataclass
class SamplerOutput:
    """What one sampler call returns: one token per row, and logprobs where asked."""

    sampled_token_ids: list[int]
    logprobs: list[LogprobsDict | None]


@dataclass
class _BatchParams:
    """Per-row sampling parameters of one call, as tensors on the logits' device."""

    greedy: list[bool]
    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows
    top_k: torch.Tensor  # [B] int64; 0 = disabled (also when >= V)
    top_p: torch.Tensor  # [B] float32; 1.0 = disabled
    min_p: torch.Tensor  # [B] float32; 0.0 = disabled
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    top_p_without_k: bool  # some row has top-p but no top-k: its nucleus size is unbounded

    @classmethod
    def build(
        cls, requests: Sequence[Request], vocab_size: int, device: torch.device
    ) -> _BatchParams:
        params = [r.sampling_params for r in requests]
        greedy = [p.temperature == 0.0 for p in params]
        temps = [1.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)]
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
        top_ps = [p.top_p for p in params]
        min_ps = [p.min_p for p in params]
        return cls(
            greedy=greedy,
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_ks, dtype=torch.int64, device=device),
            top_p=torch.tensor(top_ps, dtype=torch.float32, device=device),
            min_p=torch.tensor(min_ps, dtype=torch.float32, device=device),
            use_top_k=any(top_ks),
            use_top_p=any(p < 1.0 for p in top_ps),
            use_min_p=any(p > 0.0 for p in min_ps),
            top_p_without_k=any(p < 1.0 and k == 0 for p, k in zip(top_ps, top_ks, strict=True)),
        )

    def select(self, rows: torch.Tensor, row_list: list[int]) -> _BatchParams:
        """The parameters of a subset of rows (``rows`` as a tensor and as a list)."""
        return _BatchParams(
            greedy=[self.greedy[i] for i in row_list],
            temperature=self.temperature[rows],
            top_k=self.top_k[rows],
            top_p=self.top_p[rows],
            min_p=self.min_p[rows],
            use_top_k=self.use_top_k,
            use_top_p=self.use_top_p,
            use_min_p=self.use_min_p,
            top_p_without_k=self.top_p_without_k,
        )


class Sampler(nn.Module):
    """Batched sampler: greedy, temperature, top-k/top-p/min-p, penalties, bias, seeds, logprobs.

    ``seed`` seeds the engine-wide generator used by rows without their own
    ``SamplingParams.seed``; it is seeded once, so a fresh engine with the same
    seed and the same request stream samples the same tokens.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def forward(self, logits: torch.Tensor, requests: Sequence[Request]) -> SamplerOutput:
        """Sample one token per row of ``logits`` [B, V]; row ``i`` belongs to ``requests[i]``."""
        _check_batch(logits, requests)
        logits = logits.float()  # [B, V]; the input itself if already float32: never written
        logprobs = _compute_logprobs_inputs(logits, requests)
        if _needs_processing(requests):
            logits = self.process_logits(logits, requests)
        logits = apply_grammar_masks(logits, requests)  # a masked copy if any row is constrained
        if all(r.sampling_params.greedy for r in requests):
            token_ids = argmax(logits)  # [B]; the fast path
        else:
            token_ids = self._sample(logits, requests)
        sampled = token_ids.tolist()
        return SamplerOutput(sampled, _build_logprobs(logprobs, token_ids, sampled, len(requests)))

    def process_logits(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """float32 copy of ``logits`` [B, V] after logit_bias, min_tokens and the penalties."""
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)  # [B, V]
        out.copy_(logits)
        _apply_logit_bias(out, requests)
        _apply_min_tokens(out, requests)
        _apply_repetition_penalty(out, requests)
        _apply_presence_frequency(out, requests)
        return out

    def compute_probs(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """The distribution each row is sampled from, [B, V] float32, rows summing to 1.

        Sampled rows: softmax after processing, temperature and the top-k/top-p/min-p
        filters (renormalised over the kept tokens). Greedy rows: one-hot at the argmax.
        """
        _check_batch(logits, requests)
        processed = apply_grammar_masks(self.process_logits(logits, requests), requests)  # [B, V]
        params = _BatchParams.build(requests, processed.shape[-1], processed.device)
        probs = torch.softmax(_filter_logits(processed, params), dim=-1)  # [B, V]
        greedy_rows = [i for i, g in enumerate(params.greedy) if g]
        if greedy_rows:
            rows = torch.tensor(greedy_rows, device=probs.device)
            onehot = torch.zeros_like(probs[rows])
            onehot.scatter_(1, processed[rows].argmax(dim=-1, keepdim=True), 1.0)
            probs[rows] = onehot
        return probs

    def _sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """Processed logits [B, V] -> token ids [B]: argmax on greedy rows, a draw elsewhere."""
        params = _BatchParams.build(requests, logits.shape[-1], logits.device)
        row_list = [i for i, g in enumerate(params.greedy) if not g]
        if len(row_list) == len(requests):
            return self._draw(logits, params, requests)
        token_ids = argmax(logits)  # [B]
        if row_list:
            rows = torch.tensor(row_list, device=logits.device)
            sub_requests = [requests[i] for i in row_list]
            token_ids[rows] = self._draw(logits[rows], params.select(rows, row_list), sub_requests)
        return token_ids

    def _draw(
        self, logits: torch.Tensor, params: _BatchParams, requests: Sequence[Request]
    ) -> torch.Tensor:
        """Inverse-CDF draw from the filtered distribution of non-greedy rows [n, V] -> [n];
        in one compiled call on CPU (``sample_rows``: the same two-level search)."""
        uniforms = self._uniforms(requests, logits.device)  # [n] float64
        kernel = _float32_cpu_kernel(logits)
        if kernel is None:
            probs = torch.softmax(_filter_logits(logits, params), dim=-1)  # [n, V]
            return _inverse_cdf(probs, uniforms)
        if params.use_top_k or params.use_top_p or params.use_min_p:
            filtered = _filter_logits(logits, params)  # temperature already applied
            return kernel.sample_rows(filtered, torch.ones(len(requests)), uniforms)
        return kernel.sample_rows(logits, params.temperature, uniforms)

    def _uniforms(self, requests: Sequence[Request], device: torch.device) -> torch.Tensor:
        """One float64 uniform in [0, 1) per row: seeded rows from their own generator."""
        seeded = [i for i, r in enumerate(requests) if r.sampling_params.seed is not None]
        shared = self._engine_generator(device)
        if not seeded:
            return torch.rand(len(requests), generator=shared, dtype=torch.float64, device=device)
        draws = []
        for r in requests:
            gen = shared if r.sampling_params.seed is None else _request_generator(r, device)
            draws.append(torch.rand(1, generator=gen, dtype=torch.float64, device=device))
        return torch.cat(draws)  # [n]

    def _engine_generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed & _SEED_MASK)
            self._generators[device] = gen
        return gen


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for [B, V] float32 logits, through heron's compiled kernel on
    CPU (same ties and NaN rule; PyTorch's is scalar code, ~9 ms for 16 x 262,144)."""
    kernel = _float32_cpu_kernel(logits)
    return logits.argmax(dim=-1) if kernel is None else kernel.argmax_rows(logits)


def _float32_cpu_kernel(logits: torch.Tensor) -> Elementwise | None:
    """heron's compiled sampler kernels, where they apply: float32 logits on CPU."""
    return elementwise() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None


def apply_grammar_masks(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Logits [B, V] with every token a row's grammar forbids at -inf (a new tensor when some
    row has a grammar; ``logits`` itself, untouched, when none has).

    One bitmask [n, ceil(V/32)] is filled on the CPU for the n constrained rows, moved to the
    logits' device once, and unpacked there; free rows share the step unchanged.
    """
    rows = [i for i, r in enumerate(requests) if r.grammar is not None]
    grammars = [g for r in requests if (g := r.grammar) is not None]
    if not rows:
        return logits
    from heron.engine.structured import fill_bitmask, unpack_bitmask

    vocab = logits.shape[-1]
    bitmask = fill_bitmask(grammars, vocab)  # [n, W] int32
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), vocab)  # [n, V]
    if len(rows) == len(requests):
        return torch.where(allowed, logits, -math.inf)
    index = torch.tensor(rows, device=logits.device)
    masked = torch.where(allowed, logits[index], -math.inf)  # [n, V]
    return logits.index_copy(0, index, masked)


def _check_batch(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(requests):
        raise ValueError(
            f"logits must be [num_requests, vocab] with {len(requests)} rows, "
            f"got shape {tuple(logits.shape)}"
        )


def _request_generator(request: Request, device: torch.device) -> torch.Generator:
    """The request's own generator, created on first use from ``sampling_params.seed``."""
    if request.generator is None:
        gen = torch.Generator(device=device)
        gen.manual_seed((request.sampling_params.seed or 0) & _SEED_MASK)
        request.generator = gen
    return request.generator


_CDF_BLOCK = 512  # tokens per block of the two-level inverse CDF


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids [n] drawn from probs [n, V] with one uniform in [0, 1) per row (float64).

    Two levels keep the work to one pass over ``probs`` and keep float32 rounding from
    distorting rare tokens: block masses pick a block of 512 tokens, then a float64 cumsum
    over that block picks the token, the residual rescaled to the block's float64 total.
    The pick is the first entry whose cumulative mass exceeds the target, so a token of
    probability 0 is never drawn; a rounding overshoot falls back to the last positive one.

        probs  |  b0: p0 .. p511  |  b1: p512 .. p1023  |  ...  |  last block, zero-padded |
        level 1: block masses -> cumsum -> first above u * total -> block b, fraction f
        level 2: cumsum(probs of block b) -> first above f * mass(b) -> token b * 512 + j
    """
    n, vocab = probs.shape
    pad = (-vocab) % _CDF_BLOCK
    padded = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    blocks = padded.reshape(n, -1, _CDF_BLOCK)  # [n, num_blocks, block]
    block_mass = blocks.sum(dim=-1).double()  # [n, num_blocks]
    block_cdf = block_mass.cumsum(dim=-1)  # [n, num_blocks]
    target = (uniforms * block_cdf[:, -1]).unsqueeze(1)  # [n, 1]
    block = _first_above(block_cdf, target)  # [n, 1]
    mass = block_mass.gather(1, block)  # [n, 1], > 0
    fraction = (target - (block_cdf.gather(1, block) - mass)) / mass  # [n, 1], ~[0, 1)
    rows = torch.arange(n, device=probs.device)
    inner_cdf = blocks[rows, block.squeeze(1)].cumsum(dim=-1, dtype=torch.float64)  # [n, block]
    inner = _first_above(inner_cdf, fraction * inner_cdf[:, -1:])  # [n, 1]
    return (block * _CDF_BLOCK + inner).squeeze(1).clamp_(max=vocab - 1)


def _first_above(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[n, 1]: first index with cdf > target, capped at the first index reaching the total.

    The final clamp only matters for NaN rows (a broken model): an index, never a crash.
    """
    first = torch.searchsorted(cdf, target, right=True)  # [n, 1]
    last_positive = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)  # [n, 1]
    return torch.minimum(first, last_positive).clamp_(max=cdf.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------
# Logit processing (before temperature). Each step edits the float32 logits [B, V] in place and
# touches only rows whose parameters ask for it.
# ---------------------------------------------------------------------------------------------


def _needs_processing(requests: Sequence[Request]) -> bool:
    """Whether any row has bias, an active min_tokens or a penalty."""
    for r in requests:
        p = r.sampling_params
        if p.logit_bias or p.repetition_penalty != 1.0:
            return True
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            return True
        if p.all_stop_token_ids and r.num_output_tokens < p.min_tokens:
            return True
    return False


def _add_at(logits: torch.Tensor, rows: list[int], cols: list[int], values: list[float]) -> None:
    """logits[rows[j], cols[j]] += values[j], skipping ids outside the vocabulary."""
    vocab = logits.shape[-1]
    kept = [(r, c, v) for r, c, v in zip(rows, cols, values, strict=True) if 0 <= c < vocab]
    if not kept:
        return
    r_idx, c_idx, vals = zip(*kept, strict=True)
    device = logits.device
    index = (torch.tensor(r_idx, device=device), torch.tensor(c_idx, device=device))
    logits.index_put_(index, torch.tensor(vals, dtype=logits.dtype, device=device), accumulate=True)


def _apply_logit_bias(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for i, r in enumerate(requests):
        for token_id, bias in (r.sampling_params.logit_bias or {}).items():
            rows.append(i)
            cols.append(token_id)
            values.append(bias)
    _add_at(logits, rows, cols, values)


def _apply_min_tokens(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """Ban every stop token id while the request has fewer than min_tokens outputs."""
    rows: list[int] = []
    cols: list[int] = []
    for i, r in enumerate(requests):
        p = r.sampling_params
        if r.num_output_tokens < p.min_tokens:
            stop_ids = list(p.all_stop_token_ids)
            rows.extend([i] * len(stop_ids))
            cols.extend(stop_ids)
    _add_at(logits, rows, cols, [-math.inf] * len(rows))


def _flat_token_index(
    requests: Sequence[Request],
    rows: list[int],
    vocab: int,
    device: torch.device,
    output_only: bool,
) -> torch.Tensor:
    """Flat positions ``row * V + token`` of each listed row's tokens (duplicates kept)."""
    flat: list[int] = []
    for i in rows:
        r = requests[i]
        tokens = r.output_token_ids if output_only else r.token_ids
        base = i * vocab
        flat.extend(base + t for t in tokens if 0 <= t < vocab)
    return torch.tensor(flat, dtype=torch.int64, device=device)


def _row_values(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _apply_repetition_penalty(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """HF/vLLM: for tokens seen in prompt or output, x > 0 -> x / p, x <= 0 -> x * p.

    Only the seen positions are read and written (a gather and a scatter, no [B, V] pass);
    a token seen twice is written twice with the same value.
    """
    rows = [i for i, r in enumerate(requests) if r.sampling_params.repetition_penalty != 1.0]
    if not rows:
        return
    vocab, device = logits.shape[-1], logits.device
    flat = _flat_token_index(requests, rows, vocab, device, output_only=False)  # [T]
    penalty = _row_values([r.sampling_params.repetition_penalty for r in requests], device)  # [B]
    flat_logits = logits.view(-1)  # [B * V]
    seen = flat_logits[flat]  # [T]
    p = penalty[flat // vocab]  # [T]
    flat_logits[flat] = torch.where(seen > 0, seen / p, seen * p)


def _apply_presence_frequency(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """OpenAI: x -= frequency * count + presence * (count > 0), counting output tokens only.

    Counts come from one scatter_add into a [B, V] count tensor; only the positions of
    output tokens are then read and written.
    """
    rows = [
        i
        for i, r in enumerate(requests)
        if r.sampling_params.presence_penalty != 0.0 or r.sampling_params.frequency_penalty != 0.0
    ]
    if not rows:
        return
    vocab, device = logits.shape[-1], logits.device
    flat = _flat_token_index(requests, rows, vocab, device, output_only=True)  # [T]
    if flat.numel() == 0:
        return
    counts = torch.zeros(logits.numel(), dtype=torch.float32, device=device)  # [B * V]
    counts.scatter_add_(0, flat, torch.ones(flat.shape, dtype=torch.float32, device=device))
    freq = _row_values([r.sampling_params.frequency_penalty for r in requests], device)  # [B]
    pres = _row_values([r.sampling_params.presence_penalty for r in requests], device)  # [B]
    row = flat // vocab  # [T]
    flat_logits = logits.view(-1)  # [B * V]
    flat_logits[flat] = flat_logits[flat] - freq[row] * counts[flat] - pres[row]


# ---------------------------------------------------------------------------------------------
# Temperature and truncation (sampled rows only).
# ---------------------------------------------------------------------------------------------


_TOP_P_CANDIDATES = 1024  # first guess at the nucleus size; widened x16 when too small


def _filter_logits(logits: torch.Tensor, params: _BatchParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; removed tokens get -inf. [n, V] -> [n, V]."""
    out = logits / params.temperature.unsqueeze(1)  # [n, V]
    if params.use_top_p:
        out = _top_k_top_p(out, params)
    elif params.use_top_k:
        out = _top_k_only(out, params.top_k)
    if params.use_min_p:
        out = _min_p(out, params.min_p)
    return out


def _drop_below(logits: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """-inf where logits [n, V] < threshold [n, 1] (torch.where: faster than masked_fill)."""
    return torch.where(logits < threshold, -math.inf, logits)


def _top_k_threshold(sorted_desc: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """k-th largest logit per row ([n, 1]), or -inf where top-k is disabled (k == 0)."""
    index = (top_k - 1).clamp(min=0).unsqueeze(1)  # [n, 1]
    threshold = sorted_desc.gather(1, index)  # [n, 1]
    return threshold.masked_fill(top_k.unsqueeze(1) == 0, -math.inf)


def _top_k_only(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep logits >= the row's k-th largest (ties at the k-th value are all kept)."""
    values = logits.topk(int(top_k.max()), dim=-1).values  # [n, k_max], descending
    return _drop_below(logits, _top_k_threshold(values, top_k))


def _top_k_top_p(logits: torch.Tensor, params: _BatchParams) -> torch.Tensor:
    """top-k, then top-p on the renormalised top-k survivors.

    The nucleus is the shortest prefix of the descending order whose mass reaches top_p:
    a token is in it when the mass strictly before it is < top_p, so the most likely token
    always is. Its last logit becomes the row's threshold. The prefix is looked for among the
    top ``cand`` logits, and ``cand`` grows until every row's nucleus ends inside it.
    """
    vocab = logits.shape[-1]
    top_k, top_p = params.top_k, params.top_p.unsqueeze(1)  # [n], [n, 1]
    k_max = int(top_k.max())
    cand = min(vocab, max(k_max, _TOP_P_CANDIDATES if params.top_p_without_k else 1))
    values, index = logits.topk(cand, dim=-1)  # [n, cand] each, descending
    kept = _drop_below(logits, _top_k_threshold(values, top_k)) if k_max else logits  # [n, V]
    kept_probs = torch.softmax(kept, dim=-1)  # [n, V]
    while True:
        probs = kept_probs.gather(1, index)  # [n, cand]
        mass = probs.cumsum(dim=-1)  # [n, cand]
        covered = (mass[:, -1:] >= top_p) | (top_p >= 1.0)  # [n, 1]
        if cand == vocab or bool(covered.all()):
            break
        cand = min(vocab, cand * 16)
        values, index = logits.topk(cand, dim=-1)
    in_nucleus = (mass - probs < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)  # [n, 1]
    p_threshold = values.gather(1, in_nucleus - 1)  # [n, 1]
    return _drop_below(kept, p_threshold.masked_fill(top_p >= 1.0, -math.inf))


def _min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens with prob >= min_p * max_prob, i.e. logit >= max_logit + log(min_p)."""
    max_logit = logits.amax(dim=-1, keepdim=True)  # [n, 1]
    return _drop_below(logits, max_logit + torch.log(min_p).unsqueeze(1))  # log(0) = -inf


# ---------------------------------------------------------------------------------------------
# Logprobs: of the raw distribution (before any processing), OpenAI's definition.
# ---------------------------------------------------------------------------------------------


@dataclass
class _LogprobInputs:
    rows: list[int]  # batch rows that asked for logprobs
    num_top: list[int]  # k per such row
    logprobs: torch.Tensor  # [n, V] float32 log_softmax of the raw logits


def _compute_logprobs_inputs(
    logits: torch.Tensor, requests: Sequence[Request]
) -> _LogprobInputs | None:
    """log_softmax of the float32 raw logits [B, V], for the rows that asked only."""
    rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
    if not rows:
        return None
    if len(rows) < len(requests):
        logits = logits[torch.tensor(rows, device=logits.device)]
    logprobs = torch.log_softmax(logits, dim=-1)  # [n, V]
    num_top = [requests[i].sampling_params.logprobs or 0 for i in rows]
    return _LogprobInputs(rows, num_top, logprobs)


def _build_logprobs(
    inputs: _LogprobInputs | None, token_ids: torch.Tensor, sampled: list[int], batch: int
) -> list[LogprobsDict | None]:
    """Per row: {token: Logprob} for the top-k tokens (ranks 1..k) and the sampled token."""
    result: list[LogprobsDict | None] = [None] * batch
    if inputs is None:
        return result
    lp = inputs.logprobs  # [n, V]
    index = torch.tensor(inputs.rows, device=lp.device)
    chosen = token_ids[index].unsqueeze(1)  # [n, 1]
    chosen_lp = lp.gather(1, chosen)  # [n, 1]
    # A float sum of the mask: exact below 2**24 tokens, and far faster than a bool sum on CPU.
    chosen_rank = (lp > chosen_lp).float().sum(dim=-1).long() + 1  # [n]
    k_max = max(inputs.num_top)
    top_lp, top_ids = lp.topk(k_max, dim=-1) if k_max else (lp[:, :0], chosen[:, :0])
    chosen_lp_l, chosen_rank_l = chosen_lp.squeeze(1).tolist(), chosen_rank.tolist()
    top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
    for j, row in enumerate(inputs.rows):
        k = inputs.num_top[j]
        top = zip(top_ids_l[j][:k], top_lp_l[j][:k], strict=True)
        entry = {t: Logprob(v, rank + 1) for rank, (t, v) in enumerate(top)}
        entry[sampled[row]] = Logprob(chosen_lp_l[j], chosen_rank_l[j])
        result[row] = entry
    return result
