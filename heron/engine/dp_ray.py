"""``--data-parallel-backend ray``: engine cores as Ray actors placed on an existing Ray cluster.

Ray does placement and lifecycle only: one placement-group bundle per engine (its CPUs, or a
GPU), actors restarted at most ``max_restarts`` times. Ray carries nothing but each actor's
start-up arguments: the engine config as msgpack bytes, two addresses and its keys. Requests and
outputs travel as before, msgspec msgpack over ZMQ, here TCP sockets that the API server binds::

    API server (EngineClient i)                       Ray actor i (any node)
      PUSH  tcp://API_IP:p1  --- CURVE, ZAP --->   PULL   } one thread runs serve_core()
      PULL  tcp://API_IP:p2  <-- CURVE, ZAP ----   PUSH   }
      watcher thread: actor.ping() every second    (incarnation id, pid, node)

Every engine gets a fresh CURVE key pair and the server's public key; the server's ZAP handler
admits that one client key and nothing else, so a client without the secret cannot even finish
the handshake (and the traffic is encrypted). Nothing is ever pickled on these sockets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from types import ModuleType
from typing import TYPE_CHECKING, Any

import msgspec
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from heron.config import EngineConfig
from heron.engine.client import ENGINE_ENV, engine_label

if TYPE_CHECKING:
    from heron.config import ParallelConfig
    from heron.engine.client import CoreLauncher

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 60.0  # how long to wait for the cluster to fit every engine
_PING_INTERVAL_S = 1.0
_PING_TIMEOUT_S = 10.0  # a busy core holds the GIL between steps; a ping may wait


def require_ray() -> ModuleType:
    """The ``ray`` module, or a ValueError that says how to get it."""
    try:
        import ray
    except ImportError as e:
        raise ValueError(
            "--data-parallel-backend ray needs Ray, which is not installed: "
            "pip install 'heron[ray]' (or use --data-parallel-backend mp)"
        ) from e
    return ray


# ==== CURVE keys ==================================================================================


class CurveKeys(msgspec.Struct, frozen=True):
    """What one actor needs to connect: the server's public key and its own key pair (z85)."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes


class ServerKeys(msgspec.Struct, frozen=True):
    public: bytes
    secret: bytes


def new_keys() -> tuple[ServerKeys, CurveKeys]:
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return ServerKeys(server_public, server_secret), CurveKeys(
        server_public, client_public, client_secret
    )


def secure_server(sock: zmq.Socket, keys: ServerKeys) -> None:
    """The binding side: CURVE server (before bind)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def secure_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """The connecting side: CURVE client with its key pair (before connect)."""
    sock.curve_secretkey = keys.client_secret
    sock.curve_publickey = keys.client_public
    sock.curve_serverkey = keys.server_public


class _AllowOneKey:
    """ZAP credentials provider: only the engine's own client key gets in."""

    def __init__(self, client_public: bytes) -> None:
        self.client_public = client_public

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key == self.client_public
        if not allowed:
            logger.warning("refused an engine-socket client with an unknown CURVE key")
        return allowed


def start_authenticator(ctx: zmq.asyncio.Context, client_public: bytes) -> AsyncioAuthenticator:
    """A ZAP handler on ``ctx`` that admits only ``client_public`` (needs a running loop)."""
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_AllowOneKey(client_public))
    return auth


# ==== the backend (API side) ======================================================================


