"""The FastAPI app: thin routes, auth, body limits, CORS, OpenAI's error shape, SSE.

Each route hands its parsed request to a serving function (chat.py, completions.py...)
and turns the result into HTTP: a model -> JSON, an ``ErrorResponse`` -> its status and
``{"error": {...}}``, an async iterator of SSE lines -> a streaming response. Every error
path, including bad JSON, wrong content types, unknown routes and oversized bodies, answers
in the same error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import sys
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import heron
from heron.server import webui
from heron.server.chat import serve_chat
from heron.server.completions import serve_completion
from heron.server.config import ServerConfig
from heron.server.embeddings import serve_embeddings
from heron.server.messages import (
    MESSAGES_PATH,
    AnthropicErrorMiddleware,
    is_messages_path,
    serve_count_tokens,
    serve_messages,
)
from heron.server.metrics import HTTPCountMiddleware, ServerMetrics, StatsLogger
from heron.server.models import (
    load_lora_adapter,
    model_card,
    model_cards,
    unload_lora_adapter,
)
from heron.server.offload import HeavyLane, LaneRoute
from heron.server.ollama import (
    NDJSONStream,
    OllamaErrorMiddleware,
    pull_model,
    refuse_management,
    running_models,
    serve_embed,
    serve_embeddings_legacy,
    serve_generate,
    show_model,
)
from heron.server.ollama import (
    list_models as ollama_models,
)
from heron.server.ollama import serve_chat as serve_ollama_chat
from heron.server.ollama import version as ollama_version
from heron.server.protocol import (
    FIELD_ERROR,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthStatus,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
    VersionResponse,
    make_error,
    telling_error,
)
from heron.server.protocol_anthropic import (
    AnthropicResponse,
    CountTokensRequest,
    MessagesRequest,
    TokenCount,
    anthropic_error,
)
from heron.server.protocol_embeddings import EmbeddingRequest, EmbeddingResponse
from heron.server.protocol_ollama import (
    OLLAMA_PREFIX,
    ChatLine,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    GenerateLine,
    ModelRequest,
    OllamaVersion,
    RunningList,
    ShowResponse,
    StatusResponse,
    ollama_error,
)
from heron.server.protocol_ollama import ChatRequest as OllamaChatRequest
from heron.server.protocol_ollama import GenerateRequest as OllamaGenerateRequest
from heron.server.protocol_ollama import ModelList as OllamaModelList
from heron.server.protocol_responses import DeletedResponse, ResponseObject, ResponsesRequest
from heron.server.protocol_score import (
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
)
from heron.server.responses import delete_response, retrieve_response, serve_responses
from heron.server.router import Router
from heron.server.score import serve_rerank, serve_score
from heron.server.security import (
    HostCheck,
    HostCheckMiddleware,
    StrictCORSMiddleware,
    send_error,
)
from heron.server.serving import ServingContext
from heron.server.tokenize import serve_detokenize, serve_tokenize

logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 500, 503)
}

router = APIRouter(route_class=LaneRoute)  # large bodies: parsed off the event loop


def build_app(config: ServerConfig, ctx: ServingContext | None = None) -> FastAPI:
    """The ASGI app; without ``ctx`` it answers 503 "loading" until ``mark_ready``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_log_stats(app), name="heron-stats-log")
        try:
            yield
        finally:
            task.cancel()
            app.state.lane.close()

    app = FastAPI(
        title="heron",
        version=heron.__version__,
        lifespan=lifespan,
        description="An OpenAI-compatible LLM server.",
    )
    app.state.ready = asyncio.Event()
    app.state.ctx = None
    app.state.lane = HeavyLane()  # large requests' CPU work (heron.server.offload)
    if ctx is not None:
        mark_ready(app, ctx)
    app.include_router(router)
    if config.allow_runtime_lora:
        app.include_router(lora_router)
    if config.enable_web_ui:
        app.include_router(webui.router)
    _add_error_handlers(app)
    # Added innermost first: Host (outermost) -> CORS -> Anthropic and Ollama error shapes ->
    # auth -> body checks -> counting -> routes.
    app.add_middleware(HTTPCountMiddleware, metrics=lambda: _metrics(app))
    app.add_middleware(BodyCheckMiddleware, max_bytes=config.max_request_bytes)
    if config.api_key:
        app.add_middleware(
            AuthMiddleware, api_key=config.api_key, public_page=config.enable_web_ui
        )
    app.add_middleware(AnthropicErrorMiddleware)
    app.add_middleware(OllamaErrorMiddleware)
    if config.allowed_origins:
        app.add_middleware(StrictCORSMiddleware, allowed_origins=config.allowed_origins)
    app.add_middleware(HostCheckMiddleware, check=HostCheck(config.host, config.allowed_hosts))
    return app


