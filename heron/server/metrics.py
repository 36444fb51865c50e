"""GET /metrics: Prometheus text with vLLM's metric names under a ``heron:`` prefix.

Engine-side numbers (running/waiting, KV cache usage, prefix cache, preemptions, token
totals) come from the latest ``EngineStats`` snapshot the core sent. With several
data-parallel engines (a ``Router``) each such metric has one sample per engine, labelled
``engine="i"``, and one without that label: the sum over engines (KV cache usage: the mean),
the same series a one-engine server exposes; ``heron:engine_up`` says which are up. Latency
histograms (TTFT, inter-token, end-to-end) are observed on the API side as outputs arrive.
Each server owns its registry: nothing is registered globally.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heron.engine.client import EngineClient
from heron.engine.messages import EngineStats
from heron.server.router import Router

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


_Reader = Callable[[EngineClient | Router], float]


def _stat(field: str) -> _Reader:
    return lambda engine: float(getattr(engine.stats, field))


_GAUGES: tuple[tuple[str, str, _Reader], ...] = (
    ("num_requests_running", "Requests in the running batch.", _stat("num_running")),
    ("num_requests_waiting", "Requests waiting to be scheduled.", _stat("num_waiting")),
    ("kv_cache_usage_perc", "KV cache usage (1 means 100 percent).", _stat("kv_cache_usage")),
    (
        "num_sequences_in_flight",
        "Engine sequences the API process routes outputs for (one queue entry each).",
        lambda engine: float(engine.num_in_flight),
    ),
)
_COUNTERS: tuple[tuple[str, str, _Reader], ...] = (
    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
     _stat("prefix_cache_queries")),
    ("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
     _stat("prefix_cache_hits")),
    ("num_preemptions", "Preemptions (requests evicted to free KV blocks).",
     _stat("num_preemptions")),
    ("prompt_tokens", "Prompt tokens admitted.", _stat("prompt_tokens_total")),
    ("generation_tokens", "Tokens generated.", _stat("generation_tokens_total")),
)


class _EngineStatsCollector(Collector):
    """Exposes the engines' latest stats snapshots at scrape time (summed, and per engine)."""

    def __init__(self, engine: EngineClient | Router, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        engines = self.engine.engines if isinstance(self.engine, Router) else []
        for kind, table in ((GaugeMetricFamily, _GAUGES), (CounterMetricFamily, _COUNTERS)):
            for name, doc, read in table:
                family = kind(f"heron:{name}", doc, labels=["model_name"])
                family.add_metric([self.model_name], read(self.engine))
                for index, engine in enumerate(engines):
                    _add_engine_sample(family, self.model_name, index, read(engine))
                yield family
        if engines:
            up = GaugeMetricFamily("heron:engine_up", "1 while the engine core runs.",
                                   labels=["model_name", "engine"])
            for i, e in enumerate(engines):
                up.add_metric([self.model_name, str(i)], 1.0 if e.health() is None else 0.0)
            yield up


def _add_engine_sample(family: Metric, model_name: str, index: int, value: float) -> None:
    """One more sample with an ``engine`` label (the family's other sample has none)."""
    suffix = "_total" if family.type == "counter" else ""
    labels = {"model_name": model_name, "engine": str(index)}
    family.samples.append(Sample(family.name + suffix, labels, float(value)))


class ServerMetrics:
    """The server's Prometheus registry and the histograms the serving code observes."""

    def __init__(self, engine: EngineClient | Router, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineStatsCollector(engine, model_name))
        labels = {"model_name": model_name}

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            h = Histogram(
                f"heron:{name}",
                doc,
                labelnames=["model_name"],
                buckets=buckets,
                registry=self.registry,
            )
            return h.labels(**labels)

        self.ttft = histogram(
            "time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between two output tokens.", _LATENCY_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_BUCKETS
        )
        self.prompt_len = histogram(
            "request_prompt_tokens", "Prompt length per request.", _TOKEN_BUCKETS
        )
        self.output_len = histogram(
            "request_generation_tokens", "Tokens generated per request.", _TOKEN_BUCKETS
        )
        self._success = Counter(
            "heron:request_success",
            "Finished requests by finish reason.",
            labelnames=["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._http = Counter(
            "heron:http_requests",
            "HTTP requests by route and status (499: the client left before the answer).",
            labelnames=["model_name", "route", "status"],
            registry=self.registry,
        )
        self._model_name = model_name

    def observe_http(self, route: str, status: int) -> None:
        self._http.labels(model_name=self._model_name, route=route, status=str(status)).inc()

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_finished(
        self, reason: str, seconds: float, prompt_tokens: int, output_tokens: int
    ) -> None:
        self.e2e.observe(seconds)
        self.prompt_len.observe(prompt_tokens)
        self.output_len.observe(output_tokens)
        self._success.labels(model_name=self._model_name, finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HTTPCountMiddleware:
    """Counts every HTTP response by route template (``/v1/responses/{response_id}``, not the
    id) and status; requests that match no route count as ``other``. ``metrics()`` is None
    while the model loads (nothing is counted then)."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], ServerMetrics | None]) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None) or "other"
                metrics = self.metrics()
                if metrics is not None:
                    metrics.observe_http(route, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


class StatsLogger:
    """One log line every interval while the engine is busy: load, KV usage and throughput."""

    def __init__(self, engine: EngineClient | Router) -> None:
        self.engine = engine
        self.last = EngineStats()
        self.last_time = time.monotonic()

    def tick(self) -> str | None:
        """The line to log now, or None when the engine was idle since the last tick."""
        now, s = time.monotonic(), self.engine.stats
        elapsed = max(now - self.last_time, 1e-6)
        prompt = s.prompt_tokens_total - self.last.prompt_tokens_total
        gen = s.generation_tokens_total - self.last.generation_tokens_total
        busy = s.num_running or s.num_waiting or prompt or gen
        self.last, self.last_time = s, now
        if not busy:
            return None
        return (
            f"running: {s.num_running}, waiting: {s.num_waiting}, "
            f"KV cache: {100 * s.kv_cache_usage:.1f}%, prompt: {prompt / elapsed:.1f} tok/s, "
            f"generation: {gen / elapsed:.1f} tok/s, preemptions: {s.num_preemptions}"
        )