class RayBackend:
    """Connects to the Ray cluster, reserves one bundle per engine, hands out RayLaunchers."""

    def __init__(self, config: EngineConfig, parallel: ParallelConfig, log_level: int) -> None:
        self.ray = require_ray()
        n = parallel.data_parallel_size
        self._init_ray(parallel.ray_address)
        self.host = self.ray.util.get_node_ip_address()
        use_gpu = config.model.device == "cuda"
        cpus = parallel.cpus_per_engine or _smallest_node_cpus(self.ray)
        bundle = {"GPU": 1.0, "CPU": 1.0} if use_gpu else {"CPU": float(cpus)}
        self.placement = self._place(n, bundle)
        self.launchers: list[CoreLauncher] = [
            RayLauncher(self, i, engine_label(i, n), config, cpus, use_gpu, parallel, log_level)
            for i in range(n)
        ]

    def _init_ray(self, address: str) -> None:
        try:
            self.ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ValueError(
                f"cannot reach a Ray cluster at --ray-address {address}: {e}. Start one with "
                "`ray start --head` (and `ray start --address=HEAD_IP:6379` on other machines)"
            ) from e

    def _place(self, n: int, bundle: dict[str, float]) -> Any:
        from ray.util.placement_group import placement_group

        group = placement_group([dict(bundle) for _ in range(n)], strategy="SPREAD")
        ready, _ = self.ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            self.ray.util.remove_placement_group(group)
            raise ValueError(
                f"the Ray cluster cannot place {n} engines of {bundle} each within "
                f"{PLACEMENT_TIMEOUT_S:.0f} s; it has {self.ray.cluster_resources()} "
                "(lower --data-parallel-size or --cpus-per-engine, or add nodes)"
            )
        logger.info("Ray placed %d engines of %s each", n, bundle)
        return group

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ray.util.remove_placement_group(self.placement)
        with contextlib.suppress(Exception):
            self.ray.shutdown()


def _smallest_node_cpus(ray: ModuleType) -> int:
    """Default CPUs per engine: all of the smallest alive node's (one engine per node)."""
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(1, int(min(cpus))) if cpus else 1


