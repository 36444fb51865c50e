"""The async bridge between the HTTP server and an engine core running in its own process.

::

    API process (asyncio)                          engine core process (spawned)
    ---------------------                          -----------------------------
    EngineClient.stream(requests) --AddRequests--> drain input -> EngineCore.add_request
      per-request asyncio queues  <--CoreOutputs-- step() while there is work
    OutputStream.finish / exit    --AbortRequests> EngineCore.abort_requests
    EngineClient.shutdown()       --ShutdownCore-> leave the loop, exit

Messages are msgspec structs (``heron.engine.messages``) encoded as msgpack over two
ZMQ IPC sockets; nothing is ever pickled on a socket. The core process's side is
``heron.engine.core_proc``; this module is the API process's side only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import msgspec
import zmq
import zmq.asyncio

from heron.engine.core_proc import run_engine_core, run_pinned_engine_core
from heron.engine.messages import (
    AbortRequests,
    AddRequests,
    ClientMessage,
    CoreFailed,
    CoreMessage,
    CoreOutputs,
    CoreReady,
    EngineInfo,
    EngineOutput,
    EngineRequest,
    EngineStats,
    Heartbeat,
    RequestRejected,
    ShutdownCore,
)

if TYPE_CHECKING:
    from heron.config import EngineConfig

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 1000  # how long the output reader blocks between liveness checks
HEARTBEAT_TIMEOUT_S = 3.0  # core silent this long (beats come every 0.5 s): stopped or hung
STEP_TIMEOUT_S = 60.0  # core busy without finishing a step this long: stuck
ENGINE_ENV = {"GOMP_SPINCOUNT": "2000"}  # see _engine_environment


class _OutputWaiter:
    """Non-blocking reads of a zmq socket whose file descriptor stays registered with the
    running event loop. zmq signals the descriptor on an edge: ``ready`` takes messages until
    the socket says it has none (which also re-arms the signal), and only then may ``wait``
    sleep until the descriptor fires or ``timeout_s`` passes (``timed_out`` tells which)."""

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._fd = int(self._sock.getsockopt(zmq.FD))
        self._woken: asyncio.Future[bool] | None = None
        self.timed_out = False

    def __enter__(self) -> _OutputWaiter:
        self._loop.add_reader(self._fd, self._wake, False)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.remove_reader(self._fd)

    def ready(self) -> Iterator[bytes]:
        """The messages that have arrived, in order."""
        while int(self._sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            try:
                yield self._sock.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return

    async def wait(self, timeout_s: float) -> None:
        self._woken = self._loop.create_future()
        timer = self._loop.call_later(timeout_s, self._wake, True)
        try:
            self.timed_out = await self._woken
        finally:
            timer.cancel()
            self._woken = None

    def _wake(self, timed_out: bool) -> None:
        if self._woken is not None and not self._woken.done():
            self._woken.set_result(timed_out)


class EngineError(RuntimeError):
    """The engine core is gone (crashed, or failed to start)."""


class RequestRejectedError(ValueError):
    """The engine core refused a request (``EngineCore.add_request`` raised ValueError)."""


class ConstraintFailedError(RuntimeError):
    """A sequence ended with finish reason "error": its output constraint could not be
    enforced (a parser limit met mid-output). Never reported as a successful "stop"."""


# ==== API side ====================================================================================


class EngineClient:
    """Async handle on an engine core process: submit token ids, receive EngineOutputs.

    Use ``await client.start()`` inside a running event loop, then ``client.stream(...)``
    per API request, and ``await client.shutdown()`` at the end (also after a failed start).
    """

    def __init__(
        self,
        config: EngineConfig,
        log_level: int = logging.INFO,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        step_timeout_s: float = STEP_TIMEOUT_S,
        launcher: CoreLauncher | None = None,
    ) -> None:
        self.config = config
        self._launcher = launcher or ProcessLauncher(config, log_level)
        self._ctx = zmq.asyncio.Context()
        self._input: zmq.Socket | None = None
        self._output: zmq.Socket | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreMessage)
        self._queues: dict[str, asyncio.Queue[EngineOutput | Exception]] = {}
        self._dispatch_task: asyncio.Task[None] | None = None
        self._dead: str | None = None
        self._died = asyncio.Event()
        self.liveness = Liveness(heartbeat_timeout_s, step_timeout_s)
        self.info: EngineInfo | None = None
        self.stats = EngineStats()
        self._carried = EngineStats()  # counters of earlier incarnations (a restarted core)

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """How logs and errors name this core ("engine core", "engine core 1")."""
        return self._launcher.label

    @property
    def pid(self) -> int | None:
        return self._launcher.pid

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._launcher.alive()

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    def health(self) -> str | None:
        """Why the engine cannot serve now (gone, stopped, stuck), or None when it is alive and
        stepping. A stopped or stuck core may recover; a dead one does not."""
        if self._dead is not None or self.info is None:
            return self._dead or f"the {self.label} has not started"
        if not self.is_alive:
            return f"the {self.label} exited"
        return self.liveness.problem()

    async def wait_dead(self) -> str:
        """Wait until the core is found dead for good (crashed, killed; a Ray actor only once
        Ray will not restart it); returns why."""
        await self._died.wait()
        return self._dead or "the engine core is gone"

    async def start(self, timeout_s: float | None = None) -> EngineInfo:
        """Launch the core and wait until it reports ready (or raise EngineError)."""
        # A plain (sync) PUSH socket: sends never block (unbounded queue, NOBLOCK).
        self._input = zmq.Context.shadow(self._ctx.underlying).socket(zmq.PUSH)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.setsockopt(zmq.SNDHWM, 0)
        # A plain socket too, read in the event loop by _OutputWaiter.
        self._output = zmq.Context.shadow(self._ctx.underlying).socket(zmq.PULL)
        self._output.setsockopt(zmq.LINGER, 0)
        input_addr, output_addr = self._launcher.bind(self._ctx, self._input, self._output)
        self._launcher.launch(input_addr, output_addr)
        self.info = await self._wait_ready(timeout_s)
        self.liveness.heard()
        self._dispatch_task = asyncio.create_task(
            self._dispatch_loop(), name="heron-engine-outputs"
        )
        return self.info

    async def _wait_ready(self, timeout_s: float | None) -> EngineInfo:
        assert self._output is not None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with _OutputWaiter(self._output) as waiter:
            while deadline is None or time.monotonic() < deadline:
                for frame in waiter.ready():
                    message = self._decoder.decode(frame)
                    if isinstance(message, CoreReady):
                        return message.info
                    if isinstance(message, CoreFailed):
                        raise EngineError(f"the {self.label} failed to start: {message.message}")
                if waiter.timed_out and not self._launcher.alive():
                    raise EngineError(
                        f"the {self.label} exited during startup ({self._launcher.exit_reason()})"
                    )
                await waiter.wait(0.2)
        raise EngineError(f"the {self.label} was not ready after {timeout_s} s")

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Ask the core to exit, then make sure it did; fail whatever is still in flight."""
        if self._dispatch_task is not None:
            self._dispatch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._dispatch_task
        self._fail_all(EngineError("the server is shutting down"))
        if self._launcher.alive() and self._input is not None:
            self._send(ShutdownCore())
        await asyncio.to_thread(self._launcher.stop, timeout_s)
        for sock in (self._input, self._output):
            if sock is not None:
                sock.close(linger=0)
        self._launcher.close()
        self._ctx.term()
        self._dead = self._dead or "shut down"

    # ---- requests -------------------------------------------------------------------------

    def stream(self, requests: list[EngineRequest]) -> OutputStream:
        """Submit sequences; iterate the returned stream (``async with``) for their outputs."""
        if not self.is_alive:
            raise EngineError(f"the {self.label} is not running ({self._dead or 'not started'})")
        ids = [r.request_id for r in requests]
        for rid in ids:
            if rid in self._queues:
                raise ValueError(f"request id {rid!r} is already in flight")
        data = self._encoder.encode(AddRequests(requests=requests))  # raises before registering
        queue: asyncio.Queue[EngineOutput | Exception] = asyncio.Queue()
        for rid in ids:
            self._queues[rid] = queue
        self._send_bytes(data, "AddRequests")
        return OutputStream(self, ids, queue)

    @property
    def num_in_flight(self) -> int:
        """Sequences whose outputs this client still routes (each has a queue entry); the
        router's measure of an engine's load."""
        return len(self._queues)

    def abort(self, request_ids: list[str]) -> None:
        """Stop these sequences in the core (frees their blocks); later outputs are dropped."""
        live = [rid for rid in request_ids if self._queues.pop(rid, None) is not None]
        if live and self.is_alive:
            self._send(AbortRequests(request_ids=live))

    def _release(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def _send(self, message: ClientMessage) -> None:
        self._send_bytes(self._encoder.encode(message), type(message).__name__)

    def _send_bytes(self, data: bytes, kind: str) -> None:
        assert self._input is not None
        try:
            self._input.send(data, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            logger.warning("%s is not connected; dropped a %s message", self.label, kind)

    # ---- outputs --------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        """Route every message from the core to the queues of the requests it concerns.

        A core that may come back by itself (a Ray actor restarted by Ray) is waited for: its
        next CoreReady revives this client.

        The socket is read without pyzmq's asyncio futures: its file descriptor stays registered
        with the event loop (``_OutputWaiter``) and whatever has arrived is taken with
        non-blocking reads. Awaiting ``poll()`` and then ``recv()`` of a zmq.asyncio socket for
        every message (two futures, a poller, the descriptor registered and dropped again) cost
        a third of the API process's CPU at one streamed request, and on a small machine that
        time is taken from the core's threads (an 18 % load beside an in-process decode made its
        steps ~1.5 ms longer). Served, the default model at c=1, alternating 6 x: API CPU 0.85
        -> 0.64 ms a token (medians); TPOT within the host's spread (11.8 / 11.0 ms).
        """
        assert self._output is not None
        with _OutputWaiter(self._output) as waiter:
            while True:
                got = False
                for frame in waiter.ready():
                    self._handle(self._decoder.decode(frame))
                    got = True
                if not got and waiter.timed_out and self._dead is None and not self._launcher.alive():
                    self._mark_dead(f"the {self.label} exited ({self._launcher.exit_reason()})")
                if self._dead is not None and not self._launcher.may_restart():
                    self._died.set()
                    return
                await waiter.wait(_IDLE_POLL_MS / 1000)  # after every batch: HTTP runs too

    def _handle(self, message: CoreMessage) -> None:
        self.liveness.heard()
        if isinstance(message, Heartbeat):
            self.liveness.beat(message)
        elif isinstance(message, CoreOutputs):
            for out in message.outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
            if message.stats is not None:
                self.stats = _add_counters(message.stats, self._carried)
        elif isinstance(message, RequestRejected):
            queue = self._queues.pop(message.request_id, None)
            if queue is not None:
                queue.put_nowait(RequestRejectedError(message.message))
        elif isinstance(message, CoreFailed):
            self._mark_dead(f"the {self.label} failed: {message.message}")
        elif isinstance(message, CoreReady):
            self._restarted(message.info)

    def _restarted(self, info: EngineInfo) -> None:
        """A new incarnation of the core is up: what the old one had in flight is lost."""
        if self._dead is None:
            self._fail_all(EngineError(f"the {self.label} restarted; its requests were lost"))
        logger.warning("%s is back after a restart (was: %s)", self.label, self._dead or "running")
        self._dead = None
        self.info = info
        self.liveness.heard()
        self._carried = self.stats  # counters stay monotonic across incarnations
        self.stats = _add_counters(EngineStats(), self._carried)

    def _mark_dead(self, reason: str) -> None:
        logger.error("%s", reason)
        self._dead = reason
        self._fail_all(EngineError(reason))
        # Nothing runs or waits in a dead core: /metrics must not keep its last snapshot.
        self.stats = msgspec.structs.replace(
            self.stats, num_running=0, num_waiting=0, kv_cache_usage=0.0
        )
        if not self._launcher.may_restart():
            self._died.set()

    def _fail_all(self, error: Exception) -> None:
        unique = {id(queue): queue for queue in self._queues.values()}
        for queue in unique.values():
            queue.put_nowait(error)
        self._queues.clear()


class Liveness:
    """What the core's messages say about it: when it was last heard from, and whether its
    loop still finishes steps while it has work (``Heartbeat``)."""

    def __init__(self, heartbeat_timeout_s: float, step_timeout_s: float) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.step_timeout_s = step_timeout_s
        self.last_heard = time.monotonic()
        self.steps = 0
        self.busy = False
        self.stepped_at = self.last_heard  # when ``steps`` last moved (or the core was idle)

    def heard(self, now: float | None = None) -> None:
        self.last_heard = time.monotonic() if now is None else now

    def beat(self, beat: Heartbeat, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.heard(now)
        if beat.steps != self.steps or not beat.busy:
            self.stepped_at = now
        self.steps, self.busy = beat.steps, beat.busy

    def problem(self, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        silent = now - self.last_heard
        if silent > self.heartbeat_timeout_s:
            return f"the engine core has not answered for {silent:.1f} s (stopped or hung)"
        stuck = now - self.stepped_at
        if self.busy and stuck > self.step_timeout_s:
            return f"the engine core has finished no step for {stuck:.0f} s (stuck)"
        return None


_COUNTERS = (
    "prefix_cache_queries",
    "prefix_cache_hits",
    "num_preemptions",
    "prompt_tokens_total",
    "generation_tokens_total",
)


def _add_counters(stats: EngineStats, carried: EngineStats) -> EngineStats:
    """``stats`` with the counters of earlier incarnations added (gauges as they are)."""
    for name in _COUNTERS:
        setattr(stats, name, getattr(stats, name) + getattr(carried, name))
    return stats


class OutputStream:
    """The outputs of a group of sequences (the n choices of one API request), in arrival order.

    Iteration ends once every sequence has finished, in the core or by ``finish()`` (the
    caller's decision, e.g. a stop string). Leaving the ``async with`` block aborts the
    sequences still running: a disconnected client frees its KV blocks this way.
    """

    def __init__(
        self,
        client: EngineClient,
        request_ids: list[str],
        queue: asyncio.Queue[EngineOutput | Exception],
    ) -> None:
        self._client = client
        self._pending = set(request_ids)
        self._queue = queue

    async def __aenter__(self) -> OutputStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort_all()

    def __aiter__(self) -> AsyncIterator[EngineOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[EngineOutput]:
        while self._pending:
            item = await self._queue.get()
            if isinstance(item, Exception):
                self.abort_all()
                raise item
            if item.request_id not in self._pending:
                continue  # a late output for a sequence the caller already finished
            if item.finished:
                self._pending.discard(item.request_id)
                self._client._release(item.request_id)
            if item.finish_reason == "error":
                self.abort_all()
                raise ConstraintFailedError(str(item.stop_reason or "the output constraint failed"))
            yield item

    def finish(self, request_id: str) -> None:
        """The caller is done with this sequence: abort it in the core, drop its later outputs."""
        if request_id in self._pending:
            self._pending.discard(request_id)
            self._client.abort([request_id])

    def abort_all(self) -> None:
        """Abort every sequence still running (idempotent)."""
        if self._pending:
            self._client.abort(sorted(self._pending))
            self._pending.clear()


class CoreLauncher(Protocol):
    """How an EngineClient's core is started, watched and stopped: a child process
    (``ProcessLauncher``) or a Ray actor on some node (``heron.engine.dp_ray``)."""

    label: str  # how logs and errors name the core: "engine core", "engine core 1"

    @property
    def pid(self) -> int | None: ...

    def bind(
        self, ctx: zmq.asyncio.Context, inputs: zmq.Socket, outputs: zmq.Socket
    ) -> tuple[str, str]:
        """Secure and bind the client's sockets; returns the addresses the core connects to."""
        ...

    def launch(self, input_addr: str, output_addr: str) -> None:
        """Start the core (it loads the model, connects, and sends CoreReady)."""
        ...

    def alive(self) -> bool:
        """False once the core is known to be gone (cheap; called every idle second)."""
        ...

    def exit_reason(self) -> str: ...

    def may_restart(self) -> bool:
        """True while a dead core may come back by itself (and send a new CoreReady)."""
        ...

    def stop(self, timeout_s: float) -> None:
        """Make sure the core is gone (after ShutdownCore was sent). Blocking: run in a thread."""
        ...

    def close(self) -> None:
        """Release what ``bind`` set up (before the client's ZMQ context ends)."""
        ...


class ProcessLauncher:
    """The core as a spawned child process on this machine, over two IPC sockets.

    ``cpus``: pin the core to these CPUs (data-parallel engines split a machine); ``env``:
    variables the child starts with (e.g. OMP_NUM_THREADS), on top of ``ENGINE_ENV``.
    """

    def __init__(
        self,
        config: EngineConfig,
        log_level: int = logging.INFO,
        *,
        label: str = "engine core",
        cpus: list[int] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.log_level = log_level
        self.label = label
        self.cpus = cpus
        self.env = dict(env or {})
        remove_stale_ipc_dirs()
        self._ipc_dir = tempfile.mkdtemp(prefix=f"heron-{os.getpid()}-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def bind(
        self, ctx: zmq.asyncio.Context, inputs: zmq.Socket, outputs: zmq.Socket
    ) -> tuple[str, str]:
        addrs = f"ipc://{self._ipc_dir}/input", f"ipc://{self._ipc_dir}/output"
        inputs.bind(addrs[0])
        outputs.bind(addrs[1])
        return addrs

    def launch(self, input_addr: str, output_addr: str) -> None:
        args: tuple[object, ...] = (self.config, input_addr, output_addr, os.getpid(), self.log_level)
        target: Callable[..., None] = run_engine_core
        if self.cpus is not None:
            target, args = run_pinned_engine_core, (self.cpus, *args)
        with _engine_environment(self.env):
            self._process = _spawn(target, args)
        pinned = "" if self.cpus is None else f", CPUs {_cpu_list(self.cpus)}"
        logger.info(
            "%s process started (pid %d%s); loading the model", self.label, self.pid, pinned
        )

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def exit_reason(self) -> str:
        code = None if self._process is None else self._process.poll()
        return f"exit code {code}"

    def may_restart(self) -> bool:
        return False

    def stop(self, timeout_s: float) -> None:
        if self._process is not None and self._process.pid is not None:
            _stop_process(self._process, timeout_s)

    def close(self) -> None:
        for name in ("input", "output"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._ipc_dir, name))
        with contextlib.suppress(OSError):
            os.rmdir(self._ipc_dir)


def engine_label(index: int, size: int) -> str:
    """How logs and errors name engine ``index`` of ``size`` (data parallelism)."""
    return "engine core" if size == 1 else f"engine core {index}"


def _cpu_list(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)


# The child's program: stdlib only until it has the parent's sys.path (heron may be importable
# only through it: a script's folder, a path added at run time), then the target and arguments.
_CHILD = ("import os, pickle, sys; sys.path[:] = pickle.load(sys.stdin.buffer); "
          "target, args = pickle.load(sys.stdin.buffer); "
          "sys.stdin.close(); sys.stdin = open(os.devnull); target(*args)")
ENGINE_ARGV_MARK = "heron-engine-core"  # in the core's command line (``ps``, bench peers)


def _spawn(target: Callable[..., None], args: tuple[object, ...]) -> subprocess.Popen[bytes]:
    """``target(*args)`` in a fresh interpreter, as multiprocessing's spawn does, without its
    resource tracker: a third process (13 MiB resident) that heron, using no semaphores or
    shared memory, never needed. The arguments travel pickled through the child's stdin (a
    pipe to our own child, as multiprocessing's own; never a socket)."""
    process = subprocess.Popen([sys.executable, "-c", _CHILD, ENGINE_ARGV_MARK],
                               stdin=subprocess.PIPE)
    assert process.stdin is not None
    try:
        pickle.dump(sys.path, process.stdin)
        pickle.dump((target, args), process.stdin)
        process.stdin.close()
    except BrokenPipeError:  # the child died at once; its exit code says so
        pass
    return process


def _stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait; escalate to SIGTERM, then SIGKILL. Blocking: run it in a thread."""
    if _exited(process, timeout_s):
        return
    logger.warning("engine core did not exit in %.0f s; terminating it", timeout_s)
    process.terminate()
    if not _exited(process, 2.0):
        process.kill()
        _exited(process, 2.0)


def _exited(process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True


@contextlib.contextmanager
def _engine_environment(extra: dict[str, str] | None = None) -> Iterator[None]:
    """Environment the core process starts with: ``ENGINE_ENV`` unless the user chose an OpenMP
    wait policy (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``), and ``extra`` (always).

    The core shares the machine's cores with the API process (HTTP, detokenizing) and often
    with the client. OpenMP's default is to spin long at every barrier; when one of its threads
    is descheduled the others burn their time slices waiting, and steps take 3-10x longer.
    Measured end to end on 2 cores (heron bench serve, 128 in / 64 out, output tok/s at
    concurrency 1 / 16): default spinning 30.1 / 123 on a quiet box but 7.1 / 27 while another
    process held a core; PASSIVE (no spinning) 23.3 / 123 quiet, 21.6 / 103 loaded; one thread
    22.5 / 101; a short spin (GOMP_SPINCOUNT=2000) 30.7 / 156 quiet, 22.2 / 102 loaded.
    """
    added: dict[str, str] = {}
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
        added = {k: v for k, v in ENGINE_ENV.items() if k not in os.environ}
    added.update(extra or {})
    saved = {k: os.environ.get(k) for k in added}
    os.environ.update(added)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_IPC_DIR_NAME = re.compile(r"heron-(?:(?P<pid>\d+)-)?[A-Za-z0-9_]{8}")
_IPC_SOCKETS = {"input", "output"}
_EMPTY_STALE_S = 600.0  # an old-style folder without sockets this old was never used


def remove_stale_ipc_dirs(root: str | None = None) -> list[str]:
    """Delete the socket folders (``heron-<pid>-*`` in the temp directory) that API processes
    killed without cleaning up left behind; returns the paths removed.

    Stale: its pid is gone, or (older ``heron-*`` names without a pid) its sockets refuse
    connections. A folder holding anything but the two sockets, or another user's, is kept.
    """
    root = root or tempfile.gettempdir()
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            match = _IPC_DIR_NAME.fullmatch(entry.name)
            if match is not None and _is_stale_ipc_dir(entry, match.group("pid")):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    if removed:
        logger.info("removed %d stale socket folder(s) of dead heron processes", len(removed))
    return removed


def _is_stale_ipc_dir(entry: os.DirEntry[str], pid: str | None) -> bool:
    try:
        if not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid():
            return False
        names = set(os.listdir(entry.path))
    except OSError:
        return False
    if not names <= _IPC_SOCKETS:
        return False
    if pid is not None:
        return not _pid_alive(int(pid))
    if not names:
        return time.time() - entry.stat().st_mtime > _EMPTY_STALE_S
    return not any(_socket_listens(os.path.join(entry.path, name)) for name in names)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _socket_listens(path: str) -> bool:
    """Whether a process still accepts connections on this Unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def new_request_id(prefix: str) -> str:
    """A unique id such as ``chatcmpl-4f9c...``."""
    return f"{prefix}-{uuid.uuid4().hex}"
