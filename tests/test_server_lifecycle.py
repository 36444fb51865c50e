"""End to end: auth, client disconnects, concurrency, signals and engine death."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from heron.engine.client import remove_stale_ipc_dirs
from tests.server_utils import DEFAULT_MODEL_NAME, REPO_ROOT, RemoteServer, free_port, pid_exists

pytestmark = pytest.mark.slow

MODEL = DEFAULT_MODEL_NAME
KEY = "sk-heron-test"
ARGS = ["--served-model-name", MODEL, "--kv-cache-memory", "256MiB"]
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": 2,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    with RemoteServer(ARGS, api_key=KEY) as srv:
        yield srv


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


def engine_load(server: RemoteServer) -> tuple[float, float, float, float]:
    text = httpx.get(server.url("/metrics"), headers=server.headers()).text
    return (
        metric(text, "heron:num_requests_running"),
        metric(text, "heron:num_requests_waiting"),
        metric(text, "heron:kv_cache_usage_perc"),
        metric(text, "heron:generation_tokens_total"),
    )


def wait_for(predicate, timeout_s: float, interval_s: float = 0.2) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    return wait_for(lambda: not pid_exists(pid), timeout_s)


# ---- auth -----------------------------------------------------------------------------------------

ENDPOINTS = [
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1}),
    ("POST", "/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 16}),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "Hi"}),
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{MODEL}", None),
    ("POST", "/tokenize", {"prompt": "Hi"}),
    ("POST", "/detokenize", {"tokens": [2, 9259]}),
    ("GET", "/version", None),
    ("GET", "/metrics", None),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
]


@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=[p for _, p, _ in ENDPOINTS])
def test_auth_on_every_endpoint(
    server: RemoteServer, method: str, path: str, body: dict | None
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.request(method, server.url(path), json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "invalid_api_key"
    r = httpx.request(method, server.url(path), json=body, headers=server.headers())
    assert r.status_code == 200, r.text


def test_options_without_a_key_reveals_no_route(server: RemoteServer) -> None:
    for path in ("/v1/chat/completions", "/v1/models", "/no/such/route", "/openapi.json"):
        r = httpx.options(server.url(path))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path


def test_health_needs_no_key(server: RemoteServer) -> None:
    assert httpx.get(server.url("/health")).status_code == 200
    head = httpx.head(server.url("/health"))
    assert head.status_code == 200 and head.content == b""


def test_health_reflects_a_stopped_engine(server: RemoteServer) -> None:
    """SIGSTOP: no heartbeat, /health says 503 within seconds; SIGCONT: 200, requests flow."""
    engine = server.engine_pid()
    with httpx.Client(headers=server.headers(), timeout=60) as client:
        os.kill(engine, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            assert wait_for(lambda: client.get(server.url("/health")).status_code == 503, 8.0)
            assert time.monotonic() - stopped < 6.0
            error = client.get(server.url("/health")).json()["error"]
            assert "not answered" in error["message"] and error["type"] == "server_error"
        finally:
            os.kill(engine, signal.SIGCONT)
        assert wait_for(lambda: client.get(server.url("/health")).status_code == 200, 5.0)
        r = client.post(server.url("/v1/chat/completions"), json=CHAT)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_sdk_with_wrong_and_right_key(server: RemoteServer) -> None:
    wrong = openai.OpenAI(base_url=server.api_base, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert [m.id for m in server.client().models.list().data] == [MODEL]


# ---- disconnects ----------------------------------------------------------------------------------


def long_request(stream: bool) -> dict:
    return {**CHAT, "max_tokens": 4000, "ignore_eos": True, "stream": stream}


def assert_drained(server: RemoteServer, baseline_kv: float) -> None:
    """No request left running or waiting, KV usage back, and no token generated any more."""
    assert wait_for(lambda: engine_load(server)[:3] == (0.0, 0.0, baseline_kv), 10.0), engine_load(
        server
    )
    generated = engine_load(server)[3]
    time.sleep(1.0)
    assert engine_load(server)[3] == generated


def test_stream_disconnect_aborts(server: RemoteServer) -> None:
    running, waiting, kv, _ = engine_load(server)
    assert (running, waiting) == (0.0, 0.0)
    with httpx.Client(headers=server.headers(), timeout=60) as client:
        streams = [
            client.stream("POST", server.url("/v1/chat/completions"), json=long_request(True))
            for _ in range(3)
        ]
        readers = []  # keep the line iterators alive: dropping one closes its connection
        for s in streams:
            readers.append(s.__enter__().iter_lines())
            assert next(readers[-1]).startswith("data: ")
        assert wait_for(lambda: engine_load(server)[0] == 3.0, 10.0), engine_load(server)
        assert engine_load(server)[2] > kv
        for s in streams:
            s.__exit__(None, None, None)  # drop the connection after the first chunk
    assert_drained(server, kv)


def test_non_stream_disconnect_aborts(server: RemoteServer) -> None:
    kv = engine_load(server)[2]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url("/v1/chat/completions"),
            json=long_request(False),
            headers=server.headers(),
            timeout=httpx.Timeout(5.0, read=3.0),
        )
    assert_drained(server, kv)


# ---- concurrency ----------------------------------------------------------------------------------


async def one_stream(client: httpx.AsyncClient, url: str, i: int) -> tuple[str, dict, bool]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Count to {i}."}],
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, usage, done = "", {}, False
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                done = True
                continue
            assert not done, "data after [DONE]"
            chunk = json.loads(payload)
            if chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content") or ""
            if chunk.get("usage"):
                usage = chunk["usage"]
    return text, usage, done


def test_64_concurrent_streams(server: RemoteServer) -> None:
    async def run_all() -> list[tuple[str, dict, bool]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(
            headers=server.headers(), timeout=300, limits=limits
        ) as client:
            return list(
                await asyncio.gather(
                    *[one_stream(client, server.url("/v1/chat/completions"), i) for i in range(64)]
                )
            )

    results = asyncio.run(run_all())
    assert len(results) == 64
    for _text, usage, done in results:
        assert done
        assert 1 <= usage["completion_tokens"] <= 3  # an eos may come first
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["prompt_tokens"] > 0
    # The same prompt gives the same text whether it ran alone or among 64.
    alone = asyncio.run(_single(server, 5))
    assert alone == results[5][0]
    assert engine_load(server)[:2] == (0.0, 0.0)


async def _single(server: RemoteServer, i: int) -> str:
    async with httpx.AsyncClient(headers=server.headers(), timeout=120) as client:
        return (await one_stream(client, server.url("/v1/chat/completions"), i))[0]


# ---- signals and process lifetime (these stop servers: keep them last) ----------------------------


def test_sigterm_stops_server_and_engine(server: RemoteServer) -> None:
    engine = server.engine_pid()
    assert pid_exists(engine)
    assert server.stop(signal.SIGTERM, timeout_s=30) == 0
    assert wait_gone(engine), "engine core outlived the server"
    assert "engine core stopped" in server.log_text()


def test_signal_during_startup_stops_engine() -> None:
    with RemoteServer(ARGS, wait_ready=False) as srv:
        assert wait_for(lambda: "engine core process started" in srv.log_text(), 60.0)
        engine = srv.engine_pid()
        assert srv.stop(signal.SIGINT, timeout_s=30) == 0
        assert wait_gone(engine)
        assert "received SIGINT during start-up" in srv.log_text()


def test_engine_dies_with_killed_server() -> None:
    with RemoteServer(ARGS) as srv:
        engine = srv.engine_pid()
        sockets = Path(tempfile.gettempdir()).glob(f"heron-{srv.proc.pid}-*")
        os.kill(srv.proc.pid, signal.SIGKILL)  # no chance to clean up: the kernel tells the engine
        srv.proc.wait(10)
        assert wait_gone(engine), "engine core orphaned by a killed server"
    [left] = list(sockets)  # its socket folder stays behind; the next start removes it
    assert str(left) in remove_stale_ipc_dirs() and not left.exists()


def test_engine_death_fails_requests_then_the_server_exits_3() -> None:
    """kill -9 of the core: what is in flight gets an error at once, then the API process
    shuts down with exit status 3 for its supervisor (it does not serve 503s forever)."""
    with RemoteServer(ARGS) as srv, httpx.Client(timeout=60) as client:
        waiting = asyncio.new_event_loop()
        pending = waiting.run_in_executor(
            None, lambda: client.post(srv.url("/v1/chat/completions"), json=long_request(False))
        )
        with client.stream(
            "POST", srv.url("/v1/chat/completions"), json=long_request(True)
        ) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(srv.engine_pid(), signal.SIGKILL)
            killed = time.monotonic()
            rest = [line for line in lines if line]
        assert time.monotonic() - killed < 5.0
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert error["error"]["type"] == "server_error"
        r = waiting.run_until_complete(pending)
        waiting.close()
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        srv.proc.wait(30)
        assert srv.proc.returncode == 3
        assert "shutting down with exit status 3" in srv.log_text()


def test_bad_model_path_fails_fast() -> None:
    """Exit 1 naming the path. A free port: with a port some other process holds (port 1 before,
    taken by a concurrent run), uvicorn's failed bind could stop the start first (exit 3)."""
    proc = subprocess.run(
        [sys.executable, "-m", "heron.cli", "serve", "/nonexistent/model.gguf",
         "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 1
    assert "/nonexistent/model.gguf" in proc.stderr and "not found" in proc.stderr
    pids = re.findall(r"engine core process started \(pid (\d+)\)", proc.stderr)
    assert all(not pid_exists(int(p)) for p in pids)


def test_the_api_process_runs_on_uvloop() -> None:
    """uvloop is a dependency on Linux: the API's loop (every token passes through it twice) is
    libuv's, with asyncio's as the fallback where it is not installed."""
    from heron.server.launch import _run_loop

    async def loop_module() -> int:
        return 1 if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else 0

    assert _run_loop(loop_module()) == 1
