"""The engine core process: build an ``EngineCore``, then step it while there is work.

``run_engine_core`` is the process's entry point (spawned by ``heron.engine.client``). It talks
to the API process over two ZMQ sockets carrying msgspec structs (``heron.engine.messages``),
never pickle. The core process dies with its parent: it asks the kernel for SIGTERM when the
parent exits and also checks the parent's pid whenever it is idle.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import zmq

from heron.engine.messages import (
    AbortRequests,
    ClientMessage,
    CoreFailed,
    CoreOutputs,
    CoreReady,
    EngineRequest,
    EngineStats,
    Heartbeat,
    RequestRejected,
    ShutdownCore,
)
from heron.heap import freeze_startup_objects, keep_step_buffers, release_free_heap

if TYPE_CHECKING:
    from heron.config import EngineConfig
    from heron.engine.core import EngineCore

logger = logging.getLogger(__name__)

_STATS_INTERVAL_S = 0.5  # the core sends a stats snapshot at most this often while busy
_IDLE_POLL_MS = 1000  # idle core: how long to block on the input socket between parent checks
_HEARTBEAT_INTERVAL_S = 0.5
_PR_SET_PDEATHSIG = 1


def run_engine_core(
    config: EngineConfig,
    input_addr: str,
    output_addr: str,
    parent_pid: int,
    log_level: int = logging.INFO,
) -> None:
    """Entry point of the core process: build the EngineCore, report ready, run the busy loop."""
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s [core] %(name)s: %(message)s"
    )
    _die_with_parent(parent_pid)
    serve_core(config, input_addr, output_addr, parent_pid)


Secure = Callable[[zmq.Socket], None]


def serve_core(
    config: EngineConfig,
    input_addr: str,
    output_addr: str,
    parent_pid: int,
    secure: Secure | None = None,
) -> bool:
    """Connect to the client, build the core, report ready, run the loop (with a heartbeat)
    until shutdown; True if the core failed or crashed (the reason was sent as CoreFailed).

    ``secure`` sets each socket's credentials before it connects (a Ray actor's CURVE keys).
    """
    ctx = zmq.Context()
    inputs, outputs = connect_sockets(ctx, input_addr, output_addr, secure)
    try:
        return _build_and_run(config, ctx, inputs, outputs, output_addr, parent_pid, secure)
    finally:
        _close(ctx, inputs, outputs)


def connect_sockets(
    ctx: zmq.Context, input_addr: str, output_addr: str, secure: Secure | None = None
) -> tuple[zmq.Socket, zmq.Socket]:
    """The core's PULL (inputs) and PUSH (outputs) sockets, connected to the client's."""
    inputs = ctx.socket(zmq.PULL)
    outputs = ctx.socket(zmq.PUSH)
    for sock, addr in ((inputs, input_addr), (outputs, output_addr)):
        sock.setsockopt(zmq.LINGER, 1000)
        if secure is not None:
            secure(sock)
        sock.connect(addr)
    return inputs, outputs


def _build_and_run(
    config: EngineConfig,
    ctx: zmq.Context,
    inputs: zmq.Socket,
    outputs: zmq.Socket,
    output_addr: str,
    parent_pid: int,
    secure: Secure | None,
) -> bool:
    encoder = msgspec.msgpack.Encoder()
    try:
        core = _build_core(config)
        _build_grammar_index(core)
        release_free_heap()  # what loading and indexing freed: hundreds of MB, else resident
        keep_step_buffers()  # a step's large buffers reused, not mapped anew (see heron.heap)
        freeze_startup_objects()
    except BaseException as e:  # noqa: BLE001 - every startup failure is reported to the parent
        logger.exception("engine core failed to start")
        outputs.send(encoder.encode(CoreFailed(message=f"{type(e).__name__}: {e}")))
        return True
    outputs.send(encoder.encode(CoreReady(info=core.info)))
    loop = CoreLoop(core, inputs, outputs, parent_pid)
    heartbeat = HeartbeatThread(ctx, output_addr, loop, secure)
    try:
        heartbeat.start()
        loop.run()
    except SystemExit:
        pass
    except BaseException as e:  # noqa: BLE001
        logger.exception("engine core crashed")
        with contextlib.suppress(zmq.ZMQError):
            outputs.send(encoder.encode(CoreFailed(message=f"{type(e).__name__}: {e}")))
        return True
    finally:
        heartbeat.stop()
    return False


def _build_grammar_index(core: EngineCore) -> None:
    """Structured outputs need an index of the tokenizer, which takes seconds and holds the GIL
    all along: in a thread of a serving core it would stall every running stream (built on the
    first constrained request, it did). So the core builds it before it reports ready, unless
    ``--grammar-index first-use`` trades that for a faster start."""
    if core.config.model.grammar_index == "start":
        core.structured.build_index()


def _build_core(config: EngineConfig) -> EngineCore:
    from heron.engine.core import EngineCore

    return EngineCore(config)


def _close(ctx: zmq.Context, *socks: zmq.Socket) -> None:
    for sock in socks:
        sock.close()
    ctx.term()


def _die_with_parent(parent_pid: int) -> None:
    """SIGINT belongs to the parent (it orchestrates shutdown); SIGTERM exits; parent death -> SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(0)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


