"""GET /v1/models and /v1/models/{id}: the names this server answers to (the served model's,
then each LoRA adapter's, whose ``parent`` is the model it adapts, as vLLM lists them)."""

from __future__ import annotations

from heron.lora import LoRARequest
from heron.server.protocol import (
    ErrorResponse,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoRAAdapterRequest,
    bad_request,
    make_error,
)
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


# A classifier of more than 2 labels gives no single score (heron.scoring.check_scorable).
SCORE_ENDPOINTS = ("/v1/score", "/v1/rerank")


def served_endpoints(ctx: ServingContext) -> list[str]:
    """Every route that can serve the model: those that render chats need its chat template;
    scoring needs a head of at most 2 labels, or none (the cosine of embeddings)."""
    chat = CHAT_ENDPOINTS if ctx.tokenizer.chat_template is not None else ()
    score = SCORE_ENDPOINTS if ctx.info.num_labels <= 2 else ()
    return sorted(chat + TEXT_ENDPOINTS + score)


def _card(ctx: ServingContext, name: str) -> ModelCard:
    lora = ctx.loras.get(name) if name not in ctx.model_names else None
    if lora is not None:
        return ModelCard(id=name, root=lora.lora_path,
                         parent=lora.base_model_name or ctx.default_model,
                         max_model_len=ctx.info.max_model_len, endpoints=served_endpoints(ctx))
    return ModelCard(id=name, root=ctx.model_root, max_model_len=ctx.info.max_model_len,
                     endpoints=served_endpoints(ctx))


# ==== runtime LoRA adapters (--allow-runtime-lora) ================================================


def load_lora_adapter(ctx: ServingContext, body: LoadLoRAAdapterRequest) -> str | ErrorResponse:
    """Serve a PEFT directory under a new name, its files and config checked here (its shapes
    against the model when a request first uses it). The text of vLLM's answer, or an error."""
    from heron.lora.adapter_config import check_adapter

    if ctx.max_lora_rank is None:
        return bad_request("LoRA is not enabled on this server (--enable-lora)", param="lora_name")
    name = body.lora_name
    if not name or name in ctx.model_names or name in ctx.loras:
        return bad_request(f"The lora adapter '{name}' has already been loaded.",
                           param="lora_name", code="lora_adapter_exists")
    lora_int_id = max([ctx.last_lora_id, *(r.lora_int_id for r in ctx.loras.values())]) + 1
    lora = LoRARequest(name, lora_int_id, body.lora_path)
    try:
        check_adapter(lora, ctx.max_lora_rank)
    except ValueError as e:
        return bad_request(str(e), param="lora_path")
    ctx.loras[name] = lora
    ctx.last_lora_id = lora.lora_int_id
    return f"Success: LoRA adapter '{name}' added successfully."


def unload_lora_adapter(ctx: ServingContext,
                        body: UnloadLoRAAdapterRequest) -> str | ErrorResponse:
    """Stop serving an adapter's name (requests in flight finish with it)."""
    lora = ctx.loras.get(body.lora_name)
    if lora is None or body.lora_int_id not in (None, lora.lora_int_id):
        return make_error(404, f"The lora adapter '{body.lora_name}' cannot be found.",
                          param="lora_name", code="lora_adapter_not_found")
    del ctx.loras[body.lora_name]
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
