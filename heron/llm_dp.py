"""What the offline ``LLM(model, data_parallel_size=N)`` drives instead of one in-process core.

``DataParallelEngine`` has the calls ``LLM`` makes on an ``EngineCore`` (``add_request``,
``abort_requests``, ``has_unfinished_requests``, ``step``, ``pop_rejected``, ``stats``,
``info``) and forwards them to N engine cores in their own processes (or Ray actors), routed
exactly as the server routes (``heron.server.router.Router``). The router's clients are
asyncio objects; they live on an event loop in a daemon thread, and ``step()`` blocks until
some engine has produced outputs::

    caller thread (LLM._run)                 loop thread
      add_request(r)   --call_soon_threadsafe-->  router.stream([r]) -> pump task
      step()           <--------- queue ---------  EngineOutputs of every engine
      abort_requests() --call_soon_threadsafe-->  cancel the pump (aborts in its core)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from heron.config import EngineConfig, ParallelConfig
from heron.engine.client import EngineError, OutputStream, RequestRejectedError
from heron.engine.dp_launch import open_backend
from heron.engine.messages import (
    EngineInfo,
    EngineOutput,
    EngineRequest,
    EngineStats,
    RequestRejected,
)
from heron.server.router import Router, build_engine

T = TypeVar("T")
_Item = EngineOutput | RequestRejected | Exception


class DataParallelEngine:
    """N engine cores behind ``EngineCore``'s driving interface (for the offline ``LLM``)."""

    def __init__(
        self, config: EngineConfig, parallel: ParallelConfig, log_level: int = logging.WARNING
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="heron-dp-loop", daemon=True
        )
        self._thread.start()
        self._items: queue.Queue[_Item] = queue.Queue()
        self._unfinished: set[str] = set()
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._rejected: list[RequestRejected] = []
        backend = open_backend(config, parallel, log_level)
        router = build_engine(config, parallel, log_level, backend)
        if not isinstance(router, Router):
            raise ValueError("DataParallelEngine is for data_parallel_size > 1 or Ray")
        self.router = router
        try:
            self.info: EngineInfo = self._call(router.start())
        except BaseException:
            self.close()
            raise

    # ---- EngineCore's interface -------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        self._unfinished.add(request.request_id)
        self._loop.call_soon_threadsafe(self._submit, request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        ids = [rid for rid in request_ids if rid in self._unfinished]
        self._unfinished.difference_update(ids)
        if ids:
            self._loop.call_soon_threadsafe(self._cancel, ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self._unfinished)

    def step(self) -> list[EngineOutput]:
        """Wait for outputs of any engine; raises EngineError if an engine failed a request."""
        items = [self._items.get()]
        while not self._items.empty():
            items.append(self._items.get_nowait())
        outputs = []
        for item in items:
            if isinstance(item, Exception):
                raise item
            if item.request_id not in self._unfinished:
                continue  # aborted by the caller
            if isinstance(item, RequestRejected):
                self._unfinished.discard(item.request_id)
                self._rejected.append(item)
                continue
            if item.finished:
                self._unfinished.discard(item.request_id)
            outputs.append(item)
        return outputs

    def pop_rejected(self) -> list[RequestRejected]:
        rejected, self._rejected = self._rejected, []
        return rejected

    def stats(self) -> EngineStats:
        """The engines' latest snapshots, summed."""
        return self.router.stats

    def engine_stats(self) -> list[EngineStats]:
        """Each engine's latest snapshot."""
        return [e.stats for e in self.router.engines]

    def close(self) -> None:
        """Shut every engine down and stop the loop thread (idempotent)."""
        if self._loop.is_closed():
            return
        if hasattr(self, "router"):
            self._call(self.router.shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    # ---- on the loop thread -------------------------------------------------------------------

    def _submit(self, request: EngineRequest) -> None:
        try:
            stream = self.router.stream([request])
        except EngineError as e:
            self._items.put(e)
            return
        rid = request.request_id
        self._pumps[rid] = self._loop.create_task(self._pump(rid, stream))

    async def _pump(self, request_id: str, stream: OutputStream) -> None:
        try:
            async with stream:
                async for out in stream:
                    self._items.put(out)
        except RequestRejectedError as e:
            self._items.put(RequestRejected(request_id=request_id, message=str(e)))
        except EngineError as e:
            self._items.put(e)
        finally:
            self._pumps.pop(request_id, None)

    def _cancel(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            task = self._pumps.pop(rid, None)
            if task is not None:
                task.cancel()  # leaving the stream's `async with` aborts it in its core

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()
