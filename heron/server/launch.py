"""Start-up and shut-down of ``heron serve``: engine process, tokenizer, uvicorn, signals.

::

    run_server()
      |- install SIGINT/SIGTERM handlers (while starting: cancel the start-up)
      |- open the data-parallel backend (Ray: connect, place the engines)
      |- EngineClient.start()  (spawns the core; loads the model)   }
      |    or Router.start() (N engine cores at once)               }
      |- load_hf_tokenizer()   (in a daemon thread)                 } concurrently
      |- import the HTTP layer, then uvicorn.Server.serve()         }
      |    (/health answers 503 "loading"; a signal still cancels the start-up)
      |- mark_ready(app, ctx)  (the API answers; uvicorn takes the signals: graceful shutdown)
      |    '- the last engine core dies -> in-flight requests fail, graceful shutdown, exit 3
      '- EngineClient/Router.shutdown()  (always: no core process outlives the server)

When the engine core dies (crash, OOM kill, kill -9) heron does not restart it: the API
process answers what was in flight with an error, stops, and exits with status 3, so that
its supervisor (systemd, Kubernetes, docker --restart) starts a fresh server. An API that
outlived its engine would answer 503 forever. With several data-parallel engines the server
keeps serving on those still up (degraded) and exits only when the last one is gone for good
(Ray restarts its actors first).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import uvicorn

from heron.config import EngineConfig, ModelConfig, ParallelConfig
from heron.engine.client import EngineClient, EngineError
from heron.engine.dp_launch import open_backend
from heron.heap import freeze_startup_objects, limit_arenas
from heron.server.config import ServerConfig
from heron.server.router import Router, build_engine

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from heron.engine.messages import EngineInfo
    from heron.server.model_facts import ModelFacts
    from heron.server.serving import ServingContext
    from heron.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger("heron.server")

T = TypeVar("T")

ENGINE_DIED_EXIT_CODE = 3
API_ARENAS = 2  # malloc arenas of the API process (heron.heap.limit_arenas)


def run_server(
    engine_config: EngineConfig,
    server_config: ServerConfig,
    log_level: int = logging.INFO,
    access_log: bool = True,
    parallel_config: ParallelConfig | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    limit_arenas(API_ARENAS)  # before the tokenizer's thread: see heron.heap
    parallel = parallel_config or ParallelConfig()
    signals = _StartupSignals()
    signals.install()
    try:
        backend = open_backend(engine_config, parallel, log_level)  # Ray: connect, place
        make_engine = functools.partial(
            build_engine, engine_config, parallel, log_level, backend
        )
        return _run_loop(
            _serve(make_engine, engine_config, server_config, log_level, access_log, signals)
        )
    except asyncio.CancelledError:
        logger.info("interrupted during start-up; engine stopped")
        return 0
    except (EngineError, ValueError, OSError) as e:  # the model or tokenizer could not load
        logger.error("%s", e)
        return 1
    finally:
        signals.restore()


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """``main`` in uvloop's event loop (libuv) where it is installed (not on Windows), else asyncio's.
    Every token of a stream passes through the loop twice (the core's message, the SSE
    chunk). With uvloop and uvicorn's httptools, against asyncio's loop and h11 (default
    model, 3 alternating served runs): c=1 81.9 against 79.4 tok/s, c=16 319.6 against
    305.9; the API process's CPU 0.70-0.77 against 0.77-0.80 ms a token at c=1."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def _serve(
    make_engine: Callable[[], EngineClient | Router],
    engine_config: EngineConfig,
    server_config: ServerConfig,
    log_level: int,
    access_log: bool,
    signals: _StartupSignals,
) -> int:
    signals.attach(asyncio.current_task(), asyncio.get_running_loop())
    engine = make_engine()
    http: _HttpServer | None = None
    try:
        engine_started = asyncio.create_task(engine.start(server_config.startup_timeout_s))
        await asyncio.sleep(0)  # engine.start runs up to its first wait: the core is spawned
        tokenizer_future = _in_daemon_thread(_load_hf_tokenizer, engine_config.model)
        _import_http_layer()  # while the engine process and the tokenizer thread load
        http = _HttpServer(server_config, log_level, access_log)
        ctx = await _start(engine, engine_started, tokenizer_future, http.task, engine_config,
                           server_config)
        freeze_startup_objects()  # the tokenizer's tables: see heron.heap
        http.ready(ctx, signals)
        watcher = asyncio.create_task(_exit_when_engine_dies(engine, http.server))
        try:
            await http.task
        finally:
            watcher.cancel()
        died = watcher.done() and not watcher.cancelled() and watcher.result()
        return ENGINE_DIED_EXIT_CODE if died else 0
    finally:
        if http is not None:
            await http.stop()
        await engine.shutdown()
        logger.info("engine core stopped; bye")


