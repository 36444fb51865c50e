"""Which of N data-parallel engines gets a request: prefix affinity with a bounded imbalance.

Each engine has its own KV cache, so a prompt is cheapest where its prefix was computed
before. The policy remembers, for the chained hashes of the first full blocks of every
prompt it routed, which engine it sent that prompt to (an LRU table)::

    prompt  [ block 0 ][ block 1 ][ block 2 ][ partial ]
    hashes    h0 = H(b0)  h1 = H(h0, b1)  h2 = H(h1, b2)      (full blocks only, at most
                                                             MAX_AFFINITY_BLOCKS of them)

A new prompt goes to the engine of its longest remembered prefix, unless that engine's load
(sequences in flight) exceeds the least loaded engine's by more than
``max(min_slack, rel_slack * least)``; then, and when nothing is remembered, it goes to the
least loaded engine (ties broken round robin). The same prefix therefore keeps landing on the
same engine while the load stays within the bound. A prompt with a LoRA adapter chains from the
adapter's name (``salt``), as the engines' prefix caches chain from the adapter: its prefix is
cached apart from the same tokens under another adapter or none. Pure bookkeeping: no I/O, no
engines.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

MAX_AFFINITY_BLOCKS = 256  # longer prompts are routed on their first 256 blocks
TABLE_SIZE = 1 << 17  # block hashes remembered (LRU)
MIN_SLACK = 8  # an engine may carry this many more sequences than the least loaded one...
REL_SLACK = 0.5  # ...or this fraction of the least loaded one's load, whichever is more


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str | None = None) -> list[int]:
    """Chained hashes of the prompt's full blocks, first ones first (all of them, as the
    engine's prefix cache takes them: heron.engine.kv_cache); ``salt``: the LoRA adapter's
    name (None: the base model)."""
    num_blocks = min(len(token_ids) // block_size, MAX_AFFINITY_BLOCKS)
    hashes, prev = [], 0 if salt is None else hash(("lora", salt))
    for i in range(max(num_blocks, 0)):
        prev = hash((prev, tuple(token_ids[i * block_size : (i + 1) * block_size])))
        hashes.append(prev)
    return hashes


class RoutingPolicy:
    """``pick(prompt, loads, up)`` -> engine index. Subclasses: prefix affinity, round robin."""

    def __init__(self, num_engines: int) -> None:
        if num_engines < 1:
            raise ValueError(f"num_engines must be positive, got {num_engines}")
        self.num_engines = num_engines
        self._turn = itertools.count()

    def pick(self, token_ids: Sequence[int], loads: Sequence[int], up: Sequence[bool],
             salt: str | None = None) -> int:
        """``salt``: the request's LoRA adapter name (None: the base model)."""
        raise NotImplementedError

    def _least_loaded(self, loads: Sequence[int], up: Sequence[bool]) -> int:
        """The least loaded engine that is up; ties in turn (round robin)."""
        candidates = [i for i in range(self.num_engines) if up[i]]
        if not candidates:
            raise ValueError("no engine is up")
        least = min(loads[i] for i in candidates)
        tied = [i for i in candidates if loads[i] == least]
        return tied[next(self._turn) % len(tied)]


class RoundRobin(RoutingPolicy):
    """Engines in turn, skipping those that are down (``--router round-robin``)."""

    def pick(self, token_ids: Sequence[int], loads: Sequence[int], up: Sequence[bool],
             salt: str | None = None) -> int:
        for _ in range(self.num_engines):
            i = next(self._turn) % self.num_engines
            if up[i]:
                return i
        raise ValueError("no engine is up")


class PrefixAffinity(RoutingPolicy):
    """Longest remembered prefix wins, within a bounded imbalance (``--router prefix``)."""

    def __init__(self, num_engines: int, block_size: int, table_size: int = TABLE_SIZE) -> None:
        super().__init__(num_engines)
        self.block_size = block_size
        self.table_size = table_size
        self._owner: OrderedDict[int, int] = OrderedDict()  # block hash -> engine index

    def pick(self, token_ids: Sequence[int], loads: Sequence[int], up: Sequence[bool],
             salt: str | None = None) -> int:
        hashes = block_hashes(token_ids, self.block_size, salt)
        chosen = self._affine(hashes, up)
        if chosen is None or self._overloaded(chosen, loads, up):
            chosen = self._least_loaded(loads, up)
        self._remember(hashes, chosen)
        return chosen

    def affine_engine(self, token_ids: Sequence[int], salt: str | None = None) -> int | None:
        """The engine that last got this prompt's longest remembered prefix (None: no prefix)."""
        return self._affine(block_hashes(token_ids, self.block_size, salt),
                            [True] * self.num_engines)

    def _affine(self, hashes: list[int], up: Sequence[bool]) -> int | None:
        owner = None
        for h in hashes:  # chained: a prefix is remembered only if every shorter one is
            engine = self._owner.get(h)
            if engine is None:
                break
            if up[engine]:
                owner = engine
        return owner

    def _overloaded(self, engine: int, loads: Sequence[int], up: Sequence[bool]) -> bool:
        least = min(loads[i] for i in range(self.num_engines) if up[i])
        return loads[engine] - least > max(MIN_SLACK, REL_SLACK * least)

    def _remember(self, hashes: list[int], engine: int) -> None:
        for h in hashes:
            self._owner[h] = engine
            self._owner.move_to_end(h)
        while len(self._owner) > self.table_size:
            self._owner.popitem(last=False)


def make_policy(name: str, num_engines: int, block_size: int) -> RoutingPolicy:
    """``prefix`` or ``round-robin`` (ParallelConfig.router)."""
    if name == "prefix":
        return PrefixAffinity(num_engines, block_size)
    if name == "round-robin":
        return RoundRobin(num_engines)
    raise ValueError(f"unknown router {name!r}; use prefix or round-robin")
