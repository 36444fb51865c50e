"""Data parallelism without engines: the routing policy, the CPU split, the CURVE-secured
engine sockets (a client without the secret cannot connect) and the error without Ray."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

import msgspec
import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from heron.config import ParallelConfig
from heron.engine import dp_launch
from heron.engine.dp_launch import cpu_split
from heron.engine.dp_ray import (
    CurveKeys,
    require_ray,
    secure_client,
    secure_server,
    start_authenticator,
)
from heron.engine.dp_routing import MIN_SLACK, PrefixAffinity, RoundRobin, block_hashes
from heron.engine.messages import AbortRequests, ClientMessage

BLOCK = 16
UP = [True, True]


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 500 + 4 for i in range(length)]


# ==== routing =====================================================================================


def test_block_hashes_cover_every_full_block() -> None:
    assert len(block_hashes(list(range(15)), BLOCK)) == 0
    assert len(block_hashes(list(range(16)), BLOCK)) == 1  # the prefix cache takes it too
    assert len(block_hashes(list(range(17)), BLOCK)) == 1
    assert len(block_hashes(list(range(48)), BLOCK)) == 3
    a, b = block_hashes(list(range(40)), BLOCK), block_hashes(list(range(33)) + [999] * 7, BLOCK)
    assert a[:2] == b[:2]  # chained: equal first blocks, equal hashes
    c = block_hashes([5] + list(range(1, 40)), BLOCK)
    assert c[0] != a[0] and c[1] != a[1]  # a different first block changes every hash


def test_prefix_affinity_keeps_a_prefix_on_one_engine() -> None:
    policy = PrefixAffinity(2, BLOCK)
    shared = prompt(1, 512)
    first = policy.pick(shared + [7, 8, 9], [0, 0], UP)
    loads = [0, 0]
    for i in range(7):
        loads[first] += 1  # the earlier ones are still running: affinity within the bound
        assert policy.pick(shared + [100 + i, 5], loads, UP) == first
    other = policy.pick(prompt(2, 512), loads, UP)
    assert other == 1 - first  # a new prefix goes to the least loaded engine


def test_prompts_without_a_full_block_alternate_between_idle_engines() -> None:
    policy = PrefixAffinity(2, BLOCK)
    assert [policy.pick([1, 2, 3], [0, 0], UP) for _ in range(4)] == [0, 1, 0, 1]


def test_imbalance_is_bounded() -> None:
    policy = PrefixAffinity(2, BLOCK)
    shared = prompt(3, 64)
    home = policy.pick(shared, [0, 0], UP)
    busy = [0, 0]
    busy[home] = MIN_SLACK  # exactly at the bound: still home
    assert policy.pick(shared + [1], busy, UP) == home
    busy[home] = MIN_SLACK + 1  # past it: the least loaded engine, which now owns the prefix
    assert policy.pick(shared + [2], busy, UP) == 1 - home
    assert policy.affine_engine(shared + [3]) == 1 - home
    relative = [0, 0]
    relative[home], relative[1 - home] = 40, 25  # 15 over 25: within max(8, 0.5 * 25)
    assert policy.pick(shared + [4], relative, UP) == 1 - home


def test_engines_that_are_down_get_nothing() -> None:
    policy = PrefixAffinity(2, BLOCK)
    shared = prompt(4, 64)
    home = policy.pick(shared, [0, 0], UP)
    up = [True, True]
    up[home] = False
    assert policy.pick(shared, [0, 0], up) == 1 - home
    assert RoundRobin(3).pick([], [0, 0, 0], [False, True, False]) == 1
    with pytest.raises(ValueError, match="no engine is up"):
        policy.pick(shared, [0, 0], [False, False])


def test_round_robin_ignores_prefixes() -> None:
    policy = RoundRobin(2)
    shared = prompt(5, 512)
    assert [policy.pick(shared, [0, 0], UP) for _ in range(4)] == [0, 1, 0, 1]


# ==== configuration ===============================================================================


def test_cpu_split() -> None:
    assert cpu_split(1, None, [0, 1, 2, 3]) is None  # one engine: left unpinned
    assert cpu_split(2, None, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]
    assert cpu_split(2, 1, [4, 5, 6]) == [[4], [5]]
    assert cpu_split(1, 2, [0, 1, 2]) == [[0, 1]]
    with pytest.raises(ValueError, match="2 engines x 2 CPUs need 4 CPUs"):
        cpu_split(2, 2, [0, 1])
    with pytest.raises(ValueError, match="need at least 3 CPUs"):
        cpu_split(3, None, [0, 1])


def test_engine_threads_share_the_cgroups_cpu_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two engines on 16 CPUs each of a host, in a container with --cpus=5: 2 threads each."""
    monkeypatch.setattr(dp_launch, "cpu_quota", lambda: 5.0)
    assert dp_launch._engine_threads(16, 2) == 2
    assert dp_launch._engine_threads(1, 2) == 1
    monkeypatch.setattr(dp_launch, "cpu_quota", lambda: 1.0)
    assert dp_launch._engine_threads(8, 4) == 1  # never none
    monkeypatch.setattr(dp_launch, "cpu_quota", lambda: None)
    assert dp_launch._engine_threads(16, 2) == 16


