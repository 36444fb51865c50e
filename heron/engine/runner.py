"""The model runner: one flat batch per step, one forward pass, one batched sample.

From the scheduler's list of (request, num_new_tokens) it builds::

    input_ids     [T]  the scheduled tokens of every request, back to back
    positions     [T]  their positions in their own sequences
    slot_mapping  [T]  cache slot = block_id * block_size + offset, where each new K/V goes
                       (a scratch slot for a token whose shared prefix-cache block holds its
                       K/V already: ``Request.num_shared_tokens``)
    decode group       requests with one new token: token index, context length, block table row
    prefill spans      requests with a chunk of several tokens: [start, end), context length, blocks
    LoRA rows          the flat indices of each adapter's requests (``ForwardContext.lora``)

then runs the model once over all T tokens and samples one token for each
request whose tokens are all computed after this step (its prompt is complete).

A pooling request's chunk always goes in as a prefill span (even a 1-token one, so that a
step of pooling requests never takes a model's decode-only path): its hidden states are pooled
(``Request.pooled``), nothing is sampled. A step with a pooling request has at least
``POOLING_MIN_ROWS`` tokens, padded with a throw-away span whose K/V go to scratch blocks past
the pool's end: float32 matmuls of fewer rows take other kernels (MKL: 1-3, 5-7 and 9-11 rows
give other bits than the same rows among more), and a text's vector must not depend on
whether it was embedded alone or in a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from heron.engine.lora import LoRAManager
from heron.engine.request import Logprob, LogprobsDict, Request
from heron.engine.sampler import Sampler, load_sampler_kernels, top_tokens
from heron.engine.sampling_batch import (
    GrammarMask,
    RequestTensors,
    SamplingBatch,
    SamplingRow,
    seeded_generator,
)
from heron.engine.scheduler import SchedulerOutput
from heron.engine.structured import fill_bitmask
from heron.heap import no_huge_pages
from heron.layers.attention import AttentionMetadata, ForwardContext, PrefillSpan
from heron.layers.lora import LoRABatch
from heron.models.base import CausalLM


@dataclass
class StepBatch:
    """The flat batch of one step, before it goes to the device."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn_metadata: AttentionMetadata
    sample_idx: torch.Tensor  # [num_sampled] int64: last token of each request that samples
    sample_requests: list[Request]
    # (request, flat index, position, length) of each request that wants prompt logprobs
    prompt_logprob_rows: list[tuple[Request, int, int, int]]
    pool_rows: list[tuple[Request, int, int, int]]  # pooling requests: the same tuple
    lora_rows: dict[int, list[int]]  # lora_int_id -> flat indices of its requests' tokens


POOLING_MIN_ROWS = 16


