"""Browser-facing rules: which Host names are served, and CORS without the dangerous cases.

Host (DNS rebinding): a web page on ``evil.example`` can make its name resolve to 127.0.0.1
and then read ``http://evil.example:8000/v1/...`` as same-origin, reaching a server that only
listens on loopback and has no API key (the default). A server bound to a loopback address
therefore answers only Host names that mean loopback (``localhost``, ``*.localhost``,
``127.x.x.x``, ``[::1]``), plus those ``--allowed-hosts`` adds; ``--allowed-hosts '*'`` turns the
check off. Bound elsewhere, every Host is served unless ``--allowed-hosts`` lists them.

CORS (``--allowed-origins``): credentials are allowed only with an explicit origin list, never
with ``*``; the ``null`` origin (sandboxed frames, ``file://`` pages, redirects) is never
allowed, whatever the list says.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heron.server.guards import printable
from heron.server.protocol import ErrorResponse, make_error

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether a bind address or Host name means this machine only."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name part of a Host header: ``[::1]:8000`` -> ``::1``, ``Example.com.:80`` ->
    ``example.com``."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class HostCheck:
    """Which Host names to serve: None serves all."""

    def __init__(self, bind_host: str, allowed_hosts: Iterable[str]) -> None:
        allowed = {host_name(h) for h in allowed_hosts}
        self.open = "*" in allowed or (not allowed and not is_loopback(bind_host))
        self.names = frozenset(allowed - {"*"})

    def allows(self, header: str | None) -> bool:
        if self.open or header is None:  # no Host at all: not a browser (HTTP/1.0 tools)
            return True
        name = host_name(header)
        return is_loopback(name) or name in self.names


class HostCheckMiddleware:
    """400 in OpenAI's error shape for a Host header the server does not answer to."""

    def __init__(self, app: ASGIApp, check: HostCheck) -> None:
        self.app = app
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.check.allows(Headers(scope=scope).get("host")):
            await self.app(scope, receive, send)
            return
        host = printable(Headers(scope=scope).get("host") or "", 100)
        await send_error(send, make_error(
            400, f"the Host header {host!r} is not one this server answers to; a server bound "
                 "to loopback serves loopback names only (add names with --allowed-hosts)",
            code="invalid_host"))


async def send_error(send: Send, error: ErrorResponse) -> None:
    """Answer from a middleware, in OpenAI's error shape."""
    body = json.dumps(error.model_dump(mode="json")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class StrictCORSMiddleware(CORSMiddleware):
    """Starlette's CORS with credentials only for listed origins and ``null`` never allowed."""

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str]) -> None:
        origins = [o for o in allowed_origins if o != "null"]
        super().__init__(
            app,
            allow_origins=origins,
            allow_credentials="*" not in origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )

    def is_allowed_origin(self, origin: str) -> bool:
        return origin != "null" and super().is_allowed_origin(origin)

    def preflight_response(self, request_headers: Headers) -> Response:
        if request_headers["origin"] == "null":
            return PlainTextResponse("Disallowed CORS origin", status_code=400)
        return super().preflight_response(request_headers)

    async def send(self, message: Message, send: Send, request_headers: Headers) -> None:
        if request_headers.get("origin") == "null":
            await send(message)  # no CORS headers at all: not even "*"
            return
        await super().send(message, send, request_headers)