def _metrics(app: FastAPI) -> ServerMetrics | None:
    ctx: ServingContext | None = app.state.ctx
    return None if ctx is None else ctx.metrics


def mark_ready(app: FastAPI, ctx: ServingContext) -> None:
    """The model is loaded: serve requests with ``ctx`` from now on."""
    app.state.ctx = ctx
    app.state.ready.set()


async def _log_stats(app: FastAPI) -> None:
    await app.state.ready.wait()
    ctx: ServingContext = app.state.ctx
    stats = StatsLogger(ctx.engine)
    while True:
        await asyncio.sleep(ctx.config.stats_interval_s)
        line = stats.tick()
        if line is not None:
            logger.info("%s", line)


def _ctx(request: Request) -> ServingContext:
    ctx = request.app.state.ctx
    if ctx is None:
        raise HTTPException(503, detail=_LOADING)
    return ctx


_LOADING = make_error(
    503, "the model is still loading; GET /health answers 200 once it is ready",
    code="model_loading",
)


# ==== routes ======================================================================================


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    return await respond(request, serve_chat(_ctx(request), body))


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return await respond(request, serve_completion(_ctx(request), body))


@router.post("/v1/responses", response_model=ResponseObject, responses=_ERRORS)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    return await respond(request, serve_responses(_ctx(request), body))


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=_ERRORS)
async def get_response(response_id: str, request: Request) -> Response:
    return to_response(retrieve_response(_ctx(request), response_id))


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse, responses=_ERRORS)
async def remove_response(response_id: str, request: Request) -> Response:
    return to_response(delete_response(_ctx(request), response_id))


@router.post("/v1/messages", response_model=AnthropicResponse, responses=_ERRORS)
async def create_message(body: MessagesRequest, request: Request) -> Response:
    return await respond(request, serve_messages(_ctx(request), body))


@router.post("/v1/messages/count_tokens", response_model=TokenCount, responses=_ERRORS)
async def count_message_tokens(body: CountTokensRequest, request: Request) -> Response:
    return await respond(request, serve_count_tokens(_ctx(request), body))


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS)
async def create_embedding(body: EmbeddingRequest, request: Request) -> Response:
    return await respond(request, serve_embeddings(_ctx(request), body))


@router.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS)
@router.post("/score", response_model=ScoreResponse, responses=_ERRORS, include_in_schema=False)
async def create_score(body: ScoreRequest, request: Request) -> Response:
    return await respond(request, serve_score(_ctx(request), body))


@router.post("/v1/rerank", response_model=RerankResponse, responses=_ERRORS)
@router.post("/rerank", response_model=RerankResponse, responses=_ERRORS, include_in_schema=False)
@router.post("/v2/rerank", response_model=RerankResponse, responses=_ERRORS,
             include_in_schema=False)
async def create_rerank(body: RerankRequest, request: Request) -> Response:
    return await respond(request, serve_rerank(_ctx(request), body))


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> Response:
    return to_response(model_cards(_ctx(request)))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
async def retrieve_model(model_id: str, request: Request) -> Response:
    return to_response(model_card(_ctx(request), model_id))


lora_router = APIRouter()  # only with --allow-runtime-lora


@lora_router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=_ERRORS)
async def load_lora(body: LoadLoRAAdapterRequest, request: Request) -> Response:
    return _text_or_error(load_lora_adapter(_ctx(request), body))