class HeartbeatThread:
    """Sends ``Heartbeat`` every 0.5 s on its own socket while the core process runs.

    A thread, so that a long step does not read as a hang; the step count it reports tells a
    stuck loop apart from a busy one. A stopped process (SIGSTOP) sends nothing at all.
    """

    def __init__(
        self, ctx: zmq.Context, address: str, loop: CoreLoop, secure: Secure | None = None
    ) -> None:
        self.ctx = ctx
        self.address = address
        self.loop = loop
        self.secure = secure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heron-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        if self.secure is not None:
            self.secure(sock)
        sock.connect(self.address)
        encoder = msgspec.msgpack.Encoder()
        try:
            while True:
                beat = Heartbeat(steps=self.loop.steps, busy=self.loop.busy)
                with contextlib.suppress(zmq.Again):  # the API side is not reading: skip one
                    sock.send(encoder.encode(beat), zmq.NOBLOCK)
                if self._stop.wait(_HEARTBEAT_INTERVAL_S):
                    return
        except zmq.ZMQError:
            return
        finally:
            sock.close()


class CoreLoop:
    """The core process's busy loop: drain inputs, step while there is work, send outputs.

    When idle it sends one final stats snapshot (so /metrics sees the engine drained) and
    blocks on the input socket, waking every second to check that its parent still lives.
    """

    def __init__(
        self, core: EngineCore, inputs: zmq.Socket, outputs: zmq.Socket, parent_pid: int
    ) -> None:
        self.core = core
        self.inputs = inputs
        self.outputs = outputs
        self.parent_pid = parent_pid
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(ClientMessage)
        self.stats_dirty = True
        self.last_stats = 0.0
        self.steps = 0  # steps finished (read by the heartbeat thread)
        self.busy = False  # unfinished requests at the top of the last iteration

    def run(self) -> None:
        while True:
            self.busy = self.core.has_unfinished_requests()
            if not self.busy:
                if self.stats_dirty:
                    self._send(CoreOutputs(outputs=[], stats=self._snapshot()))
                if not self.inputs.poll(_IDLE_POLL_MS):
                    if os.getppid() != self.parent_pid:
                        return
                    continue
            if not self._drain_inputs():
                return
            if self.core.has_unfinished_requests():
                self._step()

    def _step(self) -> None:
        outputs = self.core.step()
        self.steps += 1
        for rejected in self.core.pop_rejected():
            self._send(rejected)
        self.stats_dirty = True
        stats = None
        if time.monotonic() - self.last_stats >= _STATS_INTERVAL_S:
            stats = self._snapshot()
        if outputs or stats is not None:
            self._send(CoreOutputs(outputs=outputs, stats=stats))

    def _drain_inputs(self) -> bool:
        """Apply every queued message; False on shutdown."""
        while True:
            try:
                data = self.inputs.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            message = self.decoder.decode(data.buffer)
            self.stats_dirty = True
            if isinstance(message, ShutdownCore):
                return False
            if isinstance(message, AbortRequests):
                self.core.abort_requests(message.request_ids)
            else:
                self._add(message.requests)

    def _add(self, requests: list[EngineRequest]) -> None:
        for request in requests:
            try:
                self.core.add_request(request)
            except ValueError as e:
                self._send(RequestRejected(request_id=request.request_id, message=str(e)))

    def _snapshot(self) -> EngineStats:
        self.stats_dirty = False
        self.last_stats = time.monotonic()
        return self.core.stats()

    def _send(self, message: CoreOutputs | RequestRejected) -> None:
        self.outputs.send(self.encoder.encode(message), copy=False)


def run_pinned_engine_core(cpus: list[int], *args: object) -> None:
    """``run_engine_core`` on these CPUs only: data-parallel engines split a machine."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, cpus)
    run_engine_core(*args)  # type: ignore[arg-type]
