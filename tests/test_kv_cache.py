"""KV cache manager: block ids, free-list order, prefix hits, refcounts (CPU, no model)."""

from __future__ import annotations

import pytest

from heron.engine import kv_cache as kv_cache_module
from heron.engine.kv_cache import KVCacheManager, hash_block
from heron.engine.request import Request
from heron.sampling_params import SamplingParams


def make_request(request_id: str, token_ids: list[int], **params: object) -> Request:
    return Request(request_id, list(token_ids), SamplingParams(**params), max_tokens=16)


def compute(kv: KVCacheManager, request: Request, num_new: int,
            hits: list[int] | None = None, num_hit: int = 0) -> None:
    """Allocate like the scheduler does, then mark the tokens computed like the runner would."""
    assert kv.allocate_slots(request, num_new, hits)
    request.num_computed_tokens += num_hit + num_new


def test_allocation_and_free_order() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_request("a", list(range(10)))
    b = make_request("b", list(range(100, 105)))
    assert kv.allocate_slots(a, 10)
    assert a.block_ids == [0, 1, 2]
    assert kv.allocate_slots(b, 5)
    assert b.block_ids == [3, 4]
    assert kv.num_free_blocks == 3
    assert kv.usage == pytest.approx(5 / 8)

    kv.free(a)  # tail first: 2, 1, 0 go behind 5, 6, 7
    assert a.block_ids == []
    assert kv.num_free_blocks == 6
    c = make_request("c", list(range(200, 224)))
    assert kv.allocate_slots(c, 24)
    assert c.block_ids == [5, 6, 7, 2, 1, 0]
    assert kv.usage == 1.0


def test_growing_request_gets_one_block_per_block_size_tokens() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    r = make_request("r", [1, 2, 3])
    compute(kv, r, 3)
    assert r.block_ids == [0]
    r.append_output_token(4)
    compute(kv, r, 1)  # token 4 still fits in block 0
    assert r.block_ids == [0]
    r.append_output_token(5)
    compute(kv, r, 1)
    assert r.block_ids == [0, 1]


def test_failed_allocation_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(12)))
    assert kv.allocate_slots(a, 12)
    b = make_request("b", list(range(50, 58)))
    assert not kv.allocate_slots(b, 8)
    assert b.block_ids == []
    assert kv.num_free_blocks == 1
    assert kv.stats.queries == 12  # only a's admission counted


def test_failed_allocation_with_hits_keeps_hit_blocks_free_and_cached() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    compute(kv, a, 5)
    kv.free(a)  # free list: 3, 2, 1, 0 (blocks 0, 1 cached)
    b = make_request("b", [9, 8, 7, 6])
    compute(kv, b, 4)
    assert b.block_ids == [3, 2]
    c = make_request("c", [1, 2, 3, 4, 5])
    hits, num_hit = kv.get_computed_blocks(c)
    assert (hits, num_hit) == ([0, 1], 4)
    # c needs its 2 hit blocks (both free) plus 1 fresh block: 3 > 2 free blocks.
    assert not kv.allocate_slots(c, 1, hits)
    assert c.block_ids == []
    assert kv.num_free_blocks == 2
    assert [kv.blocks[i].ref_count for i in range(4)] == [0, 0, 1, 1]
    assert kv.get_computed_blocks(c) == ([0, 1], 4)
    assert (kv.stats.requests, kv.stats.queries, kv.stats.hits) == (2, 9, 0)


def test_prefix_hits_and_misses() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(1, 11))  # blocks [1..4] [5..8] + partial [9, 10]
    a = make_request("a", prompt)
    assert kv.get_computed_blocks(a) == ([], 0)
    compute(kv, a, 10)
    assert a.block_ids == [0, 1, 2]
    assert kv.num_cached_blocks == 2  # the partial block is never cached

    same = make_request("same", prompt)
    assert kv.get_computed_blocks(same) == ([0, 1], 8)
    longer = make_request("longer", prompt[:8] + [77, 78, 79, 80, 81])
    assert kv.get_computed_blocks(longer) == ([0, 1], 8)
    second_block_differs = make_request("diff2", prompt[:5] + [99] + prompt[6:])
    assert kv.get_computed_blocks(second_block_differs) == ([0], 4)
    first_block_differs = make_request("diff1", [99] + prompt[1:])
    assert kv.get_computed_blocks(first_block_differs) == ([], 0)
    # Same second block after a different first block: the chained hash misses.
    assert kv.get_computed_blocks(make_request("chain", [0, 0, 0, 0] + prompt[4:8] + [1])) == ([], 0)