@lora_router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
                  responses=_ERRORS)
async def unload_lora(body: UnloadLoRAAdapterRequest, request: Request) -> Response:
    return _text_or_error(unload_lora_adapter(_ctx(request), body))


def _text_or_error(result: str | ErrorResponse) -> Response:
    return PlainTextResponse(result) if isinstance(result, str) else to_response(result)


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    return to_response(await serve_tokenize(_ctx(request), body))


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
    return to_response(await serve_detokenize(_ctx(request), body))


# ---- Ollama's API (heron.server.ollama) -------------------------------------------------------


@router.post("/api/generate", response_model=GenerateLine, responses=_ERRORS)
async def ollama_generate(body: OllamaGenerateRequest, request: Request) -> Response:
    return await respond(request, serve_generate(_ctx(request), body))


@router.post("/api/chat", response_model=ChatLine, responses=_ERRORS)
async def ollama_chat(body: OllamaChatRequest, request: Request) -> Response:
    return await respond(request, serve_ollama_chat(_ctx(request), body))


@router.post("/api/embed", response_model=EmbedResponse, responses=_ERRORS)
async def ollama_embed(body: EmbedRequest, request: Request) -> Response:
    return await respond(request, serve_embed(_ctx(request), body))


@router.post("/api/embeddings", response_model=EmbeddingsResponse, responses=_ERRORS)
async def ollama_embeddings(body: EmbeddingsRequest, request: Request) -> Response:
    return await respond(request, serve_embeddings_legacy(_ctx(request), body))


@router.get("/api/tags", response_model=OllamaModelList, responses=_ERRORS)
async def ollama_tags(request: Request) -> Response:
    return to_response(ollama_models(_ctx(request)))


@router.head("/api/tags", response_class=Response, responses=_ERRORS)
async def ollama_tags_head(request: Request) -> Response:
    return await ollama_tags(request)


@router.get("/api/ps", response_model=RunningList, responses=_ERRORS)
async def ollama_ps(request: Request) -> Response:
    return to_response(running_models(_ctx(request)))


@router.post("/api/show", response_model=ShowResponse, responses=_ERRORS)
async def ollama_show(body: ModelRequest, request: Request) -> Response:
    return to_response(show_model(_ctx(request), body))


@router.get("/api/version", response_model=OllamaVersion)
async def ollama_api_version() -> OllamaVersion:
    return ollama_version()


@router.head("/api/version", response_class=Response)
async def ollama_api_version_head() -> Response:
    return to_response(ollama_version())


@router.post("/api/pull", response_model=StatusResponse, responses=_ERRORS)
async def ollama_pull(body: ModelRequest, request: Request) -> Response:
    return to_response(pull_model(_ctx(request), body))


_MANAGEMENT = {("POST", "/api/push"): "push", ("POST", "/api/create"): "create",
               ("POST", "/api/copy"): "copy", ("DELETE", "/api/delete"): "delete",
               ("POST", "/api/blobs/{digest}"): "upload blobs for",
               ("HEAD", "/api/blobs/{digest}"): "keep blobs for"}


async def _refuse_management(request: Request) -> Response:
    path = request.scope["route"].path
    return to_response(refuse_management(_ctx(request), _MANAGEMENT[request.method, path]))


for (_method, _path) in _MANAGEMENT:
    router.add_api_route(_path, _refuse_management, methods=[_method], responses=_ERRORS,
                         response_class=Response)


_HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": HealthStatus, "description": "Alive and stepping. One engine: an empty body; "
          "several: their report (status ok, or degraded while at least one is up)."},
    503: {"model": ErrorResponse | HealthStatus, "description": "Loading (status loading), the "
          "engine gone, stopped or stuck (an error), or every engine down (their report)."},
}


