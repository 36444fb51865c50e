"""`heron bench serve`: load any OpenAI-compatible server and report its latency and throughput.

Drives ``/v1/completions`` (or ``/v1/chat/completions``) with streamed requests, so heron and
its peers (llama.cpp's server, vLLM) are measured by the same client, with the metric
definitions of vLLM's ``vllm bench serve``:

- TTFT: from sending a request to its first chunk with text;
- ITL: the gap between consecutive chunks with text (every gap of every request);
- TPOT: ``(E2EL - TTFT) / (output_tokens - 1)`` per request with more than one output token;
- E2EL: from sending a request to its last chunk with text;
- output tokens: the server's ``usage.completion_tokens`` when it sends usage, else the
  tokenizer's count of the generated text;
- throughput: totals of the successful requests over the wall time of the whole run;
- prefix cache hit rate: the servers' ``usage.prompt_tokens_details.cached_tokens`` over the
  prompt tokens (heron sends it; shown only when the server does).

Chunks without text (the chat role chunk, a finish-only chunk, the usage chunk) do not count
as tokens, so servers that send them are not flattered by near-zero gaps.

examples:
  heron bench serve --base-url http://127.0.0.1:8000 --input-len 128 --output-len 64 \\
      --num-prompts 32 --max-concurrency 16 --ignore-eos
  heron bench serve --dataset-name prefix --prefix-len 512 --input-len 32 --plot run.png
  heron bench serve --dataset-name prefix --prefix-len 1024 --num-prefixes 8 --input-len 64 \\
      --output-len 32 --num-prompts 128 --max-concurrency 8 --ignore-eos
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from heron.bench.datasets import DATASETS, DatasetSpec, SampleRequest
from heron.chat_cli import split_sse_lines

if TYPE_CHECKING:
    import httpx

    from heron.tokenizer.tokenizer import Tokenizer

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
LATENCY_METRICS = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}
PLOT_PERCENTILES = (50.0, 90.0, 99.0)
MAX_ERRORS_SHOWN = 5

TokenCounter = Callable[[str], int]


class ServerUnreachable(RuntimeError):
    """The server did not answer the readiness check; the message is one line for the user."""


# ==== per-request records and the metric arithmetic ==============================================


@dataclass
class RequestRecord:
    """What the client saw of one request. Times are ``time.perf_counter()`` seconds; ``ttft``,
    ``itl`` and ``latency`` are relative to ``start_time`` (the moment the request was sent)."""

    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    generated_text: str = ""
    cached_tokens: int | None = None  # prompt tokens the server found in its prefix cache

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with fewer than 2 tokens."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def chunk_times(self) -> list[float]:
        """Absolute arrival time of every chunk with text."""
        times = [self.start_time + self.ttft]
        for gap in self.itl:
            times.append(times[-1] + gap)
        return times


@dataclass(frozen=True)
class LatencyStats:
    """Mean, median, standard deviation and selected percentiles of one latency, in ms."""

    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: dict[float, float]

    @classmethod
    def of_seconds(cls, values: Sequence[float], percentiles: Sequence[float]) -> LatencyStats:
        """Stats of ``values`` (seconds); all zero when there are none (as vLLM reports)."""
        ms = np.asarray(values, dtype=np.float64) * 1000.0 if len(values) else np.zeros(1)
        return cls(
            float(ms.mean()),
            float(np.median(ms)),
            float(ms.std()),
            {float(p): float(np.percentile(ms, p)) for p in percentiles},
        )


@dataclass(frozen=True)
class BenchmarkMetrics:
    """The run's totals, rates (per second of ``duration_s``) and latency statistics."""

    completed: int
    failed: int
    duration_s: float
    total_input: int
    total_output: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    latencies: dict[str, LatencyStats]
    total_cached: int | None = None  # None: the server reported no cached_tokens

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """Cached prompt tokens over prompt tokens (None when the server does not say)."""
        if self.total_cached is None or self.total_input == 0:
            return None
        return self.total_cached / self.total_input

    def to_dict(self) -> dict[str, float | int]:
        """Flat keys as vLLM writes them (``mean_ttft_ms``, ``p99_itl_ms``, ...)."""
        out: dict[str, float | int] = {
            "completed": self.completed,
            "failed": self.failed,
            "duration": self.duration_s,
            "total_input_tokens": self.total_input,
            "total_output_tokens": self.total_output,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "max_output_tokens_per_s": self.max_output_tokens_per_s,
            "max_concurrent_requests": self.max_concurrent_requests,
        }
        if self.total_cached is not None:
            out["total_cached_tokens"] = self.total_cached
            out["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate or 0.0
        for name, stats in self.latencies.items():
            out[f"mean_{name}_ms"] = stats.mean_ms
            out[f"median_{name}_ms"] = stats.median_ms
            out[f"std_{name}_ms"] = stats.std_ms
            for p, value in stats.percentiles_ms.items():
                out[f"p{percentile_label(p)}_{name}_ms"] = value
        return out


def percentile_label(p: float) -> str:
    """``99.0`` -> ``"99"``, ``99.9`` -> ``"99.9"``."""
    return str(int(p)) if float(p).is_integer() else str(p)


def compute_metrics(
    records: Sequence[RequestRecord], duration_s: float, percentiles: Sequence[float] = (99.0,)
) -> BenchmarkMetrics:
    """Metrics of a finished run: failed requests count only in ``failed``."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    ok = [r for r in records if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    samples = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    per_second = tokens_per_bucket(ok, 1.0)
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input=total_input,
        total_output=total_output,
        request_throughput=len(ok) / duration_s,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        max_output_tokens_per_s=max(per_second, default=0.0),
        max_concurrent_requests=peak_concurrency(ok),
        latencies={k: LatencyStats.of_seconds(v, percentiles) for k, v in samples.items()},
        total_cached=sum(cached) if cached else None,
    )


def tokens_per_bucket(records: Sequence[RequestRecord], bucket_s: float) -> list[float]:
    """Output tokens received in each ``bucket_s`` window from the first request's start.

    Each chunk carries ``output_tokens / chunks`` of its request's tokens (exactly one per
    chunk when the server streams token by token), so the buckets sum to the total output.
    """
    if not records:
        return []
    origin = min(r.start_time for r in records)
    end = max(r.start_time + r.latency for r in records)
    buckets = [0.0] * max(math.ceil((end - origin) / bucket_s), 1)
    for r in records:
        times = r.chunk_times()
        for t in times:
            index = min(int((t - origin) / bucket_s), len(buckets) - 1)
            buckets[index] += r.output_tokens / len(times)
    return buckets


def in_flight_per_bucket(records: Sequence[RequestRecord], bucket_s: float) -> list[float]:
    """Mean number of requests open during each ``bucket_s`` window (time-weighted)."""
    if not records:
        return []
    origin = min(r.start_time for r in records)
    end = max(r.start_time + r.latency for r in records)
    means = [0.0] * max(math.ceil((end - origin) / bucket_s), 1)
    for r in records:
        opened, closed = r.start_time - origin, r.start_time + r.latency - origin
        first = int(opened / bucket_s)
        last = min(int(closed / bucket_s), len(means) - 1)
        for index in range(first, last + 1):
            low, high = index * bucket_s, (index + 1) * bucket_s
            means[index] += max(min(closed, high) - max(opened, low), 0.0) / bucket_s
    return means


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Most requests open at once, each open over ``[start, start + latency)``."""
    events = sorted(
        [(r.start_time, 1) for r in records] + [(r.start_time + r.latency, -1) for r in records]
    )
    peak = open_now = 0
    for _, delta in events:  # at equal times the -1 sorts first: a close before an open
        open_now += delta
        peak = max(peak, open_now)
    return peak


