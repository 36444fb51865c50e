"""Batched sampling: one call turns a step's logits into one token per row.

The input is a ``SamplingBatch`` (``heron.engine.sampling_batch``): tensors the runner builds
once per step, row ``i`` for row ``i`` of the logits. Pipeline, on the whole ``[B, V]`` batch::

    raw logits (any float dtype) --float32--> logits
      |-- log_softmax(raw) ----------------------------> logprobs (rows that asked)
      v
    + logit_bias                        (OpenAI: added to the logit)
    min_tokens: stop ids -> -inf        (while the row has fewer than min_tokens outputs)
    repetition_penalty                  (HF/vLLM: prompt+output tokens, x>0: x/p, x<0: x*p)
    presence / frequency penalties      (OpenAI: x -= f * count + p * (count > 0), output only)
    grammar mask -> -inf                (structured outputs: the runner's bitmask, unpacked here)
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
``heron_sample_rows`` in ``kernels/cpu/elementwise.c``, faster than the PyTorch operators).
A seeded row takes its ``u`` from its own generator (``SamplingRow.generator``), and every
step of the pipeline is row-local, so its tokens do not depend on which other rows share the
batch or on their order; unseeded rows share the sampler's engine-wide generator. One random
number per row instead of one per vocabulary entry: an exponential race would cost a random
number for each of the (up to 262,144) entries of every row.

Logprobs are those of the raw distribution (OpenAI's definition); each row's entry lists the
sampled token first (it is what the text shows), then the top-k alternatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from heron.engine.request import Logprob, LogprobsDict
from heron.engine.sampling_batch import (
    DrawParams,
    GrammarMask,
    LogprobRows,
    Penalties,
    SamplingBatch,
    unpack_bitmask,
)
from heron.kernels.cpu import Elementwise, elementwise


@dataclass
class SamplerOutput:
    """What one sampler call returns: one token per row, and logprobs where asked."""

    sampled_token_ids: list[int]
    logprobs: list[LogprobsDict | None]


class Sampler(nn.Module):
    """Batched sampler: greedy, temperature, top-k/top-p/min-p, penalties, bias, seeds, logprobs.

    ``seed`` seeds the engine-wide generator used by rows without a generator of their own;
    it is seeded once, so a fresh engine with the same seed and the same request stream
    samples the same tokens.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample one token per row of ``logits`` [B, V], described by row of ``batch``."""
        _check_batch(logits, batch)
        logits = logits.float()  # [B, V]; the input itself if already float32: never written
        logprobs = _logprobs_of(logits, batch.logprobs)
        if batch.penalties is not None:
            logits = process_logits(logits, batch.penalties)
        logits = apply_grammar_mask(logits, batch.grammar)  # a masked copy if a row is constrained
        if batch.draw is None:
            token_ids = argmax(logits)  # [B]; all greedy: the fast path
        else:
            token_ids = self._sample(logits, batch.draw)
        sampled = token_ids.tolist()
        return SamplerOutput(sampled, _build_logprobs(logprobs, batch.logprobs, token_ids, sampled))

    def compute_probs(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The distribution each row is sampled from, [B, V] float32, rows summing to 1.

        Drawing rows: softmax after processing, temperature and the top-k/top-p/min-p
        filters (renormalised over the kept tokens). Greedy rows: one-hot at the argmax.
        """
        _check_batch(logits, batch)
        processed = logits.float()
        if batch.penalties is not None:
            processed = process_logits(processed, batch.penalties)
        processed = apply_grammar_mask(processed, batch.grammar)  # [B, V]
        probs = torch.zeros_like(processed).scatter_(1, argmax(processed).unsqueeze(1), 1.0)
        if batch.draw is not None:
            rows = torch.tensor(batch.draw.rows, device=probs.device)
            probs[rows] = torch.softmax(_filter_logits(processed[rows], batch.draw), dim=-1)
        return probs

    def _sample(self, logits: torch.Tensor, draw: DrawParams) -> torch.Tensor:
        """Processed logits [B, V] -> token ids [B]: argmax on greedy rows, a draw elsewhere."""
        if len(draw.rows) == logits.shape[0]:
            return self._draw(logits, draw)
        token_ids = argmax(logits)  # [B]
        rows = torch.tensor(draw.rows, device=logits.device)
        token_ids[rows] = self._draw(logits[rows], draw)
        return token_ids

    def _draw(self, logits: torch.Tensor, draw: DrawParams) -> torch.Tensor:
        """Inverse-CDF draw from the filtered distribution of the drawing rows [n, V] -> [n];
        in one compiled call on CPU (``sample_rows``: the same two-level search)."""
        uniforms = self._uniforms(draw.generators, logits.device)  # [n] float64
        kernel = _float32_cpu_kernel(logits)
        if kernel is None:
            probs = torch.softmax(_filter_logits(logits, draw), dim=-1)  # [n, V]
            return _inverse_cdf(probs, uniforms)
        if draw.use_top_k or draw.use_top_p or draw.use_min_p:
            filtered = _filter_logits(logits, draw)  # temperature already applied
            return kernel.sample_rows(filtered, torch.ones(len(draw.rows)), uniforms)
        return kernel.sample_rows(logits, draw.temperature, uniforms)

    def _uniforms(self, generators: list[torch.Generator | None],
                  device: torch.device) -> torch.Tensor:
        """One float64 uniform in [0, 1) per row: seeded rows from their own generator."""
        shared = self._engine_generator(device)
        if all(g is None for g in generators):
            return torch.rand(len(generators), generator=shared, dtype=torch.float64, device=device)
        draws = [torch.rand(1, generator=shared if g is None else g, dtype=torch.float64,
                            device=device) for g in generators]
        return torch.cat(draws)  # [n]

    def _engine_generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed & ((1 << 64) - 1))
            self._generators[device] = gen
        return gen


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for [B, V] float32 logits, through heron's compiled kernel on
    CPU (same ties and NaN rule; PyTorch's CPU argmax is scalar code)."""
    kernel = _float32_cpu_kernel(logits)
    return logits.argmax(dim=-1) if kernel is None else kernel.argmax_rows(logits)


def load_sampler_kernels() -> None:
    """Load (on a first start: compile) the sampler's CPU kernels now, while the engine starts,
    rather than in its first step: there the compiler's memory (~90 MiB) would add to the
    model's pages that the first forward pass has just read in, the first start's peak."""
    elementwise()


def _float32_cpu_kernel(logits: torch.Tensor) -> Elementwise | None:
    """heron's compiled sampler kernels, where they apply: float32 logits on CPU."""
    return elementwise() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None


def apply_grammar_mask(logits: torch.Tensor, grammar: GrammarMask | None) -> torch.Tensor:
    """Logits [B, V] with every token a row's grammar forbids at -inf (a new tensor when some
    row is constrained; ``logits`` itself, untouched, when none is).

    The bitmask [n, ceil(V/32)] of the n constrained rows moves to the logits' device once and
    is unpacked there; free rows pass unchanged.
    """
    if grammar is None:
        return logits
    vocab = logits.shape[-1]
    bitmask = grammar.bitmask.to(logits.device, non_blocking=True)  # [n, W] int32
    allowed = unpack_bitmask(bitmask, vocab)  # [n, V]
    if len(grammar.rows) == logits.shape[0]:
        return torch.where(allowed, logits, -math.inf)
    index = torch.tensor(grammar.rows, device=logits.device)
    masked = torch.where(allowed, logits[index], -math.inf)  # [n, V]
    return logits.index_copy(0, index, masked)


def _check_batch(logits: torch.Tensor, batch: SamplingBatch) -> None:
    if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
        raise ValueError(
            f"logits must be [num_rows, vocab] with {batch.num_rows} rows, "
            f"got shape {tuple(logits.shape)}"
        )


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


def process_logits(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """float32 copy of ``logits`` [B, V] after logit_bias, min_tokens and the penalties."""
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)  # [B, V]
    out.copy_(logits)
    flat = out.view(-1)  # [B * V]
    vocab = logits.shape[-1]
    flat.index_put_((penalties.bias_index,), penalties.bias_values, accumulate=True)
    flat.index_fill_(0, penalties.banned_index, -math.inf)  # min_tokens: stop ids banned
    if penalties.has_repetition:
        _apply_repetition_penalty(flat, penalties.seen_index, penalties.repetition, vocab)
    if penalties.has_presence_frequency:
        _apply_presence_frequency(flat, penalties, vocab)
    return out


def _apply_repetition_penalty(flat_logits: torch.Tensor, seen: torch.Tensor,
                              penalty: torch.Tensor, vocab: int) -> None:
    """HF/vLLM: for tokens seen in prompt or output, x > 0 -> x / p, x <= 0 -> x * p.

    Only the seen positions are read and written (a gather and a scatter, no [B, V] pass);
    a token seen twice is written twice with the same value.
    """
    values = flat_logits[seen]  # [S]
    p = penalty[seen // vocab]  # [S]
    flat_logits[seen] = torch.where(values > 0, values / p, values * p)


def _apply_presence_frequency(flat_logits: torch.Tensor, penalties: Penalties, vocab: int) -> None:
    """OpenAI: x -= frequency * count + presence * (count > 0), counting output tokens only.

    Counts come from the distinct positions of the output tokens (no [B, V] count tensor: 16 MB
    to clear every step at 16 rows of a 262k vocabulary); only those positions are read and
    written.
    """
    index, counts = torch.unique(penalties.output_index, return_counts=True)  # [U]
    row = index // vocab  # [U]
    flat_logits[index] = (flat_logits[index] - penalties.frequency[row] * counts.to(torch.float32)
                          - penalties.presence[row])


# ---------------------------------------------------------------------------------------------
# Temperature and truncation (sampled rows only).
# ---------------------------------------------------------------------------------------------


_TOP_P_CANDIDATES = 1024  # first guess at the nucleus size; widened x16 when too small


def _filter_logits(logits: torch.Tensor, params: DrawParams) -> torch.Tensor:
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


def _top_k_top_p(logits: torch.Tensor, params: DrawParams) -> torch.Tensor:
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


def _logprobs_of(logits: torch.Tensor, asked: LogprobRows | None) -> torch.Tensor | None:
    """log_softmax [n, V] of the float32 raw logits [B, V], for the rows that asked only."""
    if asked is None:
        return None
    if len(asked.rows) < logits.shape[0]:
        logits = logits[torch.tensor(asked.rows, device=logits.device)]
    return torch.log_softmax(logits, dim=-1)  # [n, V]


def top_tokens(lp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``lp`` [n, V] -> (values, token ids) [n, k],
    ties in token order. torch.topk orders ties by its own algorithm, which changes with k (and
    a step's k is the largest any of its rows asks for): a row's listed alternatives would
    depend on the batch. The selection is put in (value, token) order; a row whose (k+1)-th
    value ties its k-th (tokens left out at that value) is chosen again from all of them."""
    extra = min(k + 1, lp.shape[-1])
    values, ids = lp.topk(extra, dim=-1)  # [n, k + 1] each
    cut: list[int] = []
    if 0 < k < extra:
        cut = (values[:, k - 1] == values[:, k]).nonzero().flatten().tolist()
    values, ids = _in_token_order(values[:, :k], ids[:, :k])
    for row in cut:  # rare: a tie across the k-th place
        bound = lp[row, ids[row, -1]]
        above = (lp[row] > bound).nonzero().flatten()
        at = (lp[row] == bound).nonzero().flatten()[:k - above.numel()]
        chosen = torch.cat([above, at])
        values[row], ids[row] = _in_token_order(lp[row, chosen][None], chosen[None])
    return values, ids


def _in_token_order(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, k] values and their token ids, sorted by value (descending), then token id."""
    by_id = ids.sort(dim=-1).indices
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    order = values.sort(dim=-1, descending=True, stable=True).indices
    return values.gather(1, order), ids.gather(1, order)


def _build_logprobs(lp: torch.Tensor | None, asked: LogprobRows | None, token_ids: torch.Tensor,
                    sampled: list[int]) -> list[LogprobsDict | None]:
    """Per row that asked: {token: Logprob}, the sampled token first (with its rank in the raw
    distribution), then the top-k tokens (ranks 1..k) it is not among."""
    result: list[LogprobsDict | None] = [None] * len(sampled)
    if lp is None or asked is None:
        return result
    index = torch.tensor(asked.rows, device=lp.device)
    chosen = token_ids[index].unsqueeze(1)  # [n, 1]
    chosen_lp = lp.gather(1, chosen)  # [n, 1]
    # A float sum of the mask: exact below 2**24 tokens, and far faster than a bool sum on CPU.
    chosen_rank = (lp > chosen_lp).float().sum(dim=-1).long() + 1  # [n]
    top_lp, top_ids = top_tokens(lp, max(asked.num_top))  # [n, k_max] each
    chosen_lp_l, chosen_rank_l = chosen_lp.squeeze(1).tolist(), chosen_rank.tolist()
    top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
    for j, row in enumerate(asked.rows):
        entry = {sampled[row]: Logprob(chosen_lp_l[j], chosen_rank_l[j])}
        k = asked.num_top[j]
        for rank, (t, v) in enumerate(zip(top_ids_l[j][:k], top_lp_l[j][:k], strict=True), 1):
            entry.setdefault(t, Logprob(v, rank))
        result[row] = entry
    return result
