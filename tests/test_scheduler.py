"""Scheduler: token budget, chunked prefill, admission, preemption, stops (CPU, no model).

A fake runner stands in for the model: it samples a token for every scheduled
request whose tokens are all computed after this step, and checks that each
request's block table covers the tokens it will write.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from heron.config import CacheConfig, SchedulerConfig
from heron.engine.request import Logprob, Request, RequestStatus
from heron.engine.scheduler import Scheduler, SchedulerOutput
from heron.sampling_params import SamplingParams

TokenFn = Callable[[Request], int]


def next_token(request: Request) -> int:
    """Deterministic 'model': the next token depends only on the sequence length."""
    return 1000 + request.num_tokens


def make_scheduler(num_blocks: int, block_size: int = 4, max_num_batched_tokens: int = 64,
                   max_num_seqs: int = 8, max_model_len: int | None = None,
                   prefix_caching: bool = True, chunked_prefill: bool = True) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        enable_chunked_prefill=chunked_prefill),
        CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching),
        num_blocks=num_blocks,
        max_model_len=max_model_len or num_blocks * block_size,
    )


def make_request(request_id: str, prompt: list[int], max_tokens: int = 4,
                 **params: object) -> Request:
    return Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens, **params),
                   max_tokens=max_tokens)


def step(sched: Scheduler, token_fn: TokenFn = next_token,
         plan: list[tuple[str, int, int]] | None = None) -> SchedulerOutput:
    """One engine step with a fake runner. ``plan`` collects (id, chunk start, num tokens)."""
    out = sched.schedule()
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
    assert len(out.scheduled) <= sched.config.max_num_seqs
    sampled = {}
    for s in out.scheduled:
        r = s.request
        assert s.num_new_tokens >= 1
        assert len(r.block_ids) * sched.kv_cache.block_size >= r.num_computed_tokens + s.num_new_tokens
        if plan is not None:
            plan.append((r.request_id, r.num_computed_tokens, s.num_new_tokens))
        if r.num_computed_tokens + s.num_new_tokens == r.num_tokens:
            sampled[r.request_id] = token_fn(r)
    sched.update_from_output(out, sampled, {})
    return out


def run_to_completion(sched: Scheduler, max_steps: int = 1000) -> int:
    for num_steps in range(1, max_steps + 1):
        step(sched)
        if not sched.has_unfinished_requests():
            return num_steps
    raise AssertionError("requests did not finish")


def test_long_prompt_is_chunked_under_the_budget() -> None:
    sched = make_scheduler(num_blocks=32, max_num_batched_tokens=8)
    a = make_request("a", list(range(1, 21)), max_tokens=3)
    b = make_request("b", list(range(31, 36)), max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    plans = []
    for _ in range(6):
        plan: list[tuple[str, int, int]] = []
        step(sched, plan=plan)
        plans.append(plan)
    assert plans == [
        [("a", 0, 8)],
        [("a", 8, 8)],
        [("a", 16, 4), ("b", 0, 4)],  # b gets a chunk of what is left
        [("a", 20, 1), ("b", 4, 1)],  # a decodes, b finishes its prompt
        [("a", 21, 1), ("b", 5, 1)],
        [],
    ]
    assert a.output_token_ids == [1020, 1021, 1022]
    assert b.output_token_ids == [1005, 1006]
    assert a.status is b.status is RequestStatus.FINISHED_LENGTH
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache.num_free_blocks == 32


def test_no_chunking_when_disabled_unless_alone() -> None:
    sched = make_scheduler(num_blocks=32, max_num_batched_tokens=8, chunked_prefill=False)
    sched.add_request(make_request("a", list(range(1, 7)), max_tokens=2))
    sched.add_request(make_request("b", list(range(11, 17)), max_tokens=2))
    sched.add_request(make_request("c", list(range(21, 33)), max_tokens=1))  # > budget
    plans = []
    for _ in range(5):
        plan: list[tuple[str, int, int]] = []
        step(sched, plan=plan)
        plans.append(plan)
    assert plans == [
        [("a", 0, 6)],
        [("a", 6, 1), ("b", 0, 6)],
        [("b", 6, 1)],  # c (12 tokens) never fits next to others...
        [("c", 0, 8)],  # ...so it is chunked once it is alone
        [("c", 8, 4)],
    ]
    assert not sched.has_unfinished_requests()


def test_max_num_seqs() -> None:
    sched = make_scheduler(num_blocks=32, max_num_seqs=2)
    a = make_request("a", [1, 2, 3, 4], max_tokens=1)
    b = make_request("b", [5, 6, 7, 8], max_tokens=3)
    c = make_request("c", [9, 10, 11, 12], max_tokens=1)
    for r in (a, b, c):
        sched.add_request(r)
    plan: list[tuple[str, int, int]] = []
    step(sched, plan=plan)
    assert plan == [("a", 0, 4), ("b", 0, 4)]
    assert a.status is RequestStatus.FINISHED_LENGTH
    assert (sched.num_running, sched.num_waiting) == (1, 1)
    plan = []
    step(sched, plan=plan)
    assert plan == [("b", 4, 1), ("c", 0, 4)]
    assert (sched.num_running, sched.num_waiting) == (1, 0)


def test_admission_takes_turns_across_requests() -> None:
    """A request of many sequences (prompts x n) takes one place per turn: a request that
    arrives after it is admitted at the next free slot, not after all of it."""
    sched = make_scheduler(num_blocks=64, max_num_seqs=2)
    big = [make_request(f"big-{i}", [1, 2, 3, i], max_tokens=3) for i in range(6)]
    for r in big:
        r.group = "big"
        sched.add_request(r)
    small = make_request("small", [9, 9, 9], max_tokens=1)
    pair = [make_request(f"pair-{i}", [7, 7, i], max_tokens=1) for i in range(2)]
    for r in pair:
        r.group = "pair"
    for r in (small, *pair):
        sched.add_request(r)
    order = [r.request_id for r in sched.waiting]
    assert order == ["big-0", "small", "pair-0", "big-1", "pair-1", "big-2", "big-3", "big-4",
                     "big-5"]
    plan: list[tuple[str, int, int]] = []
    while sched.has_unfinished_requests():
        step(sched, plan=plan)
    assert [rid for rid, start, _ in plan if start == 0] == order  # admitted in queue order


def test_one_sequence_per_request_is_fifo_and_preempted_ones_come_first() -> None:
    sched = make_scheduler(num_blocks=64)
    requests = [make_request(f"r{i}", [i + 1] * 3) for i in range(5)]
    for r in requests:
        sched.add_request(r)
    assert list(sched.waiting) == requests
    step(sched)
    victim = sched.running[-1]
    sched.running.pop()
    sched._preempt(victim)
    late = make_request("late", [8, 8])
    sched.add_request(late)
    assert list(sched.waiting) == [victim, late]


def test_prefix_hit_advances_computed_tokens_at_admission() -> None:
    sched = make_scheduler(num_blocks=32)
    prompt = list(range(1, 11))
    a = make_request("a", prompt, max_tokens=1)
    sched.add_request(a)
    step(sched)
    assert a.num_cached_tokens == 0
    assert a.is_finished

    b = make_request("b", prompt, max_tokens=1)
    sched.add_request(b)
    plan: list[tuple[str, int, int]] = []
    step(sched, plan=plan)
    assert plan == [("b", 8, 2)]
    assert b.num_cached_tokens == 8
    assert b.output_token_ids == [1010]
    stats = sched.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (20, 8)
    assert sched.prefix_cache_stats() == (20, 8)


def test_parallel_samples_share_prompt_blocks_in_the_same_step() -> None:
    sched = make_scheduler(num_blocks=32)
    prompt = list(range(1, 11))
    s0 = make_request("r-0", prompt, max_tokens=2)
    s1 = make_request("r-1", prompt, max_tokens=2)
    sched.add_request(s0)
    sched.add_request(s1)
    plan: list[tuple[str, int, int]] = []
    out = step(sched, plan=plan)
    assert plan == [("r-0", 0, 10), ("r-1", 8, 2)]
    assert out.num_batched_tokens == 12
    assert s0.block_ids[:2] == s1.block_ids[:2]
    assert s0.block_ids[2] != s1.block_ids[2]
    assert sched.kv_cache.usage == pytest.approx(4 / 32)
    run_to_completion(sched)
    assert sched.kv_cache.num_free_blocks == 32


def test_preemption_and_resumption_without_prefix_caching() -> None:
    # 4 blocks of 2 tokens: two 3-token prompts fit, but not both growing to 8 tokens.
    sched = make_scheduler(num_blocks=4, block_size=2, max_model_len=8, prefix_caching=False)
    a = make_request("a", [1, 2, 3], max_tokens=5)
    b = make_request("b", [4, 5, 6], max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    plans, preempted = [], []
    for _ in range(8):
        plan: list[tuple[str, int, int]] = []
        out = step(sched, plan=plan)
        plans.append(plan)
        preempted.append([r.request_id for r in out.preempted])
        if out.preempted:
            assert b.status is RequestStatus.PREEMPTED
            assert b.num_computed_tokens == 0
            assert b.block_ids == []
    assert plans == [
        [("a", 0, 3), ("b", 0, 3)],
        [("a", 3, 1), ("b", 3, 1)],
        [("a", 4, 1)],  # a needs a 3rd block: b (newest) is preempted
        [("a", 5, 1)],  # b (5 tokens, 3 blocks) does not fit yet
        [("a", 6, 1)],  # a finishes: 8 tokens = max_model_len
        [("b", 0, 5)],  # b recomputes its prompt and its 2 outputs
        [("b", 5, 1)],
        [("b", 6, 1)],
    ]
    assert preempted == [[], [], ["b"], [], [], [], [], []]
    assert a.output_token_ids == b.output_token_ids == [1003, 1004, 1005, 1006, 1007]
    assert a.status is b.status is RequestStatus.FINISHED_LENGTH
    assert (a.num_preemptions, b.num_preemptions, sched.num_preemptions) == (0, 1, 1)
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache.num_free_blocks == 4


def test_resumed_request_reuses_its_own_cached_blocks() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2, max_model_len=8)
    a = make_request("a", [1, 2, 3], max_tokens=3)
    b = make_request("b", [4, 5, 6], max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(3):
        step(sched)
    # b held blocks [2, 3], full with [4, 5] and [6, 1004]; freed tail first, so block 3
    # went to a and block 2 stays cached. a then finished.
    assert b.status is RequestStatus.PREEMPTED
    assert a.is_finished
    plan: list[tuple[str, int, int]] = []
    step(sched, plan=plan)
    assert plan == [("b", 2, 3)]  # block 2 ([4, 5]) came back from the prefix cache
    assert b.block_ids[0] == 2
    assert b.num_cached_tokens == 0  # set at first admission only
    run_to_completion(sched)
    assert b.output_token_ids == [1003, 1004, 1005, 1006, 1007]
    assert sched.kv_cache.num_free_blocks == 4


def test_preempts_newest_first_and_readmits_in_order() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2, max_model_len=8, prefix_caching=False)
    r0 = make_request("r0", [1, 2, 3], max_tokens=5)
    r1 = make_request("r1", [11], max_tokens=7)
    r2 = make_request("r2", [21], max_tokens=7)
    for r in (r0, r1, r2):
        sched.add_request(r)
    step(sched)
    assert (r0.block_ids, r1.block_ids, r2.block_ids) == ([0, 1], [2], [3])  # pool full
    step(sched)
    plan: list[tuple[str, int, int]] = []
    out = step(sched, plan=plan)
    # r0 needs a 3rd block: r2 (newest) goes; then r1 needs a 2nd block: r1 itself goes.
    assert out.preempted == [r2, r1]
    assert plan == [("r0", 4, 1)]
    assert list(sched.waiting) == [r1, r2]
    assert r1.status is r2.status is RequestStatus.PREEMPTED
    assert r1.output_token_ids == r2.output_token_ids == [1001, 1002]  # outputs are kept
    assert sched.num_preemptions == 2
    plan = []
    step(sched, plan=plan)
    assert plan == [("r0", 5, 1)]  # r1 needs 2 blocks, 1 is free: FIFO, nobody overtakes it
    run_to_completion(sched)
    assert r0.output_token_ids == [1003, 1004, 1005, 1006, 1007]
    assert r1.output_token_ids == r2.output_token_ids == [1001 + k for k in range(7)]
    assert sched.kv_cache.num_free_blocks == 4


@pytest.mark.parametrize(("prefix_caching", "expected_steps"), [(False, 78), (True, 77)])
def test_tiny_pool_many_requests_all_finish(prefix_caching: bool, expected_steps: int) -> None:
    block_size, num_blocks = 2, 6  # 12 tokens of KV in all
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, max_num_batched_tokens=8,
                           max_num_seqs=4, max_model_len=12, prefix_caching=prefix_caching)
    reqs = []
    for i in range(12):
        prompt = [1, 2, 3, 4][: i % 4] + [100 + i] * (1 + i % 5)  # some shared prefixes
        reqs.append(make_request(f"r{i}", prompt, max_tokens=12 - len(prompt)))
        sched.add_request(reqs[-1])
    num_steps = run_to_completion(sched)
    assert num_steps == expected_steps  # regression pins for this exact workload
    assert sched.num_preemptions == 13
    for r in reqs:
        assert r.status is RequestStatus.FINISHED_LENGTH
        assert r.num_tokens == 12
        expected = [1000 + n for n in range(r.num_prompt_tokens, 12)]
        assert r.output_token_ids == expected
    assert sched.kv_cache.num_free_blocks == num_blocks
    assert sched.kv_cache.usage == 0.0
    assert (sched.num_running, sched.num_waiting) == (0, 0)


def test_stop_token_respects_min_tokens() -> None:
    sched = make_scheduler(num_blocks=32)
    script = iter([7, 5, 9, 5, 8])

    def token_fn(request: Request) -> int:
        return next(script)

    a = make_request("a", [1, 2, 3], max_tokens=10, stop_token_ids=[5], min_tokens=3)
    sched.add_request(a)
    for _ in range(4):
        step(sched, token_fn)
    assert a.output_token_ids == [7, 5, 9, 5]  # the first 5 came before min_tokens
    assert a.status is RequestStatus.FINISHED_STOPPED
    assert a.stop_reason == 5
    assert a.finish_reason == "stop"
    assert sched.kv_cache.num_free_blocks == 32


def test_length_limits() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2, max_model_len=8)
    a = make_request("a", [1, 2, 3, 4, 5, 6], max_tokens=100)
    b = make_request("b", [1, 2], max_tokens=1)
    sched.add_request(a)
    sched.add_request(b)
    run_to_completion(sched)
    assert a.num_output_tokens == 2  # stopped by max_model_len
    assert b.num_output_tokens == 1  # stopped by max_tokens
    assert a.finish_reason == b.finish_reason == "length"
    assert a.stop_reason is None


def test_update_appends_logprobs_and_returns_updated_requests() -> None:
    sched = make_scheduler(num_blocks=32, max_num_batched_tokens=6)
    a = make_request("a", [1, 2, 3], max_tokens=1)
    b = make_request("b", list(range(10, 20)), max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 3), ("b", 3)]
    lp = {42: Logprob(-0.5, rank=1)}
    updated = sched.update_from_output(out, {"a": 42}, {"a": lp})
    assert updated == [a]
    assert a.output_logprobs == [lp]
    assert a.is_finished and a.output_token_ids == [42]
    assert b.num_computed_tokens == 3 and b.output_token_ids == []
    assert sched.num_running == 1


def test_update_rejects_inconsistent_sampling() -> None:
    sched = make_scheduler(num_blocks=32)
    sched.add_request(make_request("a", [1, 2, 3]))
    out = sched.schedule()
    with pytest.raises(ValueError, match="sampled"):
        sched.update_from_output(out, {}, {})


def test_finish_requests_frees_blocks() -> None:
    sched = make_scheduler(num_blocks=8, max_num_seqs=2)
    a = make_request("a", list(range(1, 10)), max_tokens=5)
    b = make_request("b", list(range(11, 16)), max_tokens=5)
    c = make_request("c", [21, 22], max_tokens=5)
    for r in (a, b, c):
        sched.add_request(r)
    step(sched)
    assert (a.block_ids, b.block_ids, c.block_ids) == ([0, 1, 2], [3, 4], [])
    assert sched.kv_cache.num_free_blocks == 3
    finished = sched.finish_requests(["a", "c", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert finished == [a, c]
    assert a.status is c.status is RequestStatus.FINISHED_ABORTED
    assert a.finish_reason == "abort"
    assert a.block_ids == []
    assert sched.kv_cache.num_free_blocks == 6
    assert (sched.num_running, sched.num_waiting) == (1, 0)
    assert sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED) == []
    assert sched.finish_requests(["b"], RequestStatus.FINISHED_STOPPED) == [b]
    assert sched.kv_cache.num_free_blocks == 8
    assert not sched.has_unfinished_requests()
    with pytest.raises(ValueError, match="finished status"):
        sched.finish_requests(["x"], RequestStatus.RUNNING)


def test_request_finished_between_schedule_and_update_is_skipped() -> None:
    sched = make_scheduler(num_blocks=8)
    a = make_request("a", [1, 2, 3])
    b = make_request("b", [4, 5, 6])
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(out, {"a": 9, "b": 9}, {}) == [b]
    assert a.output_token_ids == []
    assert sched.kv_cache.num_free_blocks == 7


def test_add_request_validation() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2)
    sched.add_request(make_request("a", [1]))
    with pytest.raises(ValueError, match="already"):
        sched.add_request(make_request("a", [1]))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(make_request("long", list(range(9))))
    with pytest.raises(ValueError, match="capacity"):
        make_scheduler(num_blocks=4, block_size=2, max_model_len=9)


def check_block_accounting(sched: Scheduler) -> None:
    """Every block's refcount equals the number of live requests holding it; free iff 0."""
    kv = sched.kv_cache
    holders = [0] * kv.num_blocks
    for r in sched.requests.values():
        assert len(set(r.block_ids)) == len(r.block_ids)
        for block_id in r.block_ids:
            holders[block_id] += 1
    assert [b.ref_count for b in kv.blocks] == holders
    assert kv.num_free_blocks == holders.count(0)
    assert all(r.block_ids == [] for r in sched.waiting)