def arrival_offsets(num: int, request_rate: float, rng: random.Random) -> list[float]:
    """Send time of each request, in seconds from the start: all 0 for an infinite rate, else a
    Poisson process (exponential gaps) scaled so the last request goes out at ``num / rate``,
    which keeps the offered load the same from seed to seed."""
    if request_rate <= 0:
        raise ValueError(f"request rate must be positive, got {request_rate}")
    if math.isinf(request_rate) or num == 0:
        return [0.0] * num
    offsets = list(itertools.accumulate(rng.expovariate(request_rate) for _ in range(num)))
    scale = (num / request_rate) / offsets[-1]
    return [t * scale for t in offsets]


# ==== the HTTP client ============================================================================


@dataclass(frozen=True)
class ClientConfig:
    """Where and how to send the benchmark requests."""

    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float | None = None
    max_concurrency: int | None = None
    request_rate: float = math.inf
    seed: int = 0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(
                f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}"
            )
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if not self.request_rate > 0:
            raise ValueError(
                f"request_rate must be positive (inf: all at once), got {self.request_rate}"
            )

    @property
    def is_chat(self) -> bool:
        return self.endpoint == "/v1/chat/completions"

    @property
    def api_url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, sample: SampleRequest) -> dict[str, Any]:
        """The streamed request for ``sample``; ``ignore_eos`` is vLLM's (and llama.cpp's) extra."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": sample.output_len,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.is_chat:
            body["messages"] = [{"role": "user", "content": sample.prompt}]
        else:
            body["prompt"] = sample.prompt
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body


@dataclass
class _Stream:
    """What one response stream delivered so far."""

    texts: list[str] = field(default_factory=list)
    usage_output_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    usage_cached_tokens: int | None = None
    error: str = ""


async def send_request(
    client: httpx.AsyncClient,
    config: ClientConfig,
    sample: SampleRequest,
    count_tokens: TokenCounter | None = None,
) -> RequestRecord:
    """Send one streamed request and time it; any failure is recorded, never raised."""
    record = RequestRecord(prompt_len=sample.prompt_len)
    stream = _Stream()
    record.start_time = time.perf_counter()
    try:
        async with client.stream(
            "POST", config.api_url, json=config.body(sample), headers=config.headers()
        ) as response:
            if response.status_code != 200:
                record.error = http_error_text(response.status_code, await response.aread())
                return record
            await _read_stream(response, record, stream, config.is_chat)
    except Exception as err:  # a failed request is a result, not a crash of the benchmark
        record.error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        return record
    _finish(record, stream, count_tokens)
    return record


async def _read_stream(
    response: httpx.Response, record: RequestRecord, stream: _Stream, chat: bool
) -> None:
    last = record.start_time
    async for now, data in sse_events(sse_lines(response.aiter_text())):
        if data.get("error"):
            stream.error = error_message(data)
            return
        _take_usage(stream, data.get("usage") or {})
        text = chunk_text(data, chat)
        if not text:
            continue
        if stream.texts:
            record.itl.append(now - last)
        else:
            record.ttft = now - record.start_time
        stream.texts.append(text)
        last = now
    record.latency = last - record.start_time


def _take_usage(stream: _Stream, usage: dict[str, Any]) -> None:
    if (completion := usage.get("completion_tokens")) is not None:
        stream.usage_output_tokens = int(completion)
    if (prompt := usage.get("prompt_tokens")) is not None:
        stream.usage_prompt_tokens = int(prompt)
    if (cached := (usage.get("prompt_tokens_details") or {}).get("cached_tokens")) is not None:
        stream.usage_cached_tokens = int(cached)


def _finish(record: RequestRecord, stream: _Stream, count_tokens: TokenCounter | None) -> None:
    record.generated_text = "".join(stream.texts)
    if stream.error:
        record.error = stream.error
    elif not stream.texts:
        record.error = "the stream ended without any generated text"
    record.success = not record.error
    if stream.usage_prompt_tokens is not None:
        record.prompt_len = stream.usage_prompt_tokens
    record.cached_tokens = stream.usage_cached_tokens
    if stream.usage_output_tokens is not None:
        record.output_tokens = stream.usage_output_tokens
    elif count_tokens is not None:
        record.output_tokens = count_tokens(record.generated_text)
    else:
        record.output_tokens = len(stream.texts)


async def sse_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The lines of an event stream, split at CR LF, LF or CR only (``split_sse_lines``):
    httpx's ``aiter_lines`` also splits at NEL and U+2028, which llama.cpp's server sends raw
    inside JSON strings; a request whose text held one counted as failed (half an event)."""
    rest = ""
    async for chunk in chunks:
        lines, rest = split_sse_lines(rest + chunk)
        for line in lines:
            yield line
    if rest:
        yield rest.removesuffix("\r")


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[float, dict[str, Any]]]:
    """``(arrival time, parsed JSON)`` of each ``data:`` event, up to ``data: [DONE]``."""
    async for line in lines:
        now = time.perf_counter()
        if not line.startswith("data:"):
            continue  # blank separators, ": comments", "event:" lines
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        if payload:
            data = json.loads(payload)
            yield (
                now,
                data if isinstance(data, dict) else {"error": f"unexpected event {payload[:80]}"},
            )


