"""The heavy lane: a large request's CPU work runs off the event loop, a bounded few at a time.

A request whose body is ``LARGE_BODY_BYTES`` or longer is admitted to the lane once its bytes
are read, before they are parsed::

    route (LaneRoute)      body bytes read --> wait for a slot (at most ``slots`` requests hold one)
      on a lane thread       json.loads + the route's pydantic validation
    serving function       to_spec, chat template, tokenization, token-id checks: ``offload``
      on a lane thread       (each step while the request holds its slot)
    pipeline.prepare done  the slot is given back (generation holds none)

Smaller bodies run every step inline, as before (16 KiB of one-word messages, ~460 of them,
cost the loop ~20 ms on a shared 2-core box). The lane has as many threads as slots, so 50 concurrent 4 MiB bodies
hold 50 buffers of bytes and at most ``slots`` parsed bodies; the others wait, unparsed.

Threads share the GIL: a step that stays in C without releasing it (``json.loads``, pydantic's
core, the tokenizer's decode) still pauses the loop for as long as it runs; Python code
(templates, conversions, validators) and the tokenizer's encode let it run every few ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

LARGE_BODY_BYTES = 16 << 10  # bodies this long or longer are parsed and prepared on the lane
LANE_SLOTS = 2  # large requests between body parse and tokenized prompt at once

P = ParamSpec("P")
T = TypeVar("T")


class Slot:
    """One admitted request's hold on the lane; ``release`` is idempotent."""

    def __init__(self, lane: HeavyLane) -> None:
        self.lane = lane
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.lane.slots.release()


_SLOT: ContextVar[Slot | None] = ContextVar("heron_heavy_slot", default=None)


class HeavyLane:
    """``slots`` threads, and a semaphore that admits at most ``slots`` large requests."""

    def __init__(self, slots: int = LANE_SLOTS) -> None:
        if slots < 1:
            raise ValueError(f"a heavy lane needs at least one slot, got {slots}")
        self.slots = asyncio.Semaphore(slots)
        self.pool = ThreadPoolExecutor(slots, thread_name_prefix="heron-heavy")
        self.queued = 0  # requests waiting for a slot

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[Slot]:
        """Hold a slot for the block (the serving function may give it back sooner)."""
        self.queued += 1
        try:
            await self.slots.acquire()
        finally:
            self.queued -= 1
        slot = Slot(self)
        token = _SLOT.set(slot)
        try:
            yield slot
        finally:
            _SLOT.reset(token)
            slot.release()

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on a lane thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def on_lane() -> bool:
    """True while the running request holds a lane slot (its body was large)."""
    slot = _SLOT.get()
    return slot is not None and slot.held


async def offload(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on the lane when the running request holds a slot, else here."""
    slot = _SLOT.get()
    if slot is not None and slot.held:
        return await slot.lane.run(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def leave_lane() -> None:
    """The running request's heavy work is done: give its slot to the next large request."""
    slot = _SLOT.get()
    if slot is not None:
        slot.release()


# ==== the route ===================================================================================


@dataclass
class ParsedBody:
    """A body parsed and validated on the lane: the route's model (or, with ``errors``,
    FastAPI's validation errors and the JSON), or the exception ``json.loads`` raised."""

    value: Any = None
    errors: list[Any] = field(default_factory=list)
    failure: Exception | None = None


def parse_body(raw: bytes, body_field: Any) -> ParsedBody:
    """What FastAPI does to a JSON body, on the calling thread: ``json.loads``, then the
    route's body field validates it (``body_field``: FastAPI's ModelField, errors located
    under ``body`` as FastAPI locates them)."""
    try:
        data = json.loads(raw)
    except Exception as e:  # noqa: BLE001 - FastAPI answers each kind of failure itself
        return ParsedBody(failure=e)
    value, errors = body_field.validate(data, {}, loc=("body",))
    return ParsedBody(data, list(errors)) if errors else ParsedBody(value)


class _ParsedRequest(Request):
    """The request FastAPI's handler sees for a body parsed on the lane: ``json()`` hands it
    the validated model (validating an instance again is a type check) or raises what
    ``json.loads`` raised, so FastAPI's own code answers a bad body."""

    def __init__(self, request: Request, raw: bytes, parsed: ParsedBody) -> None:
        super().__init__(request.scope, request.receive, request._send)
        self._body = raw
        self._parsed = parsed

    async def json(self) -> Any:
        if self._parsed.failure is not None:
            raise self._parsed.failure
        return self._parsed.value


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class LaneRoute(APIRoute):
    """An APIRoute whose JSON body, when ``LARGE_BODY_BYTES`` or longer, is admitted to the
    app's heavy lane (``app.state.lane``) and parsed and validated there; the request keeps
    its slot until its serving function calls ``leave_lane`` or the route returns. Answers,
    errors included, are those FastAPI gives: smaller bodies take FastAPI's own path."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        body_field = self.body_field
        if body_field is None:
            return handler

        async def route(request: Request) -> Response:
            try:
                raw = await request.body()
            except HTTPException:
                raise  # the body limit's 413
            except Exception as e:  # noqa: BLE001 - as FastAPI answers a body it cannot read
                raise HTTPException(400, "There was an error parsing the body") from e
            if len(raw) < LARGE_BODY_BYTES:
                return await handler(request)
            lane: HeavyLane = request.app.state.lane
            async with lane.admit():
                parsed = await lane.run(parse_body, raw, body_field)
                if parsed.errors:
                    raise RequestValidationError(parsed.errors, body=parsed.value)
                return await handler(_ParsedRequest(request, raw, parsed))

        return route
