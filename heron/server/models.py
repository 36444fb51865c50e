"""GET /v1/models and /v1/models/{id}: the names this server answers to (the served model's,
then each LoRA adapter's, whose ``parent`` is the model it adapts, as vLLM lists them)."""

from __future__ import annotations

from heron.server.protocol import ErrorResponse, ModelCard, ModelList, make_error
from heron.server.serving import ServingContext


def model_cards(ctx: ServingContext) -> ModelList:
    return ModelList(data=[_card(ctx, name) for name in (*ctx.model_names, *ctx.loras)])


def model_card(ctx: ServingContext, model_id: str) -> ModelCard | ErrorResponse:
    if model_id not in ctx.model_names and model_id not in ctx.loras:
        return make_error(
            404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found"
        )
    return _card(ctx, model_id)


CHAT_ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/messages",
                  "/v1/messages/count_tokens", "/api/chat")
# /api/generate renders its prompt with the chat template unless it is raw.
TEXT_ENDPOINTS = ("/v1/completions", "/v1/embeddings", "/tokenize", "/detokenize",
                  "/api/generate", "/api/embed", "/api/embeddings")


def served_endpoints(ctx: ServingContext) -> list[str]:
    """Every route that can serve the model: those that render chats need its chat template."""
    chat = CHAT_ENDPOINTS if ctx.tokenizer.chat_template is not None else ()
    return sorted(chat + TEXT_ENDPOINTS)


def _card(ctx: ServingContext, name: str) -> ModelCard:
    lora = ctx.loras.get(name) if name not in ctx.model_names else None
    if lora is not None:
        return ModelCard(id=name, root=lora.lora_path,
                         parent=lora.base_model_name or ctx.default_model,
                         max_model_len=ctx.info.max_model_len, endpoints=served_endpoints(ctx))
    return ModelCard(id=name, root=ctx.model_root, max_model_len=ctx.info.max_model_len,
                     endpoints=served_endpoints(ctx))