def chunk_text(data: dict[str, Any], chat: bool) -> str:
    """The generated text of one stream chunk (first choice); "" when it carries none."""
    choices = data.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    return text or ""


def error_message(data: dict[str, Any]) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}``)."""
    error = data.get("error", data)
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def http_error_text(status: int, body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        text = error_message(json.loads(text))
    except (ValueError, AttributeError):
        pass
    return f"HTTP {status}: {text[:300]}" if text else f"HTTP {status}"


# ==== the run ====================================================================================


@dataclass
class BenchmarkRun:
    """The records of one timed run (in request order) and its wall time."""

    records: list[RequestRecord]
    duration_s: float


def make_client(limit: int) -> httpx.AsyncClient:
    import httpx

    return httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=30.0),
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
    )


async def check_server(
    client: httpx.AsyncClient, base_url: str, headers: dict[str, str]
) -> list[str]:
    """Model ids from ``GET /v1/models`` ([] if it has none but ``/health`` answers 200).

    Raises ServerUnreachable with a one-line reason otherwise.
    """
    import httpx

    base = base_url.rstrip("/")
    try:
        response = await client.get(f"{base}/v1/models", headers=headers, timeout=10.0)
        if response.status_code in (401, 403):
            raise ServerUnreachable(
                f"{base} refused the API key (HTTP {response.status_code} on "
                "/v1/models); pass the right one with --api-key"
            )
        if response.status_code == 200:
            return [m["id"] for m in response.json().get("data", []) if "id" in m]
        health = await client.get(f"{base}/health", headers=headers, timeout=10.0)
    except httpx.HTTPError as err:
        raise ServerUnreachable(
            f"cannot reach the server at {base} ({type(err).__name__}: "
            f"{str(err) or 'no answer'}); is it running?"
        ) from err
    except ValueError as err:
        raise ServerUnreachable(f"{base}/v1/models did not answer JSON: {err}") from err
    if health.status_code != 200:
        raise ServerUnreachable(
            f"the server at {base} is not ready: /v1/models answered HTTP "
            f"{response.status_code}, /health HTTP {health.status_code}"
        )
    return []


async def run_benchmark(
    client: httpx.AsyncClient,
    config: ClientConfig,
    requests: Sequence[SampleRequest],
    *,
    count_tokens: TokenCounter | None = None,
    num_warmups: int = 0,
    progress: bool = True,
) -> BenchmarkRun:
    """Send ``requests`` (Poisson arrivals at ``request_rate``, at most ``max_concurrency`` open)
    and wait for all of them. Warm-up copies of the first request run before the clock starts."""
    from tqdm import tqdm

    if not requests:
        raise ValueError("no requests to send")
    gate = asyncio.Semaphore(config.max_concurrency or len(requests))

    async def limited(sample: SampleRequest) -> RequestRecord:
        async with gate:
            return await send_request(client, config, sample, count_tokens)

    if num_warmups > 0:
        await asyncio.gather(*(limited(requests[0]) for _ in range(num_warmups)))
    offsets = arrival_offsets(len(requests), config.request_rate, random.Random(config.seed))
    bar = tqdm(total=len(requests), disable=not progress, unit="req", dynamic_ncols=True)
    start = time.perf_counter()
    tasks = []
    for sample, offset in zip(requests, offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(limited(sample))
        task.add_done_callback(lambda _: bar.update(1))
        tasks.append(task)
    records = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - start
    bar.close()
    return BenchmarkRun(records, duration)


# ==== report, JSON, plot =========================================================================


def format_report(metrics: BenchmarkMetrics, config: ClientConfig) -> str:
    """The result table, laid out like vLLM's."""
    rows: list[str] = [" Serving Benchmark Result ".center(50, "=")]

    def row(label: str, value: float | int, digits: int = 2) -> None:
        text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        rows.append(f"{label + ':':<40} {text}")

    row("Successful requests", metrics.completed)
    row("Failed requests", metrics.failed)
    if config.max_concurrency is not None:
        row("Maximum request concurrency", config.max_concurrency)
    if not math.isinf(config.request_rate):
        row("Request rate configured (RPS)", config.request_rate)
    row("Benchmark duration (s)", metrics.duration_s)
    row("Total input tokens", metrics.total_input)
    row("Total generated tokens", metrics.total_output)
    row("Request throughput (req/s)", metrics.request_throughput)
    row("Output token throughput (tok/s)", metrics.output_throughput)
    row("Peak output token throughput (tok/s)", metrics.max_output_tokens_per_s)
    row("Peak concurrent requests", metrics.max_concurrent_requests)
    row("Total token throughput (tok/s)", metrics.total_token_throughput)
    if (hit_rate := metrics.prefix_cache_hit_rate) is not None:
        row("Prefix cache hit rate (%)", 100.0 * hit_rate)
    for name, title in LATENCY_METRICS.items():
        stats, upper = metrics.latencies[name], name.upper()
        rows.append(f" {title} ".center(50, "-"))
        row(f"Mean {upper} (ms)", stats.mean_ms)
        row(f"Median {upper} (ms)", stats.median_ms)
        for p, value in stats.percentiles_ms.items():
            row(f"P{percentile_label(p)} {upper} (ms)", value)
    rows.append("=" * 50)
    return "\n".join(rows)