async def _exit_when_engine_dies(engine: EngineClient | Router, server: uvicorn.Server) -> bool:
    """Stop the server when the engine core (every engine core) dies; True when that is why
    it stopped."""
    reason = await engine.wait_dead()
    if server.should_exit:
        return False  # shutting down already: the signal reached the engine too
    logger.error(
        "the engine core is gone (%s); shutting down with exit status %d so that a "
        "supervisor can start a fresh server",
        reason,
        ENGINE_DIED_EXIT_CODE,
    )
    server.should_exit = True
    return True


class _HttpServer:
    """uvicorn in a task from the start: /health answers 503 "loading" until ``ready``."""

    def __init__(self, config: ServerConfig, log_level: int, access_log: bool) -> None:
        from heron.server.app import build_app

        self.app = build_app(config)
        self.server = _Uvicorn(
            uvicorn.Config(
                self.app,
                host=config.host,
                port=config.port,
                log_level=logging.getLevelName(log_level).lower(),
                access_log=access_log,
                timeout_graceful_shutdown=int(config.graceful_shutdown_s) or None,
            )
        )
        self.task = asyncio.create_task(self.server.serve(), name="heron-http")

    def ready(self, ctx: ServingContext, signals: _StartupSignals) -> None:
        from heron.server.app import mark_ready

        mark_ready(self.app, ctx)
        signals.hand_over(self.server.handle_exit)  # from here uvicorn handles SIGINT/SIGTERM

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait({self.task})


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: while the model loads a signal cancels the
    start-up (``_StartupSignals``); ``hand_over`` then installs uvicorn's ``handle_exit``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _start(
    engine: EngineClient | Router,
    engine_started: asyncio.Task[EngineInfo],
    tokenizer_future: asyncio.Future[PreTrainedTokenizerBase],
    serving: asyncio.Task[None],
    engine_config: EngineConfig,
    server_config: ServerConfig,
) -> ServingContext:
    """The serving context once the engine and the tokenizer are loaded; what stopped uvicorn
    if it stopped first (it could not bind its port, for one)."""
    try:
        await asyncio.wait({engine_started, serving}, return_when=asyncio.FIRST_COMPLETED)
        if not engine_started.done():
            if not serving.cancelled() and serving.exception() is not None:
                raise serving.exception()  # type: ignore[misc]
            raise asyncio.CancelledError
        info = engine_started.result()
    except BaseException:
        engine_started.cancel()
        tokenizer_future.add_done_callback(
            _ignore_result
        )  # the engine's error is the one to report
        raise
    # The model's config, once the engine has loaded the model (see ``finish_tokenizer``).
    tokenizer = await asyncio.to_thread(_finish_tokenizer, engine_config.model,
                                        await tokenizer_future)
    from heron.loader import model_display_name
    from heron.server.metrics import ServerMetrics
    from heron.server.serving import ServingContext

    display = model_display_name(engine_config.model)
    names = server_config.served_model_names or (display,)
    clash = [lora.lora_name for lora in engine_config.lora.preload if lora.lora_name in names]
    if clash:
        raise ValueError(f"--lora-modules: {clash[0]!r} is the served model's name; "
                         "give the adapter another")
    facts = await asyncio.to_thread(_model_facts, engine_config.model)
    ctx = ServingContext(
        config=server_config,
        engine=engine,
        tokenizer=tokenizer,
        info=info,
        model_names=tuple(names),
        model_root=engine_config.model.model or display,
        metrics=ServerMetrics(engine, names[0]),
        facts=facts,
        loras={lora.lora_name: lora for lora in engine_config.lora.preload},
        max_lora_rank=engine_config.lora.max_lora_rank if engine_config.lora.enable_lora else None,
    )
    scheme_host = f"http://{server_config.host}:{server_config.port}"
    logger.info(
        "serving %s as %s on %s (%s), max_model_len %d, KV cache %d tokens (%d blocks "
        "of %d); API at %s/v1%s",
        display,
        ", ".join(names),
        info.device,
        info.dtype,
        info.max_model_len,
        info.num_kv_blocks * info.block_size,
        info.num_kv_blocks,
        info.block_size,
        scheme_host,
        " (API key required)" if server_config.api_key else "",
    )
    if server_config.enable_web_ui:
        logger.info("chat page at %s/", scheme_host)
    for lora in engine_config.lora.preload:
        logger.info("LoRA adapter %s from %s", lora.lora_name, lora.lora_path)
    return ctx


