"""The scheduler: one token budget per step, shared by running and waiting requests.

There are no prefill and decode phases. Each step every request asks for
``num_tokens - num_computed_tokens`` tokens (1 for a decode, the rest of its prompt
for a prefill) and gets at most what is left of the step's budget. A long prompt
therefore runs in chunks, a prefix-cache hit simply starts ``num_computed_tokens``
further on, and a preempted request recomputes from 0 under the same rule.

Order within a step::

    running (admission order)  -> each gets its tokens; if blocks run out, the newest
                                  running request is preempted (repeatedly) to make room
    waiting (FIFO, preempted   -> admitted while budget, blocks and max_num_seqs last
             ones at the front)   (none at all if this step preempted someone), and while
                                  the running requests use at most ``max_loras`` adapters
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from heron.config import CacheConfig, SchedulerConfig
from heron.engine.kv_cache import KVCacheManager
from heron.engine.request import LogprobsDict, Request, RequestStatus


@dataclass
class ScheduledRequest:
    """One request's share of a step: tokens ``[num_computed_tokens, + num_new_tokens)``."""

    request: Request
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    """What to run this step. ``request.num_computed_tokens`` is the chunk start (not advanced yet)."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)  # batch order
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    """A snapshot for logs and /metrics."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int


class Scheduler:
    """Decides, each step, which requests compute how many tokens; owns the KV cache manager.

    A request alone always fits in the pool (the engine guarantees
    ``max_model_len <= num_blocks * block_size``), so preempting the newest request
    until the oldest can grow always makes progress: no error, no deadlock.

    ``prompt_logprobs_chunk``: a request that wants prompt logprobs computes at most this many
    prompt tokens per step. Each such token costs a row of vocabulary logits, so a long
    ``echo`` + ``logprobs`` prompt advances in small steps and the others keep stepping.

    ``max_loras``: a request with a LoRA adapter is admitted only while the running requests
    use fewer distinct adapters, or its own already (None: no limit).
    """

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_blocks: int, max_model_len: int,
                 prompt_logprobs_chunk: int | None = None, max_loras: int | None = None) -> None:
        if max_model_len > num_blocks * cache_config.block_size:
            raise ValueError(f"max_model_len ({max_model_len}) exceeds the KV cache capacity "
                             f"({num_blocks} blocks of {cache_config.block_size} tokens)")
        self.config = scheduler_config
        self.max_model_len = max_model_len
        self.prompt_logprobs_chunk = prompt_logprobs_chunk
        self.max_loras = max_loras
        self.kv_cache = KVCacheManager(num_blocks, cache_config.block_size,
                                       cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last one is preempted first
        self.num_preemptions = 0
        self._group_sizes: dict[str, int] = {}  # sequences in the scheduler per group
        self._arrivals = 0

    # ------------------------------------------------------------------ requests in and out

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        if not 0 < request.num_tokens <= self.max_model_len:
            raise ValueError(f"request {request.request_id!r} has {request.num_tokens} tokens; "
                             f"expected 1 to max_model_len ({self.max_model_len})")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        """Queue in fair turns: the k-th sequence of a group (an API request's prompts x n)
        waits behind every group's (k-1)-th, and in arrival order within a turn. One request
        with hundreds of sequences thus takes one place per turn, and a request that arrives
        later starts at its group's first turn; with one sequence per group this is FIFO."""
        group = request.group or request.request_id
        turn = self._group_sizes.get(group, 0)
        self._group_sizes[group] = turn + 1
        self._arrivals += 1
        request.admit_key = (turn, self._arrivals)
        position = len(self.waiting)
        while position > 0 and self.waiting[position - 1].admit_key > request.admit_key:
            position -= 1
        self.waiting.insert(position, request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests from outside (abort, stop string): free their blocks and drop them."""
        if not status.is_finished:
            raise ValueError(f"finish_requests needs a finished status, got {status}")
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue  # already finished: an abort racing a normal finish is not an error
            if request in self.running:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._drop(request)
            finished.append(request)
        return finished

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ one step

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Give each running request its next tokens, preempting the newest when blocks run out."""
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget,
                          self._chunk_cap(request))
            if not self._allocate_or_preempt(request, num_new, out):
                break  # the request itself was preempted: it was the last one running
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
            i += 1
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        while not self.kv_cache.allocate_slots(request, num_new):
            victim = self.running.pop()  # never one scheduled already: those precede `request`
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Admit waiting requests in order while budget, blocks and ``max_num_seqs`` allow."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if not self._lora_fits(request):
                break  # FIFO: it waits until a running adapter is done
            hit_blocks, num_hit = self.kv_cache.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit
            whole = not self.config.enable_chunked_prefill or request.is_pooling
            if num_new > budget and whole and out.scheduled:
                # Without chunking, a prompt waits for a step with room for all of it. A pooling
                # prompt that fits in one step is computed in one piece: its vector then does
                # not depend on what else ran (chunks would attend through the cache).
                break
            num_new = min(num_new, budget, self._chunk_cap(request))
            if not self.kv_cache.allocate_slots(request, num_new, hit_blocks):
                break  # FIFO: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

    def _lora_fits(self, request: Request) -> bool:
        """Whether ``request``'s adapter may run now (``max_loras``)."""
        if self.max_loras is None or not request.lora_id:
            return True
        running = {r.lora_id for r in self.running} - {0}
        return request.lora_id in running or len(running) < self.max_loras

    def _chunk_cap(self, request: Request) -> int:
        """The most tokens ``request`` may compute this step (prompt logprobs: a few)."""
        cap = self.prompt_logprobs_chunk
        if (cap is None or request.sampling_params.prompt_logprobs is None
                or not self.config.enable_chunked_prefill
                or request.num_computed_tokens >= request.num_prompt_tokens):
            return request.num_tokens
        return cap

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        request.admit_key = (-1, request.admit_key[1])  # back first, before any turn
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------ after the model ran

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int],
                           logprobs: dict[str, LogprobsDict]) -> list[Request]:
        """Advance computed tokens, append sampled tokens, finish requests that hit a stop.

        Returns the requests that got a new token (finished ones included) and the pooling
        requests that finished, in batch order.
        """
        updated = []
        for scheduled in out.scheduled:
            request = scheduled.request
            if request.is_finished or request.request_id not in self.requests:
                continue  # finished from outside since this step was scheduled
            request.num_computed_tokens += scheduled.num_new_tokens
            if request.is_pooling:
                if self._finish_pooling(request):
                    updated.append(request)
                continue
            token = sampled.get(request.request_id)
            if (token is None) != (request.num_computed_tokens < request.num_tokens):
                raise ValueError(f"request {request.request_id!r}: a token is sampled exactly when "
                                 f"all its tokens are computed ({request.num_computed_tokens} of "
                                 f"{request.num_tokens}, sampled={token})")
            if token is None:
                continue  # a chunk of a prompt: nothing sampled yet
            request.append_output_token(token)
            if request.request_id in logprobs:
                request.output_logprobs.append(logprobs[request.request_id])
            if self._check_stop(request, token):
                self.running.remove(request)
                self._drop(request)
            updated.append(request)
        return updated

    def _finish_pooling(self, request: Request) -> bool:
        """A pooling request ends when its prompt is computed (the runner pooled it): its blocks
        are freed at once. True when it ended."""
        if request.num_computed_tokens < request.num_tokens:
            return False
        request.status = RequestStatus.FINISHED_STOPPED
        self.running.remove(request)
        self._drop(request)
        return True

    def _check_stop(self, request: Request, token: int) -> bool:
        """Set a finished status if ``token`` ends the request; True when it does.

        The grammar sees every token first: a constrained output whose grammar failed ends with
        an error, never as a "stop" (not even on an end token its broken mask let through)."""
        params = request.sampling_params
        complete = request.grammar is not None and request.grammar.advance(token)
        if request.grammar is not None and request.grammar.error is not None:
            request.status = RequestStatus.FINISHED_ERROR
            request.stop_reason = request.grammar.error
        elif token in params.all_stop_token_ids and request.num_output_tokens >= params.min_tokens:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token
        elif complete:
            request.status = RequestStatus.FINISHED_STOPPED  # structured output complete
        elif (request.num_output_tokens >= request.max_tokens
              or request.num_tokens >= self.max_model_len):
            request.status = RequestStatus.FINISHED_LENGTH
        return request.is_finished

    def _drop(self, request: Request) -> None:
        self.kv_cache.free(request)
        del self.requests[request.request_id]
        group = request.group or request.request_id
        left = self._group_sizes.get(group, 1) - 1
        if left > 0:
            self._group_sizes[group] = left
        else:
            self._group_sizes.pop(group, None)

    # ------------------------------------------------------------------ stats

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache.usage

    def prefix_cache_stats(self) -> tuple[int, int]:
        """(queries, hits) in tokens, counted at each admission since start."""
        return self.kv_cache.stats.queries, self.kv_cache.stats.hits

    def reset_prefix_cache(self) -> None:
        self.kv_cache.reset_prefix_cache()

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv_cache.usage,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=self.kv_cache.stats.queries,
            prefix_cache_hits=self.kv_cache.stats.hits,
        )
