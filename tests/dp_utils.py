"""What the data-parallel end-to-end tests share: requests, per-engine metrics, a kill in flight."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx

from tests.server_utils import RemoteServer

PROMPTS = ["Hello", "The quick brown fox", "A", "0123456789", "data parallel", "zz top"]


def complete(server: RemoteServer, prompt: str | list[int], **fields: object) -> dict:
    """A greedy completion (10 tokens unless ``fields`` say otherwise); asserts a 200."""
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, **fields}
    response = httpx.post(server.url("/v1/completions"), json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def engine_metric(server: RemoteServer, name: str) -> dict[str, float]:
    """{"0": engine 0's value, "1": engine 1's, "": the sum} of one metric in /metrics."""
    text = httpx.get(server.url("/metrics")).text
    values = {}
    for labels, value in re.findall(rf"^{re.escape(name)}{{([^}}]*)}} (\S+)$", text, re.M):
        engine = re.search(r'engine="(\d+)"', labels)
        values[engine.group(1) if engine else ""] = float(value)
    return values


def settled(server: RemoteServer, name: str, want: float, timeout_s: float = 10.0) -> dict:
    """Poll a metric until its sum reaches ``want`` (engines send stats when they go idle)."""
    deadline = time.monotonic() + timeout_s
    values = engine_metric(server, name)
    while values.get("") != want and time.monotonic() < deadline:
        time.sleep(0.1)
        values = engine_metric(server, name)
    return values


def kill_engine_during_two_streams(server: RemoteServer, engine: int) -> tuple[dict, str, int]:
    """Start two long streams (one per engine: both are idle and the prompts share no block),
    SIGKILL ``engine``'s core once both generate, and wait for both streams to end.

    Returns (the error of the stream that failed, the other stream's SSE text, the killed pid);
    asserts that exactly one stream failed.
    """
    results: dict[str, str] = {}
    started = threading.Barrier(3)

    def stream(name: str) -> None:
        body = {"prompt": name, "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=120) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            first = next(lines)
            started.wait(30)
            results[name] = "\n".join([first, *lines])

    # pids first: the kill must follow the streams' first tokens at once (a fast engine
    # finishes 1000 tokens within one /health round trip)
    pids = {e["engine"]: e["pid"] for e in httpx.get(server.url("/health")).json()["engines"]}
    threads = [threading.Thread(target=stream, args=(name,)) for name in ("x", "y")]
    for t in threads:
        t.start()
    started.wait(30)
    os.kill(pids[engine], signal.SIGKILL)
    for t in threads:
        t.join(120)
    failed = [name for name, text in results.items() if '"error"' in text]
    assert len(failed) == 1, results
    error = json.loads(results[failed[0]].splitlines()[-2].removeprefix("data: "))["error"]
    survivor = results["y" if failed == ["x"] else "x"]
    return error, survivor, pids[engine]
