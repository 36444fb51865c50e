"""The router: N data-parallel engine cores behind the one-engine interface of ``EngineClient``.

::

    serving layer --stream(requests)--> Router --pick--> EngineClient i --ZMQ--> engine core i
                                          |  prefix affinity within a bounded imbalance
                                          |  (heron.engine.dp_routing), engines that are up only
                                          '- is_alive / stats / health over all engines

The serving layer calls ``stream()`` exactly as on one engine and gets engine i's own
``OutputStream``: streaming, aborts on disconnect, structured output and tools are unchanged.
All sequences of one ``stream()`` call (the n choices of a request) go to one engine. An
engine that dies fails its own in-flight requests (its client does that); new requests go to
the engines still up, so the server is degraded, not down, until the last engine is gone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from heron.engine.client import EngineClient, EngineError, OutputStream
from heron.engine.dp_launch import Backend, open_backend
from heron.engine.dp_routing import RoutingPolicy, make_policy
from heron.engine.messages import EngineInfo, EngineRequest, EngineStats

if TYPE_CHECKING:
    from heron.config import EngineConfig, ParallelConfig

logger = logging.getLogger(__name__)

_SUMMED = (
    "num_running",
    "num_waiting",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "num_preemptions",
    "prompt_tokens_total",
    "generation_tokens_total",
)


def build_engine(
    config: EngineConfig,
    parallel: ParallelConfig,
    log_level: int = logging.INFO,
    backend: Backend | None = None,
) -> EngineClient | Router:
    """One EngineClient (data_parallel_size 1, mp), else a Router over N of them. ``backend``:
    one opened beforehand (``open_backend``: connecting to Ray blocks, and may fail)."""
    backend = backend or open_backend(config, parallel, log_level)
    if parallel.data_parallel_size == 1 and parallel.backend == "mp":
        return EngineClient(config, log_level, launcher=backend.launchers[0])
    engines = [EngineClient(config, log_level, launcher=x) for x in backend.launchers]
    policy = make_policy(parallel.router, len(engines), config.cache.block_size)
    return Router(engines, policy, backend)


class Router:
    """Looks like one EngineClient to the serving layer; spreads requests over several."""

    def __init__(
        self, engines: list[EngineClient], policy: RoutingPolicy, backend: Backend | None = None
    ) -> None:
        if not engines:
            raise ValueError("a router needs at least one engine")
        self.engines = engines
        self.policy = policy
        self.backend = backend
        self.info: EngineInfo | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self, timeout_s: float | None = None) -> EngineInfo:
        """Start every engine at once; all must come up (else every one is shut down)."""
        results = await asyncio.gather(
            *(e.start(timeout_s) for e in self.engines), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        infos = [r for r in results if isinstance(r, EngineInfo)]
        self.info = infos[0]
        for engine, info in zip(self.engines, infos):
            if info.max_model_len != self.info.max_model_len:
                logger.warning(
                    "%s has max_model_len %d, %s has %d; requests are checked against the first",
                    engine.label, info.max_model_len, self.engines[0].label,
                    self.info.max_model_len,
                )
        logger.info("%d engines up; router: %s", len(self.engines), type(self.policy).__name__)
        return self.info

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        await asyncio.gather(*(e.shutdown(timeout_s) for e in self.engines))
        if self.backend is not None:
            await asyncio.to_thread(self.backend.close)

    # ---- requests -------------------------------------------------------------------------

    def stream(self, requests: list[EngineRequest]) -> OutputStream:
        """Submit the sequences of one request to one engine; iterate the returned stream."""
        if not requests:
            raise ValueError("nothing to stream")
        lora = requests[0].lora_request
        salt = None if lora is None else lora.lora_name
        for _ in self.engines:
            index = self.pick(requests[0].prompt_token_ids, salt)
            try:
                return self.engines[index].stream(requests)
            except EngineError:
                continue  # it died since is_alive was read: pick again among the others
        raise EngineError(self._down_reason())

    def pick(self, token_ids: list[int], salt: str | None = None) -> int:
        """The engine for a prompt (``salt``: its LoRA adapter's name) among those serving now:
        alive and stepping (raises EngineError when none is)."""
        up = [e.health() is None for e in self.engines]
        if not any(up):
            raise EngineError(self._down_reason())
        loads = [e.num_in_flight for e in self.engines]
        return self.policy.pick(token_ids, loads, up, salt)

    # ---- state ----------------------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        """True while at least one engine is up (the server is then degraded, not down)."""
        return any(e.is_alive for e in self.engines)

    @property
    def dead_reason(self) -> str | None:
        return None if self.is_alive else self._down_reason()

    @property
    def num_in_flight(self) -> int:
        return sum(e.num_in_flight for e in self.engines)

    @property
    def stats(self) -> EngineStats:
        """Every engine's latest snapshot, summed (KV cache usage: the mean)."""
        snapshots = [e.stats for e in self.engines]
        total = EngineStats(**{k: sum(getattr(s, k) for s in snapshots) for k in _SUMMED})
        total.kv_cache_usage = sum(s.kv_cache_usage for s in snapshots) / len(snapshots)
        return total

    def health(self) -> str | None:
        """None while at least one engine serves (alive and stepping), else why none does."""
        problems = [e.health() for e in self.engines]
        if any(p is None for p in problems):
            return None
        return "; ".join(f"{e.label}: {p}" for e, p in zip(self.engines, problems))

    async def wait_dead(self) -> str:
        """Wait until every engine is dead for good; returns why."""
        reasons = await asyncio.gather(*(e.wait_dead() for e in self.engines))
        return "; ".join(reasons)

    def health_report(self) -> dict[str, Any]:
        """``{"status": "ok" | "degraded" | "down", "engines": [...]}`` for GET /health."""
        engines = []
        for i, e in enumerate(self.engines):
            problem = e.health()
            entry: dict[str, Any] = {"engine": i, "up": problem is None, "pid": e.pid}
            if problem is not None:
                entry["reason"] = problem
            engines.append(entry)
        num_up = sum(1 for e in engines if e["up"])
        status = "ok" if num_up == len(engines) else "degraded" if num_up else "down"
        return {"status": status, "engines": engines}

    def _down_reason(self) -> str:
        reasons = "; ".join(e.dead_reason or f"{e.label}: starting" for e in self.engines)
        return f"no engine core is running ({reasons})"
