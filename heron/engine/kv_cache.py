"""KV cache manager: block ids, reference counts and the automatic prefix cache.

The runner owns the tensors; this module hands out block *ids* only. A request's
blocks live in ``request.block_ids`` (logical block ``i`` holds tokens
``[i * block_size, (i + 1) * block_size)``).

Free list, kept in eviction order (front = evicted next)::

    front -> [ b7 | b3 | b9 | ... | b1 ] <- tail
               ^ never cached, or cached long ago   ^ freed most recently

A freed block goes to the tail and keeps its prefix-cache entry until it is
handed out again. A request's blocks are freed last block first, so its deepest
(least shareable) blocks sit nearer the front and are evicted before its first ones.

Prefix cache: every FULL block gets a chained hash ``H(parent_hash, block_token_ids)``,
so a hash names the whole prefix up to the end of that block. The chain of a request with a
LoRA adapter starts from the adapter's own root (``chain_root``): the same tokens under another
adapter, or under none, have other K/V and never share blocks. A lookup walks a new
request's full blocks from the start and stops at the first miss; a hit also compares
the stored token ids. A hit never covers the last token of a request: the model must
compute at least that one to produce logits. Where all of a request's tokens are in cached
full blocks (a prompt sent again whose length is a multiple of the block size), the hit takes
every block and covers all tokens but the last, as llama.cpp's server does, not all but a
block's worth (vLLM): the last token is computed again, and its K/V, which its shared block
holds already, are written to a scratch slot instead (``Request.num_shared_tokens``, the
runner). A 128-token prompt sent twice computes 1 token the second time, not 16.

The scheduler uses three calls (``get_computed_blocks``, ``allocate_slots``, ``free``)
plus ``usage``, ``stats`` and ``reset_prefix_cache``.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from heron.engine.request import Request
    from heron.lora import LoRARequest

BlockHash = bytes


def hash_block(parent_hash: BlockHash | None, token_ids: tuple[int, ...]) -> BlockHash:
    """Chained hash of one full block: 128-bit BLAKE2b of the parent hash and the token ids.

    A cryptographic hash keeps one client from crafting a prompt whose blocks
    collide with another client's cached prefix.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent_hash if parent_hash is not None else b"\x00" * 16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def chain_root(lora: LoRARequest | None) -> BlockHash | None:
    """The parent hash of a request's first block: None for the base model, else a digest of
    its adapter (id, name and path: an id given to another adapter later starts another chain)."""
    if lora is None:
        return None
    digest = hashlib.blake2b(digest_size=16, person=b"heron-lora")
    digest.update(f"{lora.lora_int_id}\0{lora.lora_name}\0{lora.lora_path}".encode())
    return digest.digest()


@dataclass(slots=True)
class KVCacheBlock:
    """Bookkeeping for one block id of the pool."""

    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None  # set while the block is in the prefix cache
    token_ids: tuple[int, ...] | None = None  # the tokens it was cached with


@dataclass
class PrefixCacheStats:
    """Counted at each admission (a resumed request counts again): tokens looked up, tokens hit."""

    requests: int = 0
    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass
class _RequestCacheState:
    """Per-request memo: hashes of its full blocks so far, and how many of its blocks are cached."""

    block_hashes: list[BlockHash] = field(default_factory=list)
    num_cached_blocks: int = 0


