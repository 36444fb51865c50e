"""The API side of the engine boundary without a core process: liveness from heartbeats,
reading the core's output socket, no response queue left behind by a request that cannot be
sent, metrics after the core died, and stale socket folders of dead servers."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from heron.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from heron.engine.client import EngineClient, Liveness, _OutputWaiter, remove_stale_ipc_dirs
from heron.engine.messages import EngineRequest, EngineStats, Heartbeat
from heron.sampling_params import SamplingParams


def test_liveness_from_heartbeats() -> None:
    live = Liveness(heartbeat_timeout_s=3.0, step_timeout_s=60.0)
    live.beat(Heartbeat(steps=5, busy=True), now=100.0)
    assert live.problem(now=102.9) is None
    assert "not answered for 3.5 s" in (live.problem(now=103.5) or "")  # SIGSTOP: no beats
    for t in range(104, 160):  # beats again, busy, but its loop finishes no step
        live.beat(Heartbeat(steps=5, busy=True), now=float(t))
        assert live.problem(now=float(t)) is None
    live.beat(Heartbeat(steps=5, busy=True), now=160.5)
    assert "finished no step for 60 s" in (live.problem(now=160.5) or "")
    live.beat(Heartbeat(steps=6, busy=True), now=161.0)
    assert live.problem(now=161.0) is None
    for t in range(162, 240):  # idle: no steps expected
        live.beat(Heartbeat(steps=6, busy=False), now=float(t))
    assert live.problem(now=240.0) is None


class _Process:
    """A running core process, as ``subprocess.Popen`` shows one."""

    pid = 12345

    def poll(self) -> int | None:
        return None


class _Socket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes, *args: object, **kwargs: object) -> None:
        self.sent.append(data)

    def close(self, linger: int = 0) -> None:
        pass


def _client() -> EngineClient:
    config = EngineConfig(ModelConfig(), CacheConfig(), SchedulerConfig())
    client = EngineClient(config)
    client._launcher._process = _Process()  # type: ignore[assignment]
    client._input = _Socket()  # type: ignore[assignment]
    return client


def _request(rid: str, **params: object) -> EngineRequest:
    return EngineRequest(request_id=rid, prompt_token_ids=[1, 2],
                         sampling_params=SamplingParams(**params))  # type: ignore[arg-type]


def test_output_waiter_takes_every_message_and_wakes_on_the_next() -> None:
    """The core's outputs are read with non-blocking reads while the socket's descriptor stays
    registered with the loop: what arrived is taken in order, a message sent after a drain or
    during a wait is seen well before the wait's timeout (a wait may also end with nothing to
    read), an idle wait times out, and the descriptor is released at the end."""

    async def run() -> None:
        ctx = zmq.Context()
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind("inproc://heron-output-waiter")
        push.connect("inproc://heron-output-waiter")
        loop = asyncio.get_running_loop()
        try:
            with _OutputWaiter(pull) as waiter:
                assert list(waiter.ready()) == []
                start = time.monotonic()
                await waiter.wait(0.05)
                assert waiter.timed_out and time.monotonic() - start >= 0.04
                for i in range(3):
                    push.send(b"m%d" % i)
                assert list(waiter.ready()) == [b"m0", b"m1", b"m2"]
                assert list(waiter.ready()) == []
                push.send(b"after the drain")  # between a drain and the next wait
                assert await _next_message(waiter) == b"after the drain"
                loop.call_later(0.05, push.send, b"while waiting")
                assert await _next_message(waiter) == b"while waiting"
            assert loop.remove_reader(pull.getsockopt(zmq.FD)) is False
        finally:
            push.close(linger=0)
            pull.close(linger=0)
            ctx.term()

    asyncio.run(run())


async def _next_message(waiter: _OutputWaiter) -> bytes:
    """Wait as the dispatch loop does (a wake may find nothing: wait again) for one message,
    which must come well before the wait's timeout."""
    start = time.monotonic()
    while not (got := list(waiter.ready())):
        await waiter.wait(5.0)
        assert not waiter.timed_out
    assert len(got) == 1 and time.monotonic() - start < 1.0
    return got[0]


def test_a_request_that_cannot_be_sent_leaves_no_queue() -> None:
    async def run() -> None:
        client = _client()
        bad = _request("bad-0")
        bad.sampling_params.top_k = 2**70  # past validation: msgpack cannot carry it
        with pytest.raises(OverflowError):
            client.stream([_request("bad-1"), bad])
        assert client.num_in_flight == 0 and client._input.sent == []  # type: ignore[union-attr]
        stream = client.stream([_request("ok-0"), _request("ok-1")])
        assert client.num_in_flight == 2
        stream.abort_all()
        assert client.num_in_flight == 0
        client._launcher._process = None
        await client.shutdown()

    asyncio.run(run())


def test_a_dead_core_leaves_no_load_in_the_metrics() -> None:
    async def run() -> None:
        client = _client()
        client.info = object()  # type: ignore[assignment]
        client.stats = EngineStats(num_running=32, num_waiting=4, kv_cache_usage=0.7,
                                   generation_tokens_total=900)
        stream = client.stream([_request("r-0")])
        client._mark_dead("the engine core process exited (exit code -9)")
        assert (client.stats.num_running, client.stats.num_waiting) == (0, 0)
        assert client.stats.kv_cache_usage == 0.0 and client.stats.generation_tokens_total == 900
        assert client.num_in_flight == 0
        assert "exit code -9" in (client.health() or "")
        assert "exit code -9" in await asyncio.wait_for(client.wait_dead(), 1.0)
        with pytest.raises(Exception, match="exit code -9"):
            async for _ in stream:
                pass
        client._launcher._process = None
        await client.shutdown()

    asyncio.run(run())


def _socket_dir(root: Path, name: str, listen: bool) -> tuple[Path, socket.socket | None]:
    folder = root / name
    folder.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(folder / "input"))
    if listen:
        sock.listen()
        return folder, sock
    sock.close()  # the path stays, nobody listens: what a killed process leaves
    return folder, None


def test_stale_socket_folders_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    gone, _ = _socket_dir(tmp_path, f"heron-{dead_pid}-abcd1234", listen=False)
    mine, _ = _socket_dir(tmp_path, f"heron-{os.getpid()}-abcd1234", listen=False)
    old_stale, _ = _socket_dir(tmp_path, "heron-zz_9abcd", listen=False)
    old_live, server = _socket_dir(tmp_path, "heron-live1234", listen=True)
    other = tmp_path / f"heron-{dead_pid}-keepthis"
    other.mkdir()
    (other / "notes.txt").write_text("not a socket folder")
    log = tmp_path / "heron-serve-abcd1234.log"
    log.write_text("a file")
    try:
        removed = remove_stale_ipc_dirs(str(tmp_path))
    finally:
        assert server is not None
        server.close()
    assert sorted(removed) == sorted([str(gone), str(old_stale)])
    assert mine.is_dir() and old_live.is_dir() and other.is_dir() and log.is_file()
