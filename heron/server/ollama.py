"""Ollama's API on heron: /api/generate, /api/chat, /api/embed(dings), /api/tags, /api/show,
/api/ps, /api/version, and clear refusals for managing models (pull, push, create, copy,
delete: heron serves the one model it was started with).

Generation is prepared and run like chat (``heron.server.pipeline``, ``Generation``); one run
writes the deltas as Ollama's lines: NDJSON while streaming (the default), each line a piece of
text, then a last line with ``done: true``, ``done_reason`` and the counts and timings in
nanoseconds; or the last line alone, holding the whole text. Tool calls come whole (arguments
as an object) on a line of their own before the last. Errors on /api/ paths answer
``{"error": "message"}`` (``OllamaErrorMiddleware``), mid-stream as such a line.

Model names: the served names, each also with Ollama's ``:latest`` tag.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel
from starlette.types import ASGIApp

import heron
from heron.lora import LoRARequest
from heron.output_processor import ChoiceDelta
from heron.sampling_params import MAX_QUOTE_CHARS
from heron.server.embeddings import serve_embeddings
from heron.server.error_shape import ErrorShapeMiddleware
from heron.server.model_facts import ModelFacts, adapter_facts
from heron.server.pipeline import prepare
from heron.server.protocol import ErrorResponse, bad_request, make_error, ndjson_line
from heron.server.protocol_embeddings import EmbeddingRequest
from heron.server.protocol_ollama import (
    OLLAMA_API_VERSION,
    OLLAMA_PREFIX,
    ChatLine,
    ChatRequest,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    GenerateLine,
    GenerateRequest,
    ModelDetails,
    ModelEntry,
    ModelList,
    ModelRequest,
    OllamaFunctionOut,
    OllamaMessageOut,
    OllamaToolCallOut,
    OllamaVersion,
    RunningList,
    RunningModel,
    ShowResponse,
    StatusResponse,
    human_count,
    ollama_error,
)
from heron.server.reasoning import ReasoningStream
from heron.server.serving import Generation, ServingContext, engine_error
from heron.structured.tool_parsers import ParsedCall, ToolCallStream, ToolParser, new_call_id


@dataclass
class NDJSONStream:
    """A streamed answer of newline-delimited JSON lines (app.py sends it as such)."""

    lines: AsyncIterator[str]


OllamaResult = BaseModel | NDJSONStream  # an answer (or an ErrorResponse), or a stream


class OllamaErrorMiddleware(ErrorShapeMiddleware):
    """Every JSON error body on /api/ paths in Ollama's shape ``{"error": "message"}``."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app, lambda path: path.startswith(OLLAMA_PREFIX), ollama_error)


# ==== model names =================================================================================


