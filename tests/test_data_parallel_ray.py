"""End to end: `heron serve MODEL --data-parallel-size 2 --data-parallel-backend ray` on a Ray
cluster of two nodes (1 CPU each) started here, with a tiny random Llama.

One cluster and one server for the whole module (Ray starts slowly). The engines are Ray actors,
one per node; requests and outputs go over CURVE-secured ZMQ TCP sockets, which refuse a client
without the secret. A killed actor fails its own requests, and Ray restarts it.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from heron import LLM, SamplingParams
from tests.dp_utils import (
    PROMPTS,
    complete,
    engine_metric,
    kill_engine_during_two_streams,
    settled,
)
from tests.server_utils import REPO_ROOT, RemoteServer
from tests.tiny_models import save_tiny_server_model

ray_cluster_utils = pytest.importorskip(
    "ray.cluster_utils", reason="Ray is not installed (pip install -e '.[test]' installs it)"
)

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_server_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """Two Ray nodes on this machine, 1 CPU each; yields the head's address. Their workers
    import heron from this checkout."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", *RAY_ENV)}
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in [saved["PYTHONPATH"]] if p]
    )
    os.environ.update(RAY_ENV)
    node = {"num_cpus": 1, "object_store_memory": 80 << 20}
    ray_cluster = ray_cluster_utils.Cluster(
        initialize_head=True, head_node_args={**node, "include_dashboard": False}
    )
    try:
        ray_cluster.add_node(**node)
        ray_cluster.wait_for_nodes()
        yield ray_cluster.address
    finally:
        ray_cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def server(model_dir: Path, cluster: str) -> Iterator[RemoteServer]:
    args = [
        str(model_dir), "--kv-cache-memory", "16MiB", "--data-parallel-size", "2",
        "--data-parallel-backend", "ray", "--ray-address", cluster,
        "--data-parallel-max-restarts", "1",
    ]
    with RemoteServer(args, env=RAY_ENV) as srv:
        yield srv


def test_greedy_outputs_equal_one_engine_and_both_serve(
    server: RemoteServer, model_dir: Path
) -> None:
    llm = LLM(str(model_dir), kv_cache_memory=16 << 20)
    reference = [r.outputs[0].text for r in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert [complete(server, p)["choices"][0]["text"] for p in PROMPTS] == reference
    tokens = settled(server, "heron:generation_tokens_total", len(PROMPTS) * 10)
    assert tokens["0"] > 0 and tokens["1"] > 0, tokens
    nodes = set(re.findall(r"is Ray actor pid \d+ on node \S+ \((\w+)\)", server.log_text()))
    assert len(nodes) == 2, server.log_tail()  # one engine per Ray node


def test_shared_prefix_lands_on_one_engine(server: RemoteServer) -> None:
    prefix = [(i * 41 + 7) % 400 + 100 for i in range(512)]
    before_hits = engine_metric(server, "heron:prefix_cache_hits_total")
    before_queries = engine_metric(server, "heron:prefix_cache_queries_total")
    for i in range(8):
        complete(server, prefix + [4 + i, 50, 60], max_tokens=2)
    settled(server, "heron:prefix_cache_queries_total", before_queries[""] + 8 * 515)
    hits = engine_metric(server, "heron:prefix_cache_hits_total")
    new_hits = sorted(hits[e] - before_hits[e] for e in ("0", "1"))
    assert new_hits == [0, 7 * 512]


def engine_addresses(server: RemoteServer) -> list[str]:
    found = re.findall(r"engine core \d: engine sockets (tcp://\S+), (tcp://\S+) \(CURVE\)",
                       server.log_text())
    assert len(found) == 2, server.log_tail()
    return [addr for pair in found for addr in pair]


def handshake(kind: int, address: str, keys: tuple[bytes, bytes, bytes] | None) -> str:
    """Connect a socket to an engine address; the first handshake outcome it sees."""
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
    monitor = sock.get_monitor_socket()
    sock.connect(address)
    deadline, outcome = time.monotonic() + 5, "none"
    while outcome == "none" and time.monotonic() < deadline:
        if monitor.poll(100):
            name = zmq.Event(recv_monitor_message(monitor)["event"]).name
            outcome = name if name.startswith("HANDSHAKE_") else outcome
    sock.disable_monitor()
    monitor.close(0)
    sock.close(0)
    ctx.term()
    return outcome


def test_engine_sockets_refuse_a_client_without_the_secret(server: RemoteServer) -> None:
    for address in engine_addresses(server):  # requests (PUSH) and outputs (PULL) of each engine
        kind = zmq.PULL if address in engine_addresses(server)[::2] else zmq.PUSH
        assert handshake(kind, address, None).startswith("HANDSHAKE_FAILED_")
        public, secret = zmq.curve_keypair()
        guessed_server, _ = zmq.curve_keypair()
        assert handshake(kind, address, (public, secret, guessed_server)).startswith(
            "HANDSHAKE_FAILED_"
        )
    assert complete(server, PROMPTS[0])["choices"][0]["finish_reason"] == "length"


def test_killed_actor_fails_its_requests_and_ray_restarts_it(server: RemoteServer) -> None:
    """Last in the module: it kills engine 0's actor (Ray restarts it, once at most)."""
    error, survivor, killed = kill_engine_during_two_streams(server, 0)
    assert error["code"] == "engine_unavailable"
    assert "engine core 0" in error["message"], error
    assert survivor.count('"text"') == 1000 and survivor.endswith("data: [DONE]")

    assert complete(server, PROMPTS[2])["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 120
    while httpx.get(server.url("/health")).json()["status"] != "ok":
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.5)
    assert httpx.get(server.url("/health")).json()["engines"][0]["pid"] != killed
    before = engine_metric(server, "heron:generation_tokens_total")
    for p in PROMPTS:  # prompts without a full block: the idle engines take turns
        complete(server, p)
    after = settled(server, "heron:generation_tokens_total", before[""] + len(PROMPTS) * 10)
    assert after["0"] > before["0"], (before, after)  # the restarted engine serves again