class ModelRunner:
    """Owns the model, the KV cache tensors and the sampler."""

    def __init__(self, model: CausalLM, device: torch.device, dtype: torch.dtype,
                 num_blocks: int, block_size: int, seed: int = 0,
                 lora: LoRAManager | None = None) -> None:
        self.model = model
        self.lora = lora  # the engine's adapters (None: LoRA not enabled)
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.sampler = Sampler(seed=seed)
        if device.type == "cpu":
            load_sampler_kernels()
        self._piece_rows: int | None = None  # prompt-logprob rows per piece, once the vocab is seen
        # Scratch blocks past the pool (never handed out) take the K/V of padding tokens, and
        # of a token computed again whose shared block holds its K/V (never read from there).
        num_scratch = -(-POOLING_MIN_ROWS // block_size)
        self.scratch_blocks = torch.arange(num_blocks, num_blocks + num_scratch, device=device)
        # One [2, num_blocks + num_scratch, block_size, num_kv_heads, head_dim] tensor per layer.
        shape = (2, num_blocks + num_scratch, block_size, model.num_kv_heads, model.head_dim)
        self.kv_caches = [_zeros(shape, dtype, device) for _ in range(model.num_layers)]
        model.prepare_decode(self.kv_caches)  # models with a fused decode path set it up

    @staticmethod
    def kv_bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers (keys and values)."""
        per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim
        return per_token * block_size * torch.empty((), dtype=dtype).element_size()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> tuple[dict[str, int], dict[str, LogprobsDict]]:
        """Run one step; returns the sampled token (and logprobs, when asked) per request id."""
        batch = self._build_batch(sched)
        ctx = ForwardContext(attn_metadata=batch.attn_metadata, kv_caches=self.kv_caches,
                             lora=self._lora_batch(batch))
        hidden = self.model(batch.input_ids, batch.positions, ctx)  # [T, hidden]
        if batch.prompt_logprob_rows:
            self._prompt_logprobs(hidden, batch)
        for req, flat, start, n in batch.pool_rows:
            _pool(req, hidden[flat:flat + n], start, self.model)
        if not batch.sample_requests:
            return {}, {}
        logits = self.model.compute_logits(hidden[batch.sample_idx])  # [num_sampled, vocab]
        sampling = self.sampling_batch(batch.sample_requests, logits.shape[-1])
        out = self.sampler(logits, sampling)
        sampled, logprobs = {}, {}
        for req, token, lp in zip(batch.sample_requests, out.sampled_token_ids, out.logprobs):
            sampled[req.request_id] = token
            if lp is not None:
                logprobs[req.request_id] = lp
        return sampled, logprobs

    def _lora_batch(self, batch: StepBatch) -> LoRABatch | None:
        if not batch.lora_rows:
            return None
        if self.lora is None:
            raise ValueError("a request names a LoRA adapter but LoRA is not enabled")
        return self.lora.batch(batch.lora_rows, int(batch.input_ids.numel()))

    def sampling_batch(self, requests: list[Request], vocab_size: int) -> SamplingBatch:
        """The sampler's input for the rows of ``requests``: their parameters and tokens, the
        generator of each seeded request (made on its first draw), its grammar's allowed tokens."""
        rows = [SamplingRow(r.sampling_params, r.token_ids, r.num_prompt_tokens,
                            self._generator(r), self._fixed_tensors(r, vocab_size)) for r in requests]
        grammar = _grammar_mask(requests, vocab_size)
        return SamplingBatch.build(rows, vocab_size, self.device, grammar)

    def _generator(self, request: Request) -> torch.Generator | None:
        """A seeded, sampled request's own generator; None for the rest (greedy rows draw
        nothing; unseeded rows use the sampler's engine-wide generator)."""
        seed = request.sampling_params.seed
        if seed is None or request.sampling_params.greedy:
            return None
        if request.generator is None:
            request.generator = seeded_generator(seed, self.device)
        return request.generator

    def _fixed_tensors(self, request: Request, vocab_size: int) -> RequestTensors:
        """A request's logit_bias and prompt ids as tensors, made on its first sampled step."""
        if request.fixed_tensors is None:
            request.fixed_tensors = RequestTensors.of(
                request.sampling_params, request.prompt_token_ids, vocab_size, self.device)
        return request.fixed_tensors

    def _build_batch(self, sched: SchedulerOutput) -> StepBatch:
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        decode_idx: list[int] = []
        decode_lens: list[int] = []
        decode_tables: list[list[int]] = []
        prefills: list[PrefillSpan] = []
        sample_idx: list[int] = []
        sample_requests: list[Request] = []
        prompt_rows: list[tuple[Request, int, int, int]] = []
        pool_rows: list[tuple[Request, int, int, int]] = []
        lora_rows: dict[int, list[int]] = {}
        bs = self.block_size
        for item in sched.scheduled:
            req, n = item.request, item.num_new_tokens
            start, flat = req.num_computed_tokens, len(input_ids)
            seq_len = start + n
            input_ids.extend(req.token_ids[start:seq_len])
            pos = torch.arange(start, seq_len)  # [n]
            blocks = torch.tensor(req.block_ids[:(seq_len + bs - 1) // bs], dtype=torch.long)
            positions.append(pos)
            slot = blocks[pos // bs] * bs + pos % bs
            shared = req.num_shared_tokens - start
            if shared > 0:  # the last token of a prompt whose blocks were all cached hits
                slot[:shared] = self.scratch_blocks[0] * bs + pos[:shared] % bs
            slots.append(slot)
            if n == 1 and not req.is_pooling:
                decode_idx.append(flat)
                decode_lens.append(seq_len)
                decode_tables.append(blocks.tolist())
            else:
                prefills.append(PrefillSpan(flat, flat + n, seq_len, blocks.to(self.device)))
            if req.is_pooling:
                pool_rows.append((req, flat, start, n))
            elif seq_len == req.num_tokens:
                sample_idx.append(flat + n - 1)
                sample_requests.append(req)
            if _wants_prompt_logprobs(req, start):
                prompt_rows.append((req, flat, start, n))
            if req.lora_id:
                lora_rows.setdefault(req.lora_id, []).extend(range(flat, flat + n))
        if pool_rows and len(input_ids) < POOLING_MIN_ROWS:
            prefills.append(self._padding(input_ids, positions, slots))
        max_blocks = max((len(t) for t in decode_tables), default=0)
        table = [t + [0] * (max_blocks - len(t)) for t in decode_tables]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(dev),
            decode_token_idx=torch.tensor(decode_idx, dtype=torch.long, device=dev),
            decode_seq_lens=torch.tensor(decode_lens, dtype=torch.long, device=dev),
            decode_block_tables=torch.tensor(table, dtype=torch.long, device=dev).view(
                len(table), max_blocks),
            prefills=prefills,
            block_size=bs,
        )
        return StepBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=torch.cat(positions).to(dev),
            attn_metadata=meta,
            sample_idx=torch.tensor(sample_idx, dtype=torch.long, device=dev),
            sample_requests=sample_requests,
            prompt_logprob_rows=prompt_rows,
            pool_rows=pool_rows,
            lora_rows=lora_rows,
        )

    def _padding(self, input_ids: list[int], positions: list[torch.Tensor],
                 slots: list[torch.Tensor]) -> PrefillSpan:
        """Extend the flat batch to ``POOLING_MIN_ROWS`` tokens with a span of its own over the
        scratch blocks (token 0 at positions 0..n-1); its outputs are ignored."""
        flat, n = len(input_ids), POOLING_MIN_ROWS - len(input_ids)
        input_ids.extend([0] * n)
        pos = torch.arange(n)  # [n]
        positions.append(pos)
        table = self.scratch_blocks.cpu()
        slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
        return PrefillSpan(flat, flat + n, n, self.scratch_blocks)

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: StepBatch) -> None:
        """Log-probabilities of each prompt token given the ones before it (for echo + logprobs),
        a few rows at a time: only the target's logprob and rank and the top-k of each row are
        kept, never a [rows, vocabulary] block for the whole chunk."""
        for req, flat, start, n in batch.prompt_logprob_rows:
            if req.prompt_logprobs is None:
                raise ValueError(f"request {req.request_id!r} has prompt logprob rows but no list")
            first = len(req.prompt_logprobs) - 1  # position whose next token is still unscored
            end = min(req.num_prompt_tokens - 1, start + n)
            k = req.sampling_params.prompt_logprobs or 0
            lo = first
            while lo < end:
                hi = min(end, lo + (self._piece_rows or 1))  # the first piece shows the vocab
                rows = hidden[flat + (lo - start): flat + (hi - start)]  # [m, hidden]
                logprobs = self._log_softmax(rows)  # [m, vocab]
                self._piece_rows = max(1, _LOGPROBS_PIECE_ELEMENTS // logprobs.shape[-1])
                targets = torch.tensor(req.prompt_token_ids[lo + 1:hi + 1], device=rows.device)
                req.prompt_logprobs.extend(_logprobs_dicts(logprobs, targets, k))
                lo = hi

    def _log_softmax(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [m, hidden] -> log-probabilities [m, vocab] float32, normalised in place."""
        logprobs = self.model.compute_logits(rows).float()  # [m, vocab]
        logprobs -= torch.logsumexp(logprobs, dim=-1, keepdim=True)
        return logprobs


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On CPU it comes from calloc (numpy), whose large blocks are fresh zero
    pages that the OS maps on first touch: a large KV pool costs no start-up time (torch.zeros
    writes all of it) and no memory until requests use it, page by small page (numpy's huge
    page advice is withdrawn: see ``heron.heap.no_huge_pages``). Zeros, not garbage, because
    decode attention reads the padding slots of a block (masked, but 0 * NaN would still be
    NaN)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buffer = np.zeros(nbytes, dtype=np.uint8)
    no_huge_pages(buffer.ctypes.data, nbytes)
    return torch.from_numpy(buffer).view(dtype).view(shape)


def _pool(req: Request, hidden: torch.Tensor, start: int, model: CausalLM) -> None:
    """Fold one chunk of a pooling request's final hidden states ([n, hidden], positions
    ``start..start + n``) into ``req.pooled``; after its last chunk that is the final vector
    (a classify request's: ``model``'s classifier logits of it)."""
    params = req.pooling_params
    if params is None:
        raise ValueError(f"request {req.request_id!r} has pool rows but no pooling params")
    rows = hidden.float()  # [n, hidden]
    if params.pooling == "last":
        req.pooled = rows[-1].clone()
    else:  # mean: a running sum in float32, divided at the end
        part = rows.sum(dim=0)  # [hidden]
        req.pooled = part if start == 0 or req.pooled is None else req.pooled + part
    if start + rows.shape[0] < req.num_tokens:
        return
    if params.pooling == "mean":
        req.pooled = req.pooled / req.num_tokens
    if params.normalize:
        req.pooled = F.normalize(req.pooled, dim=0)
    if params.classify:
        req.pooled = model.classify(req.pooled)  # [num_labels]
    req.pooled = req.pooled.cpu()


def _grammar_mask(requests: list[Request], vocab_size: int) -> GrammarMask | None:
    """The bitmask of the constrained rows, filled by their grammars (on the CPU)."""
    rows = [i for i, r in enumerate(requests) if r.grammar is not None]
    if not rows:
        return None
    grammars = [g for r in requests if (g := r.grammar) is not None]
    return GrammarMask(fill_bitmask(grammars, vocab_size), rows)


def _wants_prompt_logprobs(req: Request, start: int) -> bool:
    return req.sampling_params.prompt_logprobs is not None and start < req.num_prompt_tokens - 1


# Prompt logprobs hold [rows, vocabulary] float32 log-probabilities: this many elements at a time
# (32 MiB; 32 rows of Gemma 3's 262,144 tokens), eight pieces per step (the scheduler's cap).
_LOGPROBS_PIECE_ELEMENTS = 1 << 23


def prompt_logprobs_chunk(vocab_size: int) -> int:
    """Prompt tokens per step for a request that wants prompt logprobs (256 for a 262,144-token
    vocabulary, 16 at least): a stream decoding meanwhile pauses less than the same prompt
    without logprobs makes it pause (one step of up to 2,048 tokens), while the prompt itself
    pays little per-step overhead (smaller chunks shorten the pause little and cost it much)."""
    return max(16, 8 * _LOGPROBS_PIECE_ELEMENTS // vocab_size)


def _logprobs_dicts(logprobs: torch.Tensor, targets: torch.Tensor, k: int) -> list[LogprobsDict]:
    """logprobs: [m, vocab]; targets: [m] -> one {token: Logprob} per row (target first, then
    the top-k)."""
    target_lp = logprobs.gather(1, targets[:, None]).squeeze(1)  # [m]
    ranks = (logprobs > target_lp[:, None]).sum(dim=1) + 1  # [m]
    top_lp, top_ids = top_tokens(logprobs, k)  # [m, k] each, ties in token order
    out: list[LogprobsDict] = []
    for i in range(logprobs.shape[0]):
        entry = {int(targets[i]): Logprob(float(target_lp[i]), int(ranks[i]))}
        for j in range(k):
            entry.setdefault(int(top_ids[i, j]), Logprob(float(top_lp[i, j]), j + 1))
        out.append(entry)
    return out