@router.get("/health", response_class=Response, responses=_HEALTH_RESPONSES)
async def health(request: Request) -> Response:
    """200 while the engine core is alive and stepping (its heartbeat arrives, its loop
    finishes steps); 503 ``{"status": "loading"}`` until the model is loaded; 503 within
    seconds of it stopping, hanging or dying. With several engines: a JSON body that says
    which are up, 200 while at least one is ("ok" or "degraded"), else 503."""
    if request.app.state.ctx is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    engine = _ctx(request).engine
    if isinstance(engine, Router):
        report = engine.health_report()
        return JSONResponse(report, status_code=200 if report["status"] != "down" else 503)
    problem = engine.health()
    if problem is None:
        return Response(status_code=200)
    return to_response(make_error(503, f"the engine is not serving: {problem}"))


@router.head("/health", response_class=Response, responses=_HEALTH_RESPONSES)
async def health_head(request: Request) -> Response:
    """``/health`` for probes that send HEAD: the same status, no body."""
    return await health(request)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=heron.__version__)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(_ctx(request).metrics.render(), media_type="text/plain; version=0.0.4")


# ==== results -> HTTP =============================================================================


class SSEResponse(StreamingResponse):
    """A stream of ``data: ...`` lines; closing it (also on disconnect) aborts the generation."""

    media_type = "text/event-stream"

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def to_response(result: BaseModel | AsyncIterator[str] | NDJSONStream) -> Response:
    if isinstance(result, NDJSONStream):
        return SSEResponse(result.lines, media_type="application/x-ndjson",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if isinstance(result, ErrorResponse):
        return JSONResponse(result.model_dump(mode="json"), status_code=result.status_code)
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(), media_type="application/json")
    return SSEResponse(result, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def respond(request: Request,
                  work: Awaitable[BaseModel | AsyncIterator[str] | NDJSONStream]) -> Response:
    """Run a serving function, cancelling it (which aborts its requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening any more
    return to_response(task.result())


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ==== errors ======================================================================================


def _error_json(error: ErrorResponse) -> JSONResponse:
    return JSONResponse(error.model_dump(mode="json"), status_code=error.status_code)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        dotted = request.url.path.startswith(MESSAGES_PATH)  # Anthropic's spelling
        return _error_json(validation_error(exc.errors(), dotted))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.detail, ErrorResponse):
            return _error_json(exc.detail)
        unreadable = body_error(exc.__cause__)
        if unreadable is not None:
            return _error_json(unreadable)
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}"
        return _error_json(make_error(exc.status_code, message))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return _shaped_error(request.url.path,
                             make_error(500, f"internal error: {type(exc).__name__}"))


def _shaped_error(path: str, error: ErrorResponse) -> JSONResponse:
    """``error`` in the shape of the API ``path`` belongs to, for an answer that passes no shape
    middleware: Starlette sends an unexpected exception's answer from outside them all."""
    if is_messages_path(path):
        body = anthropic_error(error)
    elif path.startswith(OLLAMA_PREFIX):
        body = ollama_error(error)
    else:
        body = error.model_dump(mode="json")
    return JSONResponse(body, status_code=error.status_code)


def body_error(cause: BaseException | None) -> ErrorResponse | None:
    """Why FastAPI could not parse a body (it answers 'There was an error parsing the body'
    for anything but a JSON syntax error): bytes that are not UTF-8, arrays and objects
    nested past the depth Python's JSON parser takes, an integer longer than Python converts.
    None for any other cause."""
    if isinstance(cause, UnicodeDecodeError):
        byte = cause.object[cause.start:cause.start + 1].hex()
        return make_error(400, f"the request body is not valid UTF-8: byte 0x{byte} at offset "
                               f"{cause.start} ({cause.reason})", code="invalid_json")
    if isinstance(cause, RecursionError):
        return make_error(400, "the request body nests JSON arrays and objects too deeply "
                               "(the parser stops short of 1000 levels)", code="invalid_json")
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return make_error(400, "the request body holds an integer of more than "
                               f"{sys.get_int_max_str_digits()} digits", code="invalid_json")
    return None


def validation_error(errors: Any, dotted: bool = False) -> ErrorResponse:
    """pydantic/FastAPI validation errors -> one 400 naming the most telling bad field
    (``telling_error``), as OpenAI names it: ``messages[2].content`` (``dotted``:
    ``messages.2.content``, as Anthropic's API does)."""
    errors = list(errors) or [{"loc": (), "msg": "invalid request", "type": ""}]
    named = next((e for e in errors if e.get("type") == FIELD_ERROR), None)
    if named is not None:  # a model-level check that names its field
        return make_error(400, str(named.get("msg")), param=named["ctx"]["param"],
                          code=named["ctx"].get("code"))
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg"))
        return make_error(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    path, message = telling_error(errors, dotted)
    if not path and first.get("type") == "missing":  # FastAPI's "Field required" for no body
        return make_error(400, "the request body is empty: send a JSON object",
                          code="invalid_json")
    return make_error(400, f"{path}: {message}" if path else message, param=path or None)


# ==== middleware ==================================================================================


class AuthMiddleware:
    """``Authorization: Bearer <key>`` (or Anthropic's ``x-api-key: <key>``) on every path but
    /health and the chat page (which asks for the key itself), every method included: an
    OPTIONS request without the key learns nothing (CORS preflights are answered before this,
    by the CORS middleware, for every path alike)."""

    def __init__(self, app: ASGIApp, api_key: str, public_page: bool = False) -> None:
        self.app = app
        self.key = api_key.encode()
        self.expected = f"Bearer {api_key}".encode()
        self.public_page = public_page

    def _public(self, scope: Scope) -> bool:
        path = scope["path"]
        return path == "/health" or (self.public_page and webui.is_public(path))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._public(scope):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        x_api_key = headers.get(b"x-api-key")
        valid = hmac.compare_digest(given, self.expected) or (
            x_api_key is not None and hmac.compare_digest(x_api_key, self.key)
        )
        if not valid:
            reason = "missing" if not given and x_api_key is None else "wrong"
            await send_error(
                send,
                make_error(
                    401,
                    f"Unauthorized: the API key is {reason}; send 'Authorization: Bearer <key>' "
                    "or 'x-api-key: <key>'.",
                    code="invalid_api_key",
                ),
            )
            return
        await self.app(scope, receive, send)


def _curl_form_to_ollama(path: str, headers: dict[bytes, bytes]) -> bool:
    """A body curl's ``-d`` labels as a form, posted to an Ollama route by no browser."""
    ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    return (ctype == b"application/x-www-form-urlencoded" and b"origin" not in headers
            and path.startswith(OLLAMA_PREFIX))


class BodyCheckMiddleware:
    """JSON bodies only (415 otherwise) and at most ``max_bytes`` of them (413).

    One exception, for Ollama's routes: ``curl URL -d '{...}'``, as every example of Ollama's
    API is written (Ollama reads any body as JSON), sends ``application/x-www-form-urlencoded``;
    on an ``/api/`` path without an ``Origin`` header it is read as JSON. Browsers send
    ``Origin`` with every POST, so a web page still cannot post a form to these routes."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if _curl_form_to_ollama(scope["path"], headers):
            scope = {**scope, "headers": [(k, b"application/json" if k == b"content-type" else v)
                                          for k, v in scope["headers"]]}
            headers = dict(scope["headers"])
        error = self._check_headers(headers)
        if error is not None:
            await send_error(send, error)
            return
        await self.app(scope, self._limited(receive), send)

    def _check_headers(self, headers: dict[bytes, bytes]) -> ErrorResponse | None:
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        length = headers.get(b"content-length", b"").decode("latin-1")
        has_body = length != "0" and (length or b"transfer-encoding" in headers)
        if (ctype or has_body) and ctype != "application/json" and not ctype.endswith("+json"):
            got = repr(ctype) if ctype else "none"
            return make_error(
                415,
                f"Content-Type must be application/json, got {got}",
                code="unsupported_media_type",
            )
        if length.isdigit() and int(length) > self.max_bytes:
            return self._too_large()
        return None

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, detail=self._too_large())
            return message

        return receive_limited

    def _too_large(self) -> ErrorResponse:
        return make_error(
            413,
            f"the request body exceeds the limit of {self.max_bytes} bytes",
            code="request_too_large",
        )