def test_random_workload_keeps_block_accounting_exact() -> None:
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=12, block_size=4, max_num_batched_tokens=16,
                           max_num_seqs=5, max_model_len=48)
    shared = [rng.randrange(1, 50) for _ in range(12)]
    all_reqs = []
    for i in range(40):
        prompt = shared[: rng.randrange(0, 13)] + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 20))]
        all_reqs.append(make_request(f"r{i}", prompt, max_tokens=rng.randrange(1, 48 - len(prompt) + 1)))
    pending = list(all_reqs)
    aborted = set()
    for _ in range(2000):
        if pending and rng.random() < 0.5:
            sched.add_request(pending.pop(0))
        if sched.requests and rng.random() < 0.03:
            victim = rng.choice(sorted(sched.requests))
            assert sched.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
            aborted.add(victim)
        step(sched)
        check_block_accounting(sched)
        if not pending and not sched.has_unfinished_requests():
            break
    assert not sched.has_unfinished_requests()
    for r in all_reqs:
        if r.request_id in aborted:
            assert r.status is RequestStatus.FINISHED_ABORTED
        else:
            assert r.status is RequestStatus.FINISHED_LENGTH
            assert r.num_output_tokens == min(r.max_tokens, 48 - r.num_prompt_tokens)
            assert r.output_token_ids == [1000 + n for n in range(r.num_prompt_tokens, r.num_tokens)]
    assert sched.kv_cache.num_free_blocks == 12
    assert sched.num_preemptions > 0
    assert sched.kv_cache.stats.hits > 0
