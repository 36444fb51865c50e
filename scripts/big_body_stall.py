"""How long one big request body stalls the streams beside it.

Starts `heron serve` (the default model) from the checkout this file lives in, keeps one
completion streaming, and posts one big body (each under the 4 MiB cap) at a time: a chat of
16,000 messages, one of 100,000, 1,000 tools, a 686,000-id prompt with echo, 2,048 embedding
inputs, the Anthropic, Responses and Ollama twins of the 16,000-message chat, and that chat
as bad JSON or failing validation at its end. All are 400s (past the context or a cap): the
CPU work before the answer is what is measured. Prints one JSON line per body: its status, its time, and the stream's longest gap
between two SSE events while it ran (``quiet``: the same with no body posted).

    python scripts/big_body_stall.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.server_utils import RemoteServer  # noqa: E402

# 16,000 messages (the cap is 16,384) of 200 characters: ~3.7 MB of JSON
MESSAGES = [{"role": "user", "content": "hello world " * 16 + "12345678"}] * 16_000
TOOL = {"type": "function", "function": {"name": "f", "description": "d " * 1500, "parameters": {
    "type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}}}


def _tools(count: int) -> list[dict]:
    return [{**TOOL, "function": {**TOOL["function"], "name": f"f{i}"}} for i in range(count)]


BODIES: dict[str, tuple[str, Callable[[], object]]] = {
    "chat_16k_messages": ("/v1/chat/completions", lambda: {"messages": MESSAGES}),
    "chat_100k_messages": ("/v1/chat/completions", lambda: {
        "messages": [{"role": "user", "content": "hi"}] * 100_000}),
    "chat_1k_tools": ("/v1/chat/completions", lambda: {
        "messages": [{"role": "user", "content": "hi"}], "tools": _tools(1000), "max_tokens": 1}),
    "completion_686k_ids_echo": ("/v1/completions", lambda: {
        "prompt": list(range(1000, 8000)) * 98, "echo": True}),
    # the last input is past the context: a 400 after all are tokenized, nothing to embed
    "embeddings_2048_inputs": ("/v1/embeddings", lambda: {
        "input": ["word " * 340] * 2047 + ["word " * 33_000]}),
    "anthropic_16k_messages": ("/v1/messages", lambda: {"model": "big", "messages": MESSAGES,
                                                          "max_tokens": 1}),
    "responses_16k_items": ("/v1/responses", lambda: {"input": MESSAGES}),
    "ollama_chat_16k_messages": ("/api/chat", lambda: {"model": "big", "messages": MESSAGES,
                                                         "stream": False}),
    "bad_json_at_end": ("/v1/chat/completions",
                        lambda: json.dumps({"messages": MESSAGES})[:-1] + ",}"),
    "bad_field_at_end": ("/v1/chat/completions", lambda: {
        "messages": [*MESSAGES[:-1], {"role": "user", "content": 5}]}),
}


class Stream:
    """One long streaming completion; the time of every SSE event it receives."""

    def __init__(self, server: RemoteServer) -> None:
        self.server = server
        self.stamps: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        while len(self.stamps) < 5:
            time.sleep(0.05)

    def _run(self) -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 30_000, "stream": True,
                "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", self.server.url("/v1/completions"), json=body,
                          timeout=None) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.stamps.append(time.monotonic())
                if self.stop.is_set():
                    return

    def max_gap(self, start: float, end: float) -> float:
        """The longest gap between events that overlaps [start, end]."""
        stamps = self.stamps
        gaps = [b - a for a, b in zip(stamps, stamps[1:]) if b >= start and a <= end]
        return round(max(gaps, default=0.0), 3)


def post(server: RemoteServer, path: str, body: object) -> tuple[int, float, str]:
    data = body if isinstance(body, str) else json.dumps(body)
    assert len(data) <= 4 << 20, (path, len(data))
    start = time.monotonic()
    r = httpx.post(server.url(path), content=data, timeout=600,
                   headers={"Content-Type": "application/json"})
    return r.status_code, time.monotonic() - start, r.text[:120]


def measure(server: RemoteServer, stream: Stream, name: str) -> dict[str, object]:
    path, make = BODIES[name]
    body = make()
    time.sleep(1.0)  # let the stream settle
    start = time.monotonic()
    status, seconds, answer = post(server, path, body)
    time.sleep(0.3)  # the event after the stall
    return {"body": name, "status": status, "request_s": round(seconds, 2),
            "stream_max_gap_s": stream.max_gap(start, start + seconds), "answer": answer}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=list(BODIES), choices=list(BODIES))
    args = parser.parse_args()
    with RemoteServer(["--max-model-len", "32768", "--served-model-name", "big"]) as server:
        stream = Stream(server)
        time.sleep(1.0)
        start = time.monotonic()
        time.sleep(3.0)
        print(json.dumps({"body": "quiet", "stream_max_gap_s":
                          stream.max_gap(start, time.monotonic())}), flush=True)
        for name in args.only:
            print(json.dumps(measure(server, stream, name)), flush=True)
        stream.stop.set()


if __name__ == "__main__":
    main()