def failure_summary(records: Sequence[RequestRecord]) -> str:
    """The first distinct errors of failed requests, one per line ("" when none failed)."""
    errors = [r.error for r in records if not r.success]
    if not errors:
        return ""
    distinct = list(dict.fromkeys(e.strip().splitlines()[-1] if e.strip() else "?" for e in errors))
    lines = [f"{len(errors)} request(s) failed; first errors:"]
    lines += [f"  {e}" for e in distinct[:MAX_ERRORS_SHOWN]]
    return "\n".join(lines)


def result_json(
    run: BenchmarkRun, metrics: BenchmarkMetrics, config: ClientConfig, spec: DatasetSpec
) -> dict[str, Any]:
    """Everything ``--save-result`` writes: settings, metrics (vLLM's key names), per request."""
    origin = min((r.start_time for r in run.records), default=0.0)
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "base_url": config.base_url,
        "endpoint": config.endpoint,
        "model_id": config.model,
        "dataset": asdict(spec),
        "num_prompts": len(run.records),
        "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
        "max_concurrency": config.max_concurrency,
        "ignore_eos": config.ignore_eos,
        **metrics.to_dict(),
        "input_lens": [r.prompt_len for r in run.records],
        "output_lens": [r.output_tokens if r.success else 0 for r in run.records],
        "ttfts": [r.ttft for r in run.records],
        "itls": [r.itl for r in run.records],
        "e2els": [r.latency for r in run.records],
        "start_times": [r.start_time - origin for r in run.records],
        "errors": [r.error for r in run.records],
    }


