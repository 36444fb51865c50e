"""Error bodies in another API's shape on that API's routes (Anthropic's, Ollama's).

The server writes every error as OpenAI's ``{"error": {"message", "type", "param", "code"}}``
(routes, validation, auth, size limits, unknown paths); ``ErrorShapeMiddleware`` rewrites
those written on the paths it is given, whichever layer wrote them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heron.server.protocol import ErrorInfo, ErrorResponse


class ErrorShapeMiddleware:
    """On paths ``matches`` accepts, every JSON error body (status >= 400) in OpenAI's shape is
    rewritten to ``reshape(error)``; other bodies pass as they are."""

    def __init__(self, app: ASGIApp, matches: Callable[[str], bool],
                 reshape: Callable[[ErrorResponse], dict[str, Any]]) -> None:
        self.app = app
        self.matches = matches
        self.reshape = reshape

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not self.matches(path):
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        body: list[bytes] = []

        async def rewriting_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and _is_json_error(message):
                held = message
                return
            if held is None:
                await send(message)
                return
            body.append(message.get("body", b""))
            if not message.get("more_body"):
                await self._send_rewritten(send, held, b"".join(body))

        await self.app(scope, receive, rewriting_send)

    async def _send_rewritten(self, send: Send, start: Message, body: bytes) -> None:
        try:
            info = ErrorInfo.model_validate(json.loads(body)["error"])
            error = ErrorResponse(error=info, status_code=start["status"])
            body = json.dumps(self.reshape(error)).encode()
        except (ValueError, KeyError, TypeError):
            pass  # not our error shape: pass it on as it is
        headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _is_json_error(start: Message) -> bool:
    headers = dict(start.get("headers", []))
    return start["status"] >= 400 and headers.get(b"content-type", b"").startswith(
        b"application/json")