def test_hit_covers_every_token_but_the_last() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", list(range(1, 10)))  # 9 tokens: 2 full blocks
    compute(kv, a, 9)
    assert kv.get_computed_blocks(make_request("b", list(range(1, 10)))) == ([0, 1], 8)
    # 8 tokens = exactly 2 full cached blocks: both are hits, the last token is computed again
    assert kv.get_computed_blocks(make_request("c", list(range(1, 9)))) == ([0, 1], 7)
    assert kv.get_computed_blocks(make_request("d", list(range(1, 5)))) == ([0], 3)
    assert kv.get_computed_blocks(make_request("e", list(range(1, 6)))) == ([0], 4)
    assert kv.get_computed_blocks(make_request("f", [1])) == ([], 0)


def test_a_whole_hit_shares_the_last_block_and_takes_no_fresh_one() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", list(range(1, 9)))
    compute(kv, a, 8)
    c = make_request("c", list(range(1, 9)))
    hits, num_hit = kv.get_computed_blocks(c)
    assert (hits, num_hit) == ([0, 1], 7)
    free = kv.num_free_blocks
    compute(kv, c, 1, hits, num_hit)  # the last prompt token: its K/V are in block 1 already
    assert c.block_ids == [0, 1] and kv.num_free_blocks == free
    assert c.num_shared_tokens == 8 and a.num_shared_tokens == 0
    assert [kv.blocks[i].ref_count for i in (0, 1)] == [2, 2]
    assert (kv.stats.requests, kv.stats.hits) == (2, 7)
    c.append_output_token(50)
    compute(kv, c, 1)  # the first output token opens block 2
    assert len(c.block_ids) == 3 and c.num_shared_tokens == 8
    kv.free(c)
    assert c.num_shared_tokens == 0 and [kv.blocks[i].ref_count for i in (0, 1)] == [1, 1]


def test_hash_collision_is_caught_by_token_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    def colliding_hash(parent: bytes | None, token_ids: tuple[int, ...]) -> bytes:
        return (parent or b"") + b"x"  # depends on the block index only

    monkeypatch.setattr(kv_cache_module, "hash_block", colliding_hash)
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = make_request("a", list(range(1, 10)))
    compute(kv, a, 9)
    assert kv.num_cached_blocks == 2
    other = make_request("other", list(range(101, 110)))
    assert kv.get_computed_blocks(other) == ([], 0)
    half = make_request("half", list(range(1, 5)) + list(range(105, 110)))
    assert kv.get_computed_blocks(half) == ([0], 4)


def test_hash_is_chained_and_content_based() -> None:
    h1 = hash_block(None, (1, 2, 3, 4))
    assert hash_block(None, (1, 2, 3, 4)) == h1
    assert hash_block(None, (1, 2, 3, 5)) != h1
    assert hash_block(h1, (5, 6, 7, 8)) != hash_block(None, (5, 6, 7, 8))
    assert len(h1) == 16


def test_hit_on_free_cached_block_takes_it_out_of_free_list() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(1, 11))
    a = make_request("a", prompt)
    compute(kv, a, 10)
    kv.free(a)  # free list: 3 4 5 6 7 2 1 0
    assert kv.num_free_blocks == 8
    assert kv.num_cached_blocks == 2
    b = make_request("b", prompt)
    hits, num_hit = kv.get_computed_blocks(b)
    compute(kv, b, 2, hits, num_hit)
    assert b.block_ids == [0, 1, 3]
    assert b.num_computed_tokens == 10
    assert kv.num_free_blocks == 5
    assert [kv.blocks[i].ref_count for i in (0, 1, 2, 3)] == [1, 1, 0, 1]
    assert (kv.stats.requests, kv.stats.queries, kv.stats.hits) == (2, 20, 8)
    assert kv.stats.hit_rate == pytest.approx(0.4)