def plot_result(path: str, run: BenchmarkRun, config: ClientConfig) -> None:
    """Latency percentiles per metric (left) and output tok/s over time with requests in flight
    (right), written as an image to ``path``."""
    try:
        import matplotlib
    except ImportError as err:
        raise ValueError("--plot needs matplotlib: pip install 'heron[bench]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in run.records if r.success]
    stats = compute_metrics(run.records, run.duration_s, PLOT_PERCENTILES).latencies
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(PLOT_PERCENTILES)
    for i, p in enumerate(PLOT_PERCENTILES):
        xs = [
            j + (i - (len(PLOT_PERCENTILES) - 1) / 2) * width for j in range(len(LATENCY_METRICS))
        ]
        left.bar(
            xs,
            [stats[m].percentiles_ms[p] for m in LATENCY_METRICS],
            width,
            label=f"p{percentile_label(p)}",
        )
    left.set_xticks(range(len(LATENCY_METRICS)), [m.upper() for m in LATENCY_METRICS])
    left.set_yscale("log")
    left.set_ylabel("ms (log scale)")
    left.set_title("latency percentiles")
    left.legend()
    _plot_over_time(right, ok)
    fig.suptitle(
        f"{config.model} at {config.base_url}: {len(ok)} ok, "
        f"{len(run.records) - len(ok)} failed, {run.duration_s:.1f} s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_over_time(axis: Any, records: Sequence[RequestRecord]) -> None:
    tokens = tokens_per_bucket(records, 1.0)
    edges = range(len(tokens) + 1)
    axis.stairs(tokens, edges, color="tab:blue", linewidth=1.5)
    axis.set_xlabel("seconds since the first request")
    axis.set_ylabel("output tok/s", color="tab:blue")
    axis.set_ylim(bottom=0)
    axis.set_title("throughput over time")
    twin = axis.twinx()
    twin.stairs(in_flight_per_bucket(records, 1.0), edges, color="tab:orange", linewidth=1.5)
    twin.set_ylabel("requests in flight (mean)", color="tab:orange")
    twin.set_ylim(bottom=0)


# ==== command line ===============================================================================


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serving benchmark against any OpenAI-compatible server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    server = p.add_argument_group("server")
    server.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="server root, without /v1"
    )
    server.add_argument(
        "--model", default=None, help="model name to send (default: the first of /v1/models)"
    )
    server.add_argument("--endpoint", default=ENDPOINTS[0], choices=ENDPOINTS)
    server.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $OPENAI_API_KEY)",
    )
    server.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer to build prompts with: an HF directory or a model path "
        "(default: the embedded default model's)",
    )
    data = p.add_argument_group("dataset")
    data.add_argument("--dataset-name", default="random", choices=DATASETS)
    data.add_argument("--num-prompts", type=int, default=100)
    data.add_argument("--input-len", type=int, default=128, help="prompt tokens (after any prefix)")
    data.add_argument("--output-len", type=int, default=64)
    data.add_argument(
        "--range-ratio", type=float, default=0.0, help="lengths uniform in [len*(1-r), len*(1+r)]"
    )
    data.add_argument(
        "--prefix-len",
        type=int,
        default=None,
        help="shared prefix tokens (default: 0 for random, 256 for prefix)",
    )
    data.add_argument(
        "--num-prefixes", type=int, default=1, help="distinct prefixes, used round robin"
    )
    data.add_argument("--seed", type=int, default=0)
    load = p.add_argument_group("load")
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second, Poisson arrivals (default inf: all at once)",
    )
    load.add_argument(
        "--ignore-eos", action="store_true", help="every request produces --output-len tokens"
    )
    load.add_argument("--temperature", type=float, default=None, help="default: the server's")
    load.add_argument("--num-warmups", type=int, default=0, help="untimed requests before the run")
    out = p.add_argument_group("output")
    out.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    out.add_argument("--save-result", default=None, metavar="FILE.json")
    out.add_argument("--plot", default=None, metavar="FILE.png")
    out.add_argument("--disable-tqdm", action="store_true")


