"""POST /tokenize and /detokenize (vLLM's extras): the server's own tokenizer, exposed."""

from __future__ import annotations

from heron.server.chat import render_chat_prompt
from heron.server.protocol import (
    ChatCompletionRequest,
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
    error = ctx.check_model(request.model)
    if error is not None:
        return error
    if (request.prompt is None) == (request.messages is None):
        return bad_request("give exactly one of prompt or messages", param="prompt")
    try:
        if request.messages is not None:
            chat = ChatCompletionRequest(
                messages=request.messages,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                chat_template_kwargs=request.chat_template_kwargs,
            )
            chat.check_messages()
            ids = (await render_chat_prompt(ctx, chat)).token_ids
        else:
            ids = await ctx.encode(request.prompt or "", bool(request.add_special_tokens))
    except ValueError as e:
        return value_error(e)
    strs = ctx.token_strings(ids) if request.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=ctx.info.max_model_len, tokens=ids, token_strs=strs
    )


async def serve_detokenize(
    ctx: ServingContext, request: DetokenizeRequest
) -> DetokenizeResponse | ErrorResponse:
    error = ctx.check_model(request.model) or ctx.check_token_ids(request.tokens, "tokens")
    if error is not None:
        return error
    return DetokenizeResponse(prompt=ctx.tokenizer.decode(request.tokens))
