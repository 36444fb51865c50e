"""What one `echo` + `logprobs` completion costs the engine and the requests beside it.

Starts `heron serve` (the default model) from the checkout this file lives in, sends a
2,000-token prompt with echo=True, logprobs=5, max_tokens=1, and meanwhile streams a short
completion. Prints one JSON line: the engine process's idle and peak RSS, the echo request's
time, and the stream's time to first token and longest inter-token gap.

    python scripts/echo_logprobs_load.py
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.server_utils import RemoteServer  # noqa: E402

PROMPT_TOKENS = 2000
TEXT = "The quick brown fox jumps over the lazy dog while seven wizards quietly hex a sphinx. "
SHORT = {"prompt": "Hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def prompt_ids(server: RemoteServer) -> list[int]:
    body = {"prompt": TEXT * 200, "add_special_tokens": False}
    return [2] + httpx.post(server.url("/tokenize"), json=body).json()["tokens"][: PROMPT_TOKENS - 1]


def stream_meanwhile(server: RemoteServer, into: dict[str, float]) -> None:
    time.sleep(0.5)  # the echo request is in the engine by then
    start, stamps = time.monotonic(), []
    body = {**SHORT, "stream": True}
    with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=900) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.monotonic())
    into["stream_first_token_s"] = round(stamps[0] - start, 2)
    into["stream_max_gap_s"] = round(max(b - a for a, b in zip(stamps, stamps[1:])), 3)


def main() -> None:
    with RemoteServer(["--max-model-len", "4096"]) as server:
        engine = psutil.Process(server.engine_pid())
        ids = prompt_ids(server)
        httpx.post(server.url("/v1/completions"), json=SHORT, timeout=300)  # warm up
        time.sleep(2)
        idle = peak = engine.memory_info().rss
        done = threading.Event()
        result: dict[str, float] = {}

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, engine.memory_info().rss)
                time.sleep(0.01)

        threads = [threading.Thread(target=sample),
                   threading.Thread(target=stream_meanwhile, args=(server, result))]
        for t in threads:
            t.start()
        start = time.monotonic()
        r = httpx.post(server.url("/v1/completions"), timeout=900, json={
            "prompt": ids, "echo": True, "logprobs": 5, "max_tokens": 1, "temperature": 0})
        result["echo_request_s"] = round(time.monotonic() - start, 2)
        threads[1].join()
        done.set()
        threads[0].join()
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == 2001
        print(json.dumps({"engine_idle_rss_mib": idle >> 20, "engine_peak_rss_mib": peak >> 20,
                          "peak_over_idle_mib": (peak - idle) >> 20, **result}))


if __name__ == "__main__":
    main()