def test_lru_eviction_order() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    compute(kv, a, 5)
    assert a.block_ids == [0, 1, 2]
    kv.free(a)  # free list: 3, 2 (partial), 1 (cached), 0 (cached)
    assert kv.num_cached_blocks == 2

    b = make_request("b", [50, 51])
    compute(kv, b, 2)
    assert b.block_ids == [3]
    assert kv.get_computed_blocks(make_request("probe", [1, 2, 3, 4, 5])) == ([0, 1], 4)
    kv.free(b)  # free list: 2, 1, 0, 3 (3 now caches [50, 51])

    c = make_request("c", [60, 61, 62])
    compute(kv, c, 3)
    assert c.block_ids == [2, 1]  # evicts a's last block before its first
    assert kv.get_computed_blocks(make_request("probe", [1, 2, 3, 4, 5])) == ([0], 2)
    d = make_request("d", [70])
    compute(kv, d, 1)
    assert d.block_ids == [0]
    assert kv.get_computed_blocks(make_request("probe", [1, 2, 3, 4, 5])) == ([], 0)
    # b's block, freed last, survived everything else.
    assert kv.get_computed_blocks(make_request("probe_b", [50, 51, 52])) == ([3], 2)
    assert kv.num_cached_blocks == 2  # [50, 51] and c's full block [60, 61]


def test_refcounts_with_two_requests_sharing_a_prompt() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(1, 11))
    a = make_request("a", prompt)
    compute(kv, a, 10)
    b = make_request("b", prompt)  # e.g. the second sample of an n=2 request
    hits, num_hit = kv.get_computed_blocks(b)
    assert (hits, num_hit) == ([0, 1], 8)
    compute(kv, b, 2, hits, num_hit)
    assert b.block_ids == [0, 1, 3]
    assert [kv.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    assert kv.usage == pytest.approx(4 / 8)

    kv.free(a)
    assert [kv.blocks[i].ref_count for i in range(4)] == [1, 1, 0, 1]
    assert kv.num_free_blocks == 5
    kv.free(b)
    assert [kv.blocks[i].ref_count for i in range(8)] == [0] * 8
    assert kv.num_free_blocks == 8
    assert kv.num_cached_blocks == 2


def test_blocks_filled_by_chunks_and_decode_are_cached() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(1, 11))
    a = make_request("a", prompt)
    compute(kv, a, 5)  # chunk 1: tokens 0..4
    assert a.block_ids == [0, 1]
    assert kv.num_cached_blocks == 1
    assert kv.get_computed_blocks(make_request("p", prompt)) == ([0], 4)
    compute(kv, a, 5)  # chunk 2: tokens 5..9
    assert kv.num_cached_blocks == 2
    assert kv.get_computed_blocks(make_request("p", prompt)) == ([0, 1], 8)
    for token in (11, 12):  # decode: the sampled token is computed in the next step
        a.append_output_token(token)
        compute(kv, a, 1)
    assert kv.num_cached_blocks == 3
    assert kv.get_computed_blocks(make_request("p", prompt + [11, 12, 13])) == ([0, 1, 2], 12)


def test_disabled_prefix_caching() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    prompt = list(range(1, 11))
    a = make_request("a", prompt)
    compute(kv, a, 10)
    b = make_request("b", prompt)
    assert kv.get_computed_blocks(b) == ([], 0)
    compute(kv, b, 10)
    assert b.block_ids == [3, 4, 5]
    assert kv.num_cached_blocks == 0
    assert [kv.blocks[i].ref_count for i in range(6)] == [1] * 6
    assert (kv.stats.queries, kv.stats.hits) == (0, 0)


def test_prompt_logprobs_request_gets_no_hit() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    compute(kv, make_request("a", list(range(1, 11))), 10)
    b = make_request("b", list(range(1, 11)), prompt_logprobs=1)
    assert kv.get_computed_blocks(b) == ([], 0)


def test_reset_prefix_cache() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(1, 11)))
    compute(kv, a, 10)
    kv.reset_prefix_cache()
    assert kv.num_cached_blocks == 0
    assert kv.get_computed_blocks(make_request("b", list(range(1, 11)))) == ([], 0)
    assert a.block_ids == [0, 1, 2]  # held blocks stay allocated
    a.append_output_token(11)
    a.append_output_token(12)
    compute(kv, a, 2)  # block 2 fills up: cached again, the old ones are not re-published
    assert kv.num_cached_blocks == 1
    kv.free(a)
    assert kv.num_free_blocks == 8


def test_validation() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(num_blocks=0, block_size=4)
    kv = KVCacheManager(num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="num_new_tokens"):
        kv.allocate_slots(make_request("a", [1]), -1)