class KVCacheManager:
    """Hands out block ids from a pool of ``num_blocks`` blocks of ``block_size`` tokens.

    Invariants:
      * a block is in the free list iff its ``ref_count`` is 0;
      * a block is in ``_cached`` iff its ``block_hash`` is set (free or not);
      * a block is published in the prefix cache once it is full of tokens that are
        computed in the step being scheduled: within one step the runner writes every
        new K/V into the cache before attention reads it, so a request admitted later
        in the same step (e.g. the other samples of an ``n > 1`` request) may share it.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVCacheBlock] = {}
        self._requests: dict[str, _RequestCacheState] = {}
        self.stats = PrefixCacheStats()

    # ------------------------------------------------------------------ the scheduler's calls

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of a request without blocks: (block ids, number of tokens).

        Covers whole blocks, but at most ``num_tokens - 1`` tokens (all blocks of a request
        whose tokens fill them: all tokens but the last). Takes nothing: pass the ids to
        ``allocate_slots`` to claim them.
        """
        if not self.enable_prefix_caching or request.needs_every_position:
            return [], 0  # prompt logprobs and pooling need every prompt position computed
        max_blocks = request.num_tokens // self.block_size
        hashes = self._block_hashes(request, max_blocks)
        hit_ids: list[int] = []
        for i, block_hash in enumerate(hashes[:max_blocks]):
            block = self._cached.get(block_hash)
            if block is None or block.token_ids != self._block_tokens(request, i):
                break
            hit_ids.append(block.block_id)
        return hit_ids, self._hit_tokens(request, len(hit_ids))

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[int] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``request``; False if the pool is short.

        ``new_computed_blocks`` are prefix-cache hits from ``get_computed_blocks`` for a
        request being admitted; they are claimed here and appended first. On False nothing
        changed. Does not touch ``request.num_computed_tokens`` (the scheduler does).
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be non-negative, got {num_new_tokens}")
        hits = [self.blocks[i] for i in new_computed_blocks or ()]
        if hits and request.block_ids:
            raise ValueError(f"request {request.request_id} already has blocks; hits are for admission")
        num_computed = request.num_computed_tokens + self._hit_tokens(request, len(hits))
        num_total = num_computed + num_new_tokens
        num_fresh = -(-num_total // self.block_size) - len(request.block_ids) - len(hits)
        num_hits_from_free = sum(1 for b in hits if b.ref_count == 0)
        if max(num_fresh, 0) + num_hits_from_free > len(self._free):
            return False
        if not request.block_ids:
            self._record_admission(request, self._hit_tokens(request, len(hits)))
        for block in hits:
            self._take(block)
        request.block_ids.extend(b.block_id for b in hits)
        if hits:
            request.num_shared_tokens = len(hits) * self.block_size
        request.block_ids.extend(self._pop_free().block_id for _ in range(num_fresh))
        state = self._state(request)
        state.num_cached_blocks = max(state.num_cached_blocks, len(hits))
        self._cache_full_blocks(request, min(num_total, request.num_tokens))
        return True

    def free(self, request: Request) -> None:
        """Release a request's blocks, last block first; cached ones stay reusable until evicted."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = block
        request.block_ids.clear()
        request.num_shared_tokens = 0
        self._requests.pop(request.request_id, None)

    # ------------------------------------------------------------------ stats and maintenance

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any request (cached free blocks included: they can be evicted)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by requests, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks held by requests stay allocated)."""
        for block in self._cached.values():
            block.block_hash = None
            block.token_ids = None
        self._cached.clear()

    # ------------------------------------------------------------------ internals

    def _record_admission(self, request: Request, num_hit_tokens: int) -> None:
        if self.enable_prefix_caching:
            self.stats.requests += 1
            self.stats.queries += request.num_tokens
            self.stats.hits += num_hit_tokens

    def _hit_tokens(self, request: Request, num_hit_blocks: int) -> int:
        """Tokens that ``num_hit_blocks`` hit blocks cover: all of them but a request's last."""
        return min(num_hit_blocks * self.block_size, request.num_tokens - 1) if num_hit_blocks else 0

    def _take(self, block: KVCacheBlock) -> None:
        """Add a reference to a cached block, taking it out of the free list if it was free."""
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def _pop_free(self) -> KVCacheBlock:
        """Take the block at the front of the free list, evicting its cached prefix if any."""
        _, block = self._free.popitem(last=False)
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
            block.token_ids = None
        block.ref_count = 1
        return block

    def _state(self, request: Request) -> _RequestCacheState:
        return self._requests.setdefault(request.request_id, _RequestCacheState())

    def _block_tokens(self, request: Request, index: int) -> tuple[int, ...]:
        start = index * self.block_size
        return tuple(request.token_ids[start:start + self.block_size])

    def _block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """Hashes of the request's first ``num_blocks`` full blocks (memoised, extended lazily)."""
        hashes = self._state(request).block_hashes
        while len(hashes) < num_blocks:
            parent = hashes[-1] if hashes else chain_root(request.lora_request)
            hashes.append(hash_block(parent, self._block_tokens(request, len(hashes))))
        return hashes

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Publish the request's blocks that are full within its first ``num_tokens`` tokens
        (a pooling request's KV is not kept: it publishes nothing)."""
        if not self.enable_prefix_caching or request.is_pooling:
            return
        state = self._state(request)
        num_full = num_tokens // self.block_size
        hashes = self._block_hashes(request, num_full)
        for i in range(state.num_cached_blocks, num_full):
            if hashes[i] in self._cached:
                continue  # same prefix computed twice: the first copy stays the cached one
            block = self.blocks[request.block_ids[i]]
            block.block_hash = hashes[i]
            block.token_ids = self._block_tokens(request, i)
            self._cached[hashes[i]] = block
        state.num_cached_blocks = max(state.num_cached_blocks, num_full)