def test_parallel_config_validates() -> None:
    with pytest.raises(ValueError, match="data_parallel_backend must be one of mp, ray"):
        ParallelConfig(backend="slurm")
    with pytest.raises(ValueError, match="router must be one of prefix, round-robin"):
        ParallelConfig(router="random")
    with pytest.raises(ValueError, match="data_parallel_size must be positive"):
        ParallelConfig(data_parallel_size=0)


def test_ray_backend_without_ray_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from heron.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ValueError, match=r"needs Ray, which is not installed: pip install "):
        require_ray()
    with pytest.raises(SystemExit) as exc:
        main(["serve", "some-model", "-dp", "2", "--data-parallel-backend", "ray"])
    assert exc.value.code == 2
    assert "pip install 'heron[ray]'" in capsys.readouterr().err


# ==== the engine sockets refuse clients without the secret ========================================


def _handshake(sock: zmq.Socket, monitor: zmq.Socket, timeout_s: float = 5.0) -> str:
    """The first handshake outcome a socket's monitor reports."""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if monitor.poll(100):
                event = zmq.Event(recv_monitor_message(monitor)["event"])
                if event.name.startswith("HANDSHAKE_"):
                    return event.name
        return "none"
    finally:
        sock.disable_monitor()
        monitor.close(0)


def test_curve_sockets_admit_only_the_engine_key() -> None:
    asyncio.run(_curve_check())


async def _curve_check() -> None:
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    keys = CurveKeys(server_public, client_public, client_secret)
    actx = zmq.asyncio.Context()
    auth = start_authenticator(actx, client_public)
    server = actx.socket(zmq.PULL)
    from heron.engine.dp_ray import ServerKeys

    secure_server(server, ServerKeys(server_public, server_secret))
    port = server.bind_to_random_port("tcp://127.0.0.1")
    ctx = zmq.Context()

    async def attempt(secure: object) -> tuple[str, bytes | None]:
        client = ctx.socket(zmq.PUSH)
        client.setsockopt(zmq.LINGER, 0)
        if secure is not None:
            secure(client)  # type: ignore[operator]
        monitor = client.get_monitor_socket()
        client.connect(f"tcp://127.0.0.1:{port}")
        outcome = await asyncio.to_thread(_handshake, client, monitor)
        with contextlib.suppress(zmq.Again):  # a refused client may have no pipe to queue on
            client.send(msgspec.msgpack.encode(AbortRequests(request_ids=["x"])), zmq.NOBLOCK)
        got = await server.recv() if await server.poll(500) else None
        return outcome, got

    def stranger(sock: zmq.Socket) -> None:  # knows the server key, has its own key pair
        public, secret = zmq.curve_keypair()
        secure_client(sock, CurveKeys(server_public, public, secret))

    try:
        outcome, got = await attempt(None)  # no CURVE at all
        assert outcome.startswith("HANDSHAKE_FAILED_") and got is None
        assert await attempt(stranger) == ("HANDSHAKE_FAILED_AUTH", None)  # ZAP says no
        outcome, got = await attempt(lambda sock: secure_client(sock, keys))
        assert outcome == "HANDSHAKE_SUCCEEDED"
        assert got is not None
        message = msgspec.msgpack.decode(got, type=ClientMessage)
        assert message == AbortRequests(request_ids=["x"])
    finally:
        server.close(0)
        auth.stop()
        actx.destroy(linger=0)
        ctx.destroy(linger=0)


# ==== a Ray actor's life as its launcher sees it ==================================================


def test_ray_launcher_counts_restarts_up_to_the_bound() -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (the test extra installs it)")
    from types import SimpleNamespace

    from heron.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from heron.engine.dp_ray import RayLauncher

    backend = SimpleNamespace(ray=ray, host="127.0.0.1")
    config = EngineConfig(ModelConfig(), CacheConfig(), SchedulerConfig())
    launcher = RayLauncher(
        backend, 0, "engine core 0", config, 1, False,  # type: ignore[arg-type]
        ParallelConfig(data_parallel_size=2, backend="ray", max_restarts=1), 20,
    )
    assert launcher.alive() and launcher.may_restart()  # starting
    launcher._up("first", 101, "node-a")
    assert (launcher.pid, launcher.alive()) == (101, True)
    launcher._down(ray.exceptions.ActorUnavailableError("restarting", None))
    assert not launcher.alive() and launcher.may_restart()
    assert "Ray restarts it" in launcher.exit_reason()
    launcher._down(ray.exceptions.ActorDiedError())  # died again before the restart: not final
    assert launcher.may_restart()
    launcher._up("second", 202, "node-b")  # a new incarnation: one restart used
    assert (launcher.pid, launcher.alive(), launcher._restarts) == (202, True, 1)
    launcher._down(ray.exceptions.ActorDiedError())  # the bound is used up: gone for good
    assert not launcher.alive() and not launcher.may_restart()
    assert "gone for good" in launcher.exit_reason()