def dataset_spec(args: argparse.Namespace) -> DatasetSpec:
    prefix_len = (
        args.prefix_len
        if args.prefix_len is not None
        else (256 if args.dataset_name == "prefix" else 0)
    )
    return DatasetSpec(
        args.dataset_name,
        args.num_prompts,
        args.input_len,
        args.output_len,
        args.range_ratio,
        prefix_len,
        args.num_prefixes,
        args.seed,
    )


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError as err:
        raise ValueError(f"--metric-percentiles must be numbers like 50,99, got {text!r}") from err
    if not values or any(not 0 < p <= 100 for p in values):
        raise ValueError(f"--metric-percentiles must be in (0, 100], got {text!r}")
    return values


def load_bench_tokenizer(path: str | None) -> Tokenizer:
    """``path`` as an HF tokenizer directory, else as a heron model (GGUF file or model dir)."""
    from heron.config import ModelConfig
    from heron.tokenizer import load_tokenizer
    from heron.tokenizer.tokenizer import Tokenizer

    if path is not None and os.path.isdir(path):
        from transformers import AutoTokenizer

        try:
            return Tokenizer(AutoTokenizer.from_pretrained(path))
        except (OSError, ValueError) as err:
            raise ValueError(f"no usable tokenizer in {path}: {err}") from err
    return load_tokenizer(ModelConfig(model=path))


