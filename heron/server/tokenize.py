"""POST /tokenize and /detokenize (vLLM's extras): the server's own tokenizer, exposed."""

from __future__ import annotations

from heron.server.offload import offload
from heron.server.pipeline import check_token_ids, tokenize
from heron.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
    bad_request,
)
from heron.server.serving import ServingContext, value_error


async def serve_tokenize(
    ctx: ServingContext, request: TokenizeRequest
) -> TokenizeResponse | ErrorResponse:
    """``prompt`` is encoded as is; ``messages`` are rendered with the chat template first."""
    error = ctx.check_model(request.model) or ctx.check_fields(request)
    if error is not None:
        return error
    if (request.prompt is None) == (request.messages is None):
        return bad_request("give exactly one of prompt or messages", param="prompt")
    try:
        ids = (await tokenize(ctx, await offload(request.to_input)))[0].token_ids
    except ValueError as e:
        return value_error(e, request)
    strs = ctx.token_strings(ids) if request.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=ctx.info.max_model_len, tokens=ids, token_strs=strs
    )


async def serve_detokenize(
    ctx: ServingContext, request: DetokenizeRequest
) -> DetokenizeResponse | ErrorResponse:
    error = ctx.check_model(request.model) or ctx.check_fields(request)
    if error is not None:
        return error
    return await offload(_detokenize, ctx, request.tokens)


def _detokenize(ctx: ServingContext, tokens: list[int]) -> DetokenizeResponse | ErrorResponse:
    return check_token_ids(ctx, tokens, "tokens") or DetokenizeResponse(
        prompt=ctx.tokenizer.decode(tokens))