def tagged(name: str) -> str:
    """A name as Ollama lists it, with a tag: "gemma-3-270m" -> "gemma-3-270m:latest"."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def served_name(ctx: ServingContext, name: str | None) -> str | None:
    """The served name ``name`` means (it matches with or without ``:latest``), or None."""
    return next((s for s in (*ctx.model_names, *ctx.loras) if name in (s, tagged(s))), None)


def check_model(ctx: ServingContext, name: str | None) -> ErrorResponse | None:
    """400 without a name (Ollama's "model is required"), 404 for one this server does not
    serve."""
    if not name:
        return bad_request("model is required", param="model")
    if served_name(ctx, name) is not None:
        return None
    served = ", ".join(f'"{tagged(n)}"' for n in (*ctx.model_names, *ctx.loras))
    return make_error(404, f'model "{name}" not found: this server serves {served} only (heron '
                           "serves the model it was started with; it cannot pull others)",
                      param="model", code="model_not_found")


def _checked(ctx: ServingContext, request: Any) -> ErrorResponse | None:
    return check_model(ctx, request.model) or ctx.check_fields(request)


# ==== generate and chat ===========================================================================


async def serve_generate(ctx: ServingContext, request: GenerateRequest) -> OllamaResult:
    return await _serve(ctx, request, chat=False)


async def serve_chat(ctx: ServingContext, request: ChatRequest) -> OllamaResult:
    return await _serve(ctx, request, chat=True)


async def _serve(ctx: ServingContext, request: GenerateRequest | ChatRequest,
                 chat: bool) -> OllamaResult:
    error = _checked(ctx, request) or _check_think(ctx, request.think)
    if error is not None:
        return error
    model = request.model or ""
    if request.loads_only:  # Ollama's way to load a model: it is loaded already
        line = (ChatLine if chat else GenerateLine)(model=model, done=True, done_reason="load")
        return line
    served = served_name(ctx, model)
    prepared = await prepare(ctx, request.model_copy(update={"model": served}))
    if isinstance(prepared, ErrorResponse):
        return prepared
    gen = Generation(ctx, f"ollama-{new_call_id()}", prepared.prompts, prepared.params,
                     prepared.reasoning, prepared.lora)
    run = _OllamaRun(model, gen, prepared.tool_parser if chat else None, chat,
                     show_thinking=request.think is not False)
    return NDJSONStream(run.stream()) if request.stream is not False else await run.full()


def _check_think(ctx: ServingContext, think: bool | str | None) -> ErrorResponse | None:
    """``think`` asked of a model that does not think (no reasoning parser runs) is a 400 in
    Ollama's words; false or absent is always fine."""
    if think in (None, False) or ctx.reasoning_parser is not None:
        return None
    value = json.dumps(think)[:MAX_QUOTE_CHARS]  # JSON's spelling, as the client sent it
    return bad_request(f'think: {value} is not supported: "{ctx.default_model}" '
                       "does not support thinking", param="think")


class _OllamaRun:
    """One generation written as Ollama's lines (``GenerateLine`` or ``ChatLine``)."""

    def __init__(self, model: str, gen: Generation, parser: ToolParser | None,
                 chat: bool, show_thinking: bool = True) -> None:
        self.model = model
        self.gen = gen
        self.chat = chat
        self.tool_stream = ToolCallStream(parser) if parser is not None else None
        # a thinking model's reasoning goes to `thinking` (dropped where `think` was false)
        self.reasoning = ReasoningStream(gen.reasoning) if gen.reasoning is not None else None
        self.show_thinking = show_thinking
        self.thinking = ""
        self.text = ""
        self.first_token: float | None = None
        self.last_token = gen.arrival

    async def full(self) -> GenerateLine | ChatLine | ErrorResponse:
        final: GenerateLine | ChatLine | None = None
        calls: list[OllamaToolCallOut] = []
        try:
            async for d in self.gen.run():
                for line in self._consume(d):
                    calls += _calls_of(line)
                    final = line if line.done else final
        except Exception as e:  # noqa: BLE001 - engine errors become error values
            return engine_error(e)
        assert final is not None
        return self._whole(final, calls)

    async def stream(self) -> AsyncIterator[str]:
        try:
            async for d in self.gen.run():
                for line in self._consume(d):
                    yield ndjson_line(line.model_dump_json())
        except Exception as e:  # noqa: BLE001 - an error line ends the stream
            yield ndjson_line(json.dumps(ollama_error(engine_error(e))))

    def _consume(self, d: ChoiceDelta) -> list[GenerateLine | ChatLine]:
        self._clock(d)
        final = d.finish_reason is not None
        text, calls, thinking = d.text, [], ""
        if self.reasoning is not None:
            thinking, text = self.reasoning.feed(d.text, len(d.token_ids), final=final)
            thinking = thinking if self.show_thinking else ""
            self.thinking += thinking
        ids: list[str] = []
        if self.tool_stream is not None:
            text, _ = self.tool_stream.feed(text, final=final)
            calls = self.tool_stream.parsed.calls if final else []
            ids = self.tool_stream.call_ids
        self.text += text
        lines = [self._line(text, thinking=thinking or None)] if text or thinking else []
        if calls:
            lines.append(self._line("", [_tool_call(i, c, ids[i]) for i, c in enumerate(calls)]))
        if final:
            lines.append(self._last(d.finish_reason or "stop"))
        return lines

    def _clock(self, d: ChoiceDelta) -> None:
        if d.token_ids:
            self.last_token = time.monotonic()
            if self.first_token is None:
                self.first_token = self.last_token

    def _line(self, text: str, calls: list[OllamaToolCallOut] | None = None,
              thinking: str | None = None, **fields: Any) -> GenerateLine | ChatLine:
        if self.chat:
            message = OllamaMessageOut(content=text, thinking=thinking, tool_calls=calls)
            return ChatLine(model=self.model, message=message, **fields)
        return GenerateLine(model=self.model, response=text, thinking=thinking, **fields)

    def _last(self, reason: str) -> GenerateLine | ChatLine:
        usage = self.gen.usage()
        first = self.first_token if self.first_token is not None else self.last_token
        return self._line(
            "", done=True, done_reason=reason,
            total_duration=_ns(time.monotonic() - self.gen.arrival), load_duration=0,
            prompt_eval_count=usage.prompt_tokens,
            prompt_eval_duration=max(1, _ns(first - self.gen.arrival)),
            eval_count=usage.completion_tokens,
            eval_duration=max(1, _ns(self.last_token - first)) if usage.completion_tokens else 0)

    def _whole(self, final: GenerateLine | ChatLine,
               calls: list[OllamaToolCallOut]) -> GenerateLine | ChatLine:
        thinking = self.thinking or None
        if isinstance(final, ChatLine):
            final.message = OllamaMessageOut(content=self.text, thinking=thinking,
                                             tool_calls=calls or None)
        else:
            final.response, final.thinking = self.text, thinking
        return final


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _tool_call(index: int, call: ParsedCall, call_id: str) -> OllamaToolCallOut:
    """A parsed call with its ``arguments`` as an object (Ollama's shape); arguments that are
    no JSON object, or JSON Python cannot read (integers past 4300 digits, nesting past the
    recursion limit: the model wrote them), are ``{}``."""
    try:
        arguments = json.loads(call.arguments) if call.arguments else {}
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        arguments = {}
    return OllamaToolCallOut(id=call_id, function=OllamaFunctionOut(
        index=index, name=call.name, arguments=arguments if isinstance(arguments, dict) else {}))


def _calls_of(line: GenerateLine | ChatLine) -> list[OllamaToolCallOut]:
    return list(line.message.tool_calls or []) if isinstance(line, ChatLine) else []


# ==== embeddings ==================================================================================


async def serve_embed(ctx: ServingContext, request: EmbedRequest) -> OllamaResult:
    """/api/embed through /v1/embeddings' path: the same unit vectors."""
    start = time.monotonic()
    error = _checked(ctx, request)
    if error is not None:
        return error
    texts = request.texts()
    model = request.model or ""
    if texts == [""]:  # Ollama's way to load an embedding model
        return EmbedResponse(model=model, embeddings=[], total_duration=0, prompt_eval_count=0)
    result = await serve_embeddings(ctx, EmbeddingRequest(
        input=texts, dimensions=request.dimensions, model=served_name(ctx, model)))
    if isinstance(result, ErrorResponse):
        return result
    vectors = [_floats(d.embedding) for d in result.data]
    return EmbedResponse(model=model, embeddings=vectors,
                         total_duration=_ns(time.monotonic() - start),
                         prompt_eval_count=result.usage.prompt_tokens)


async def serve_embeddings_legacy(ctx: ServingContext, request: EmbeddingsRequest) -> OllamaResult:
    """/api/embeddings: one prompt, one vector (an empty prompt: an empty vector)."""
    error = _checked(ctx, request)
    if error is not None:
        return error
    if not request.prompt:
        return EmbeddingsResponse(embedding=[])
    result = await serve_embeddings(ctx, EmbeddingRequest(
        input=[request.prompt], model=served_name(ctx, request.model)))
    if isinstance(result, ErrorResponse):
        return result
    return EmbeddingsResponse(embedding=_floats(result.data[0].embedding))


def _floats(embedding: list[float] | str) -> list[float]:
    assert isinstance(embedding, list), "asked for floats, not base64"
    return embedding


# ==== the model catalogue =========================================================================


def version() -> OllamaVersion:
    return OllamaVersion(version=OLLAMA_API_VERSION, heron_version=heron.__version__)


def list_models(ctx: ServingContext) -> ModelList:
    """The served names, then each LoRA adapter (``details.parent_model``: the model it adapts),
    as /v1/models lists them."""
    return ModelList(models=[_entry(ctx, name) for name in (*ctx.model_names, *ctx.loras)])


def running_models(ctx: ServingContext) -> RunningList:
    """The served model and its adapters, loaded while the server runs (no expiry)."""
    gpu = ctx.info.device.startswith("cuda")
    return RunningList(models=[
        RunningModel(**entry.model_dump(), size_vram=entry.size if gpu else 0,
                     context_length=ctx.info.max_model_len)
        for entry in list_models(ctx).models])


def show_model(ctx: ServingContext, request: ModelRequest) -> ShowResponse | ErrorResponse:
    error = check_model(ctx, request.model_name) or ctx.check_fields(request)
    if error is not None:
        return error
    name = served_name(ctx, request.model_name) or ""
    facts, lora = _facts(ctx, name), _adapter(ctx, name)
    family = facts.family
    template = ctx.tokenizer.chat_template
    info: dict[str, Any] = {
        "general.architecture": family, "general.parameter_count": facts.parameter_count,
        f"{family}.context_length": ctx.info.max_model_len,
        f"{family}.embedding_length": ctx.info.hidden_size}
    adapter = "" if lora is None else f"ADAPTER {lora.lora_path}\n"
    return ShowResponse(
        modelfile=f"# heron serves {ctx.model_root}; it was started with it (no Modelfile)\n"
                  f"FROM {ctx.model_root}\n{adapter}",
        template=template or "", details=_details(facts, _parent(ctx, lora)), model_info=info,
        capabilities=_capabilities(ctx),
        modified_at=_date(facts.modified_at))


def _capabilities(ctx: ServingContext) -> list[str]:
    """Ollama's capability names: ``tools`` with a chat template, ``thinking`` where a
    reasoning parser runs (what ``think`` needs; clients read it before they send ``think``)."""
    tools = ["tools"] if ctx.tokenizer.chat_template is not None else []
    return ["completion", *tools, *(["thinking"] if ctx.reasoning_parser is not None else [])]


def _entry(ctx: ServingContext, name: str) -> ModelEntry:
    facts = _facts(ctx, name)
    return ModelEntry(name=tagged(name), model=tagged(name), modified_at=_date(facts.modified_at),
                      size=facts.size, digest=facts.digest,
                      details=_details(facts, _parent(ctx, _adapter(ctx, name))))


def _adapter(ctx: ServingContext, name: str) -> LoRARequest | None:
    """The LoRA adapter ``name`` (a served name) means, or None for the model itself."""
    return None if name in ctx.model_names else ctx.loras.get(name)


def _parent(ctx: ServingContext, lora: LoRARequest | None) -> str:
    """An adapter's ``details.parent_model``: the model it adapts, as /v1/models names its
    ``parent``, tagged as Ollama lists names; "" for the model itself."""
    return "" if lora is None else tagged(lora.base_model_name or ctx.default_model)


def _facts(ctx: ServingContext, name: str | None = None) -> ModelFacts:
    """The facts read at start-up (an adapter's: with its files, ``adapter_facts``), or what
    the engine knows when they could not be read."""
    lora = None if name is None else _adapter(ctx, name)
    if ctx.facts is not None:
        return ctx.facts if lora is None else adapter_facts(ctx.facts, lora.lora_path)
    return ModelFacts(format="unknown", family="unknown", parameter_count=0,
                      quantization=ctx.info.dtype.upper(), size=0, digest="",
                      modified_at=datetime.fromtimestamp(0, timezone.utc))


def _details(facts: ModelFacts, parent: str = "") -> ModelDetails:
    return ModelDetails(parent_model=parent, format=facts.format, family=facts.family,
                        families=[facts.family], parameter_size=human_count(facts.parameter_count),
                        quantization_level=facts.quantization)


def _date(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


# ==== managing models: refused ====================================================================


def pull_model(ctx: ServingContext, request: ModelRequest) -> OllamaResult:
    """Pulling the served model succeeds at once (it is here); any other is refused."""
    name = request.model_name
    if not name or check_model(ctx, name) is not None:
        return refuse_management(ctx, "pull")
    status = StatusResponse(status="success")
    if request.stream is False:
        return status
    return NDJSONStream(_one_line(status.model_dump_json()))


async def _one_line(text: str) -> AsyncIterator[str]:
    yield ndjson_line(text)


def refuse_management(ctx: ServingContext, action: str) -> ErrorResponse:
    """501: heron serves the model it was started with and keeps no model library."""
    served = ", ".join(f'"{tagged(n)}"' for n in ctx.model_names)
    return make_error(501, f"heron cannot {action} models: it serves {served}, the model it was "
                           "started with (start heron with another model to serve that one)",
                      code="not_implemented")