def run(args: argparse.Namespace) -> int:
    """``heron bench serve``; failed requests are part of the result (exit 0), an unreachable
    server is a one-line error (exit 1), bad flags a ValueError (exit 2 from the CLI)."""
    spec = dataset_spec(args)
    percentiles = parse_percentiles(args.metric_percentiles)
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    try:
        return asyncio.run(_run(args, spec, percentiles))
    except ServerUnreachable as err:
        raise SystemExit(f"heron bench serve: error: {err}") from None


async def _run(args: argparse.Namespace, spec: DatasetSpec, percentiles: list[float]) -> int:
    limit = args.max_concurrency or spec.num_prompts
    async with make_client(limit) as client:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        models = await check_server(client, args.base_url, headers)
        if args.model is None and not models:
            raise ServerUnreachable(f"{args.base_url} lists no models; pass --model")
        config = ClientConfig(
            args.base_url,
            args.model or models[0],
            args.endpoint,
            args.api_key,
            args.ignore_eos,
            args.temperature,
            args.max_concurrency,
            args.request_rate,
            args.seed,
        )
        tokenizer = load_bench_tokenizer(args.tokenizer)
        requests = _sample(tokenizer, spec)
        print(
            f"{len(requests)} requests ({sum(r.prompt_len for r in requests)} prompt tokens, "
            f"{sum(r.output_len for r in requests)} output tokens asked) to {config.api_url} "
            f"(model {config.model!r}), request rate {config.request_rate}, "
            f"max concurrency {config.max_concurrency}"
        )
        run_ = await run_benchmark(
            client,
            config,
            requests,
            count_tokens=_counter(tokenizer),
            num_warmups=args.num_warmups,
            progress=not args.disable_tqdm,
        )
    metrics = compute_metrics(run_.records, run_.duration_s, percentiles)
    _report(args, run_, metrics, config, spec)
    return 0


def _sample(tokenizer: Tokenizer, spec: DatasetSpec) -> list[SampleRequest]:
    from heron.bench.datasets import sample_requests

    return sample_requests(tokenizer, spec)


def _counter(tokenizer: Tokenizer) -> TokenCounter:
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def _report(
    args: argparse.Namespace,
    run_: BenchmarkRun,
    metrics: BenchmarkMetrics,
    config: ClientConfig,
    spec: DatasetSpec,
) -> None:
    if summary := failure_summary(run_.records):
        print(summary)
    print(format_report(metrics, config))
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(result_json(run_, metrics, config, spec), f, indent=2)
        print(f"saved {args.save_result}")
    if args.plot:
        plot_result(args.plot, run_, config)
        print(f"plotted {args.plot}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m heron.bench.serve ...`` (the same flags as ``heron bench serve``)."""
    parser = argparse.ArgumentParser(
        prog="heron bench serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as err:
        parser.exit(2, f"heron bench serve: error: {err}\n")


if __name__ == "__main__":
    raise SystemExit(main())