def _model_facts(model_config: ModelConfig) -> ModelFacts | None:
    """The model's catalogue entry (Ollama's /api/tags); None, and a warning, when its files
    cannot be read (the routes then show what the engine knows)."""
    from heron.server.model_facts import read_model_facts

    try:
        return read_model_facts(model_config)
    except (OSError, ValueError, KeyError) as e:
        logger.warning("could not read the model's details for /api/tags: %s", e)
        return None


def _import_http_layer() -> None:
    """FastAPI, pydantic and the routes (~0.7 s), imported once the engine process is spawned:
    the engine's imports (torch, ~2 s) run meanwhile on the other core."""
    import heron.server.app  # noqa: F401
    import heron.server.metrics  # noqa: F401


def _load_hf_tokenizer(model_config: ModelConfig) -> PreTrainedTokenizerBase:
    # heron.loader pulls in torch and transformers (~2 s): imported here, in the tokenizer's
    # thread, so that the engine process starts without waiting for it.
    from heron.heap import release_free_heap
    from heron.tokenizer.load import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(model_config)
    release_free_heap()  # parsing tokenizer.json leaves hundreds of MB of freed heap behind
    return tokenizer


def _finish_tokenizer(model_config: ModelConfig, hf_tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    from heron.heap import release_free_heap
    from heron.tokenizer.load import finish_tokenizer

    tokenizer = finish_tokenizer(model_config, hf_tokenizer)
    release_free_heap()
    return tokenizer


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run a blocking call in a daemon thread (a Ctrl-C during start-up need not wait for it)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(settle, future.set_exception, e)
        else:
            loop.call_soon_threadsafe(settle, future.set_result, result)

    threading.Thread(target=work, name=f"heron-{fn.__name__}", daemon=True).start()
    return future


class _StartupSignals:
    """SIGINT/SIGTERM while starting cancel the start-up (the engine is then shut down).

    Once the model is loaded, ``hand_over`` gives the signals to uvicorn (graceful shutdown);
    ``restore`` puts the original handlers back at the end.
    """

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.active = True
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def attach(self, task: asyncio.Task[Any] | None, loop: asyncio.AbstractEventLoop) -> None:
        self.task, self.loop = task, loop
        if self.received is not None and task is not None:
            task.cancel()

    def hand_over(self, handler: Callable[[int, Any], None]) -> None:
        """From now on ``handler`` (uvicorn's) gets SIGINT/SIGTERM."""
        self.active = False
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if not self.active or self.received is not None:
            return
        self.received = signum
        logger.info("received %s during start-up; stopping", signal.Signals(signum).name)
        if self.task is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