class RayLauncher:
    """One engine core as a Ray actor in bundle ``index`` of the backend's placement group.

    ``alive()`` reflects a watcher thread that pings the actor every second: a ping that fails
    marks it down; Ray restarts it (a new incarnation, which connects and sends CoreReady
    again) until ``max_restarts`` restarts were used, then it is gone for good.
    """

    def __init__(
        self,
        backend: RayBackend,
        index: int,
        label: str,
        config: EngineConfig,
        cpus: int,
        use_gpu: bool,
        parallel: ParallelConfig,
        log_level: int,
    ) -> None:
        self.backend = backend
        self.index = index
        self.label = label
        self.config = config
        self.cpus = cpus
        self.use_gpu = use_gpu
        self.max_restarts = parallel.max_restarts
        self.log_level = log_level
        self.server_keys, self.client_keys = new_keys()
        self._auth: AsyncioAuthenticator | None = None
        self._actor: Any = None
        self._incarnation: str | None = None
        self._restarts = 0
        self._pid: int | None = None
        self._state = "starting"  # starting | up | down | dead | stopped
        self._reason = ""
        self._stop = threading.Event()

    @property
    def pid(self) -> int | None:
        return self._pid

    def bind(
        self, ctx: zmq.asyncio.Context, inputs: zmq.Socket, outputs: zmq.Socket
    ) -> tuple[str, str]:
        self._auth = start_authenticator(ctx, self.client_keys.client_public)
        addrs = []
        for sock in (inputs, outputs):
            secure_server(sock, self.server_keys)
            port = sock.bind_to_random_port(f"tcp://{self.backend.host}")
            addrs.append(f"tcp://{self.backend.host}:{port}")
        logger.info("%s: engine sockets %s, %s (CURVE)", self.label, *addrs)
        return addrs[0], addrs[1]

    def launch(self, input_addr: str, output_addr: str) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_class = self.backend.ray.remote(EngineCoreActor)
        self._actor = actor_class.options(
            num_cpus=1 if self.use_gpu else self.cpus,
            num_gpus=1 if self.use_gpu else 0,
            max_restarts=self.max_restarts,
            max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.backend.placement, placement_group_bundle_index=self.index
            ),
        ).remote(
            msgspec.msgpack.encode(self.config),
            input_addr,
            output_addr,
            msgspec.msgpack.encode(self.client_keys),
            self.cpus,
            self.log_level,
            self.label,
        )
        threading.Thread(target=self._watch, name=f"heron-{self.label}-watch", daemon=True).start()

    # ---- liveness -------------------------------------------------------------------------

    def alive(self) -> bool:
        return self._state in ("starting", "up")

    def exit_reason(self) -> str:
        return self._reason or self._state

    def may_restart(self) -> bool:
        return self._state in ("starting", "up", "down")

    def _watch(self) -> None:
        ray = self.backend.ray
        while not self._stop.wait(_PING_INTERVAL_S):
            try:
                incarnation, pid, node = ray.get(self._actor.ping.remote(), timeout=_PING_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                continue  # slow, not gone: the client's own checks decide
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                self._down(e)
                continue
            self._up(incarnation, pid, node)

    def _up(self, incarnation: str, pid: int, node: str) -> None:
        if incarnation != self._incarnation:
            if self._incarnation is not None:
                self._restarts += 1
            self._incarnation, self._pid = incarnation, pid
            logger.info(
                "%s is Ray actor pid %d on node %s (restarts: %d of %d)",
                self.label, pid, node, self._restarts, self.max_restarts,
            )
        self._state, self._reason = "up", ""

    def _down(self, error: Exception) -> None:
        ray = self.backend.ray
        final = (
            isinstance(error, ray.exceptions.ActorDiedError)
            and self._restarts >= self.max_restarts
        )
        state = "dead" if final else "down"
        if state != self._state:
            what = "gone for good" if final else "down; Ray restarts it"
            self._reason = f"Ray actor {what} ({type(error).__name__})"
            logger.error("%s: %s", self.label, self._reason)
        self._state = state
        if final:
            self._stop.set()

    # ---- end ------------------------------------------------------------------------------

    def stop(self, timeout_s: float) -> None:
        self._stop.set()
        if self._actor is not None:
            time.sleep(min(timeout_s, 0.2))  # the core leaves its loop after ShutdownCore
            with contextlib.suppress(Exception):
                self.backend.ray.kill(self._actor, no_restart=True)
        self._state, self._reason = "stopped", "shut down"

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


# ==== the actor (engine side) =====================================================================


class EngineCoreActor:
    """A Ray actor hosting one engine core: a thread runs ``serve_core`` on two CURVE-secured
    sockets connected to the API server. A core that fails or crashes exits the process, so
    that Ray restarts the actor (within its bound)."""

    def __init__(
        self,
        config_msg: bytes,
        input_addr: str,
        output_addr: str,
        keys_msg: bytes,
        num_threads: int,
        log_level: int,
        label: str,
    ) -> None:
        for key, value in ENGINE_ENV.items():
            os.environ.setdefault(key, value)
        os.environ["OMP_NUM_THREADS"] = str(num_threads)  # before torch loads OpenMP
        self.incarnation = uuid.uuid4().hex
        config = msgspec.msgpack.decode(config_msg, type=EngineConfig)
        keys = msgspec.msgpack.decode(keys_msg, type=CurveKeys)
        args = (config, input_addr, output_addr, keys, num_threads, log_level, label)
        threading.Thread(target=_run_actor_core, args=args, name="heron-core", daemon=True).start()

    def ping(self) -> tuple[str, int, str]:
        """(incarnation id, pid, "node address (node id)"): a new id means Ray restarted it."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()[:12]
        return self.incarnation, os.getpid(), f"{ray.util.get_node_ip_address()} ({node_id})"


def _run_actor_core(
    config: EngineConfig,
    input_addr: str,
    output_addr: str,
    keys: CurveKeys,
    num_threads: int,
    log_level: int,
    label: str,
) -> None:
    from heron.engine.core_proc import serve_core

    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s [{label}] %(name)s: %(message)s"
    )
    import torch

    torch.set_num_threads(num_threads)

    def secure(sock: zmq.Socket) -> None:
        secure_client(sock, keys)

    if serve_core(config, input_addr, output_addr, parent_pid=os.getppid(), secure=secure):
        logging.getLogger(__name__).error("%s failed; exiting so that Ray restarts it", label)
        os._exit(1)
