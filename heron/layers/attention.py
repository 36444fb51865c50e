"""Paged attention: a small backend interface and a torch backend for CPU and CUDA.

KV cache layout, one tensor per layer::

    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]
               |       |          |
               |       |          +-- token offset inside the block
               |       +-- block id (the KV cache manager hands these out)
               +-- 0 = keys, 1 = values

A token's *slot* is ``block_id * block_size + offset``; the runner computes one
slot per scheduled token (``slot_mapping``) and one block table row per request.

The flat batch holds the scheduled tokens of all requests back to back::

    tokens:  | req0 (chunk of a prompt, 5 tokens) | req1 (decode, 1) | req2 (decode, 1) |
    query_start_loc: [0, 5, 6, 7]

Decodes (one query token) are attended together in one padded call; each
prefill chunk is attended on its own, over its cached prefix plus its new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from heron.kernels.cpu import paged_decode_attention
from heron.layers.lora import LoRABatch

# Decode attention whose gathered K/V (all requests together) has at most this many slots runs
# in float32: CPU bf16 matmuls of these tiny shapes pay ~50 us of fixed cost (measured, 1 request
# x 144 keys: q.k 56 us in bf16, 15 us + 7 us conversion in float32; at 16 x 144 bf16 wins).
_FLOAT32_DECODE_MAX_SLOTS = 1024


@dataclass
class PrefillSpan:
    """One request whose scheduled chunk has more than one token."""

    start: int  # first token of the chunk in the flat batch
    end: int  # one past its last token
    seq_len: int  # context length after this step (cached prefix + chunk)
    block_table: torch.Tensor  # [num_blocks_for_seq] int64

    @property
    def query_len(self) -> int:
        return self.end - self.start


@dataclass
class DecodeView:
    """What the decode group reads in one layer kind (full, or one sliding window size)."""

    block_table: torch.Tensor  # [B, nb] int64: the blocks gathered for each request
    key_positions: torch.Tensor  # [B, nb * block_size] int64: position of each gathered slot
    mask: torch.Tensor  # [B, 1, 1, nb * block_size] bool: which of them the query may see
    hidden: torch.Tensor  # [B, 1, 1, nb * block_size] bool: ~mask, the slots to score -inf


@dataclass
class AttentionMetadata:
    """Everything attention needs about one step's batch; built once per step by the runner."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new K/V is written
    # Decode group: requests that have exactly one query token this step.
    decode_token_idx: torch.Tensor  # [num_decodes] int64: their positions in the flat batch
    decode_seq_lens: torch.Tensor  # [num_decodes] int64: context length including the new token
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64, padded with 0
    prefills: list[PrefillSpan]
    block_size: int
    _mask_cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_decodes(self) -> int:
        return int(self.decode_token_idx.numel())

    @property
    def decode_only(self) -> bool:
        """Every token of the step is a decode, so the decode group is the whole flat batch, in order."""
        return not self.prefills

    def decode_view(self, sliding_window: int | None) -> DecodeView:
        """The cache blocks each decode token reads, their key positions and the mask.

        Full attention reads every block of the request. A sliding window of W reads only the
        ``(W - 1) // block_size + 2`` blocks that can hold its last W positions, so local layers
        cost the same at 500 tokens of context as at 50,000::

            blocks of one request:  [0][1][2][3][4][5][6][7]      seq_len in block 7
            window W (3 blocks):                   [5][6][7]      gathered: first..first+nb
        """
        key = ("decode", sliding_window)
        if key not in self._mask_cache:
            self._mask_cache[key] = self._build_decode_view(sliding_window)
        return self._mask_cache[key]

    def _build_decode_view(self, sliding_window: int | None) -> DecodeView:
        table = self.decode_block_tables  # [B, max_blocks]
        num_decodes, max_blocks = table.shape
        bs, device = self.block_size, table.device
        seq = self.decode_seq_lens[:, None]  # [B, 1]
        cols = torch.arange(max_blocks, device=device)[None, :].expand(num_decodes, -1)  # [B, nb]
        num_window_blocks = max_blocks if sliding_window is None else (sliding_window - 1) // bs + 2
        if sliding_window is not None and num_window_blocks < max_blocks:
            first = ((seq - sliding_window).clamp(min=0) // bs).clamp(max=max_blocks - num_window_blocks)
            cols = first + torch.arange(num_window_blocks, device=device)[None, :]  # [B, nb]
            table = table.gather(1, cols)
        pos = (cols[:, :, None] * bs + torch.arange(bs, device=device)).flatten(1)  # [B, nb * bs]
        mask = pos < seq
        if sliding_window is not None:
            mask &= pos > seq - 1 - sliding_window
        mask = mask[:, None, None, :]
        return DecodeView(block_table=table, key_positions=pos, mask=mask, hidden=~mask)

    def prefill_mask(self, i: int, sliding_window: int | None) -> torch.Tensor:
        """[L, S] bool for prefill span i: causal over the prefix plus the chunk."""
        key = ("prefill", i, sliding_window)
        if key not in self._mask_cache:
            span = self.prefills[i]
            device = self.slot_mapping.device
            q_pos = torch.arange(span.seq_len - span.query_len, span.seq_len, device=device)[:, None]
            k_pos = torch.arange(span.seq_len, device=device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            self._mask_cache[key] = mask
        return self._mask_cache[key]


@dataclass
class ForwardContext:
    """Passed down through a model's forward: this step's metadata and every layer's KV cache."""

    attn_metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]  # one [2, num_blocks, block_size, num_kv_heads, head_dim] per layer
    lora: LoRABatch | None = None  # the step's rows that use LoRA adapters (None: no such row)


class AttentionBackend:
    """What a backend implements: write new K/V into the cache, then attend."""

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError


class TorchAttentionBackend(AttentionBackend):
    """Reference backend built on ``scaled_dot_product_attention``; runs on CPU and CUDA."""

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [T, H, D]   k, v: [T, Hkv, D]   kv_cache: [2, num_blocks, block_size, Hkv, D]
        slots = kv_cache.view(2, -1, layer.num_kv_heads, layer.head_dim)  # [2, num_slots, Hkv, D]
        slots.index_copy_(1, meta.slot_mapping, torch.stack((k, v)))  # keys and values in one write
        if meta.decode_only:
            return self._decode(layer, q, kv_cache, meta)
        out = torch.empty_like(q)  # [T, H, D]
        if meta.num_decodes:
            out[meta.decode_token_idx] = self._decode(layer, q[meta.decode_token_idx], kv_cache, meta)
        for i, span in enumerate(meta.prefills):
            out[span.start:span.end] = self._prefill(layer, i, span, q, k, v, kv_cache, meta)
        return out

    def _decode(self, layer: Attention, q: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # q: [B, H, D], one query token per decoding request -> [B, H, D]
        kernel = _cpu_decode_kernel(layer, q, kv_cache)
        if kernel is not None:  # reads the pages in place: no gather, no mask
            return kernel(q, kv_cache, meta.decode_block_tables, meta.decode_seq_lens,
                          layer.scale, layer.sliding_window)
        view = meta.decode_view(layer.sliding_window)
        num_decodes, num_slots = view.key_positions.shape
        dtype = q.dtype
        kv = kv_cache.index_select(1, view.block_table.flatten())  # [2, B * nb, block_size, Hkv, D]
        if num_decodes * num_slots <= _FLOAT32_DECODE_MAX_SLOTS and kv.dtype != torch.float32:
            kv, q = kv.float(), q.float()  # small: float32 matmuls are ~3x faster than bf16 here
        kv = kv.view(2, num_decodes, num_slots, layer.num_kv_heads, layer.head_dim).transpose(2, 3)
        keys, values = kv[0], kv[1]  # [B, Hkv, S, D]
        mask = view.hidden  # [B, 1, 1, S] bool
        if layer.alibi_slopes is not None:
            q_pos = (meta.decode_seq_lens - 1)[:, None, None, None]  # [B, 1, 1, 1]
            k_pos = view.key_positions[:, None, None, :]  # [B, 1, 1, S]
            mask = _alibi_bias(layer.alibi_slopes, k_pos - q_pos, view.mask)  # [B, H, 1, S]
        return _decode_attention(q, keys, values, mask, layer).to(dtype)  # [B, H, D]

    def _prefill(self, layer: Attention, i: int, span: PrefillSpan, q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        # q: [T, H, D] -> the span's [L, H, D]
        kernel = _cpu_decode_kernel(layer, q, kv_cache)
        if kernel is not None:
            # Each row of the chunk is a query over its own context, read from the pages (its
            # K/V were written above) as a decode step reads them: no mask, a window per row.
            # Against scaled_dot_product_attention, a 2,000-token prompt of the default model
            # (its local layers need a mask) 2.96-3.12 -> 1.49-1.62 s, its 16 x 128-token
            # prefill 1.39-1.46 -> 1.26-1.34 s, the second model's 3.89-4.36 -> 3.68-3.92 s.
            lens = torch.arange(span.seq_len - span.query_len + 1, span.seq_len + 1)
            tables = span.block_table[None, :].expand(span.query_len, -1)
            return kernel(q[span.start:span.end], kv_cache, tables, lens, layer.scale,
                          layer.sliding_window)
        slots = kv_cache.view(2, -1, layer.num_kv_heads, layer.head_dim)  # [2, num_slots, Hkv, D]
        key_cache, value_cache = slots[0], slots[1]
        qp = q[span.start:span.end].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
        if span.seq_len == span.query_len:
            # No cached prefix: the chunk's own K/V are the whole context.
            keys, values = k[span.start:span.end], v[span.start:span.end]  # [L, Hkv, D]
        else:
            slots = _slots_of(span, meta.block_size)  # [S]
            keys, values = key_cache[slots], value_cache[slots]  # [S, Hkv, D]
        keys = keys.transpose(0, 1).unsqueeze(0)  # [1, Hkv, S, D]
        values = values.transpose(0, 1).unsqueeze(0)
        if layer.alibi_slopes is None and layer.sliding_window is None and span.seq_len == span.query_len:
            out = _sdpa(qp, keys, values, None, layer, is_causal=True)
        else:
            mask = meta.prefill_mask(i, layer.sliding_window)  # [L, S]
            if layer.alibi_slopes is not None:
                q_pos = torch.arange(span.seq_len - span.query_len, span.seq_len, device=q.device)
                k_pos = torch.arange(span.seq_len, device=q.device)
                mask = _alibi_bias(layer.alibi_slopes, k_pos[None, :] - q_pos[:, None], mask)
            out = _sdpa(qp, keys, values, mask, layer)  # [1, H, L, D]
        return out.squeeze(0).transpose(0, 1)  # [L, H, D]


def _cpu_decode_kernel(layer: Attention, q: torch.Tensor, kv_cache: torch.Tensor):
    """heron's compiled decode attention where it applies (decode rows, and each row of a
    prompt chunk): CPU, bfloat16, no ALiBi, D % 32 == 0."""
    if (q.device.type != "cpu" or q.dtype != torch.bfloat16 or kv_cache.dtype != torch.bfloat16
            or layer.alibi_slopes is not None or layer.head_dim % 32
            or layer.num_heads // layer.num_kv_heads > 16):
        return None
    return paged_decode_attention()


def _slots_of(span: PrefillSpan, block_size: int) -> torch.Tensor:
    """[seq_len] int64: the cache slot of every position of a request's context."""
    offsets = torch.arange(block_size, device=span.block_table.device)
    slots = (span.block_table[:, None] * block_size + offsets[None, :]).flatten()
    return slots[:span.seq_len]


def _alibi_bias(slopes: torch.Tensor, distance: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float mask: slope[h] * (k_pos - q_pos) where allowed, -inf elsewhere.

    decode: distance, mask [B, 1, 1, S] -> [B, H, 1, S]; prefill: [L, S] -> [H, L, S].
    """
    bias = slopes.view(-1, 1, 1) * distance.to(slopes.dtype)
    return bias.masked_fill(~mask, float("-inf"))


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor, layer: Attention) -> torch.Tensor:
    """One query token per request, as two batched matmuls with the softmax in float32.

    torch's CPU SDPA kernel is 10-20x slower than this for single-token queries in bfloat16
    (measured: 16 requests x 528 keys, 8.2 ms vs 0.43 ms per layer). The query heads that share
    a K/V head are stacked as rows, so GQA needs no copy of K/V.
    """
    # q: [B, H, D]; keys, values: [B, Hkv, S, D]
    # mask: [B, 1, 1, S] bool, True where hidden; or an additive [B, H, 1, S] float bias (ALiBi)
    num_decodes, num_slots = keys.shape[0], keys.shape[2]
    group = layer.num_heads // layer.num_kv_heads
    q = q.reshape(num_decodes, layer.num_kv_heads, group, layer.head_dim)  # [B, Hkv, G, D]
    scores = torch.matmul(q, keys.transpose(-1, -2)).float()  # [B, Hkv, G, S]
    scores *= layer.scale
    if mask.dtype == torch.bool:
        scores.masked_fill_(mask.view(num_decodes, 1, 1, num_slots), float("-inf"))
    else:
        scores += mask.view(num_decodes, layer.num_kv_heads, group, num_slots)
    probs = scores.softmax(dim=-1).to(values.dtype)  # [B, Hkv, G, S]
    out = torch.matmul(probs, values)  # [B, Hkv, G, D]
    return out.view(num_decodes, layer.num_heads, layer.head_dim)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          layer: Attention, is_causal: bool = False) -> torch.Tensor:
    # q: [B, H, L, D]; k, v: [B, Hkv, S, D]. enable_gqa shares each K/V head with its group of
    # query heads without copying (measured 3x faster than repeat_interleave for Gemma's 4:1).
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          scale=layer.scale,
                                          enable_gqa=layer.num_kv_heads != layer.num_heads)


class Attention(nn.Module):
    """One model layer's attention over the paged cache. Owns no weights.

    ``forward(q, k, v, ctx)`` takes flat projections ``q: [T, H * D]``, ``k, v:
    [T, Hkv * D]`` (rotary already applied) and returns ``[T, H * D]``.
    """

    alibi_slopes: torch.Tensor | None  # [H] float32 buffer (MPT), None without ALiBi

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, layer_idx: int,
                 scale: float | None = None, sliding_window: int | None = None,
                 alibi_slopes: torch.Tensor | None = None,
                 backend: AttentionBackend | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.layer_idx = layer_idx
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.backend = backend or TorchAttentionBackend()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        kv_cache = ctx.kv_caches[self.layer_idx]
        out = self.backend.forward(self, q, k, v, kv_cache, ctx.attn_metadata)  # [T, H, D]
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
