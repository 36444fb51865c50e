"""POST /v1/score and /v1/rerank: two texts scored against each other (``heron.scoring``).

A cross-encoder (the engine reports ``num_labels``) reads each pair as one input, joined as the
tokenizer pairs them, and answers with its classifier logits (``PoolingParams.classifier``);
any other model embeds each distinct text once (``--pooling``) and a pair's score is the cosine
of its two vectors. Either way the requests go to the engine together, through ``embed``;
tokenization runs on the heavy lane for a large body (``offload``). ``usage`` counts the
tokens the model read.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from heron.engine.client import new_request_id
from heron.lora import LoRARequest
from heron.output_processor import Prompt
from heron.pooling_params import PoolingParams
from heron.scoring import check_scorable, cosine, score_of
from heron.server.embeddings import embed
from heron.server.offload import offload
from heron.server.protocol import ErrorResponse, bad_request
from heron.server.protocol_embeddings import EmbeddingUsage
from heron.server.protocol_score import (
    DocumentText,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankResultWithDocument,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
)
from heron.server.serving import ServingContext, engine_error, value_error

Where = Callable[[int, int], str]  # (pair index, side 0 or 1) -> how errors name the text


class _TooLong(Exception):
    def __init__(self, error: ErrorResponse) -> None:
        self.error = error


async def serve_score(ctx: ServingContext, request: ScoreRequest) -> ScoreResponse | ErrorResponse:
    """Validate, score every pair, answer with the scores in pair order."""
    error = ctx.check_model(request.model) or ctx.check_fields(request)
    if error is not None:
        return error
    try:
        pairs = request.to_pairs()
    except ValueError as e:
        return value_error(e, request)
    sides = (request.text_1, request.text_2)

    def where(i: int, side: int) -> str:
        name = f"text_{side + 1}"
        return f"{name}[{i if len(sides[side]) > 1 else 0}]" if isinstance(sides[side], list) \
            else name

    result = await score_pairs(ctx, pairs, ctx.lora_for(request.model), where)
    if isinstance(result, ErrorResponse):
        return result
    scores, num_tokens = result
    return ScoreResponse(
        id=new_request_id("score"), created=int(time.time()),
        model=request.model or ctx.default_model,
        data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
        usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))


async def serve_rerank(ctx: ServingContext,
                       request: RerankRequest) -> RerankResponse | ErrorResponse:
    """Score each document against the query; the ``top_n`` best, best first."""
    error = ctx.check_model(request.model) or ctx.check_fields(request)
    if error is not None:
        return error
    try:
        documents = request.texts()
    except ValueError as e:
        return value_error(e, request)
    result = await score_pairs(ctx, [(request.query, d) for d in documents],
                               ctx.lora_for(request.model),
                               lambda i, side: f"documents[{i}]" if side else "query")
    if isinstance(result, ErrorResponse):
        return result
    scores, num_tokens = result
    order = sorted(range(len(documents)), key=lambda i: -scores[i])[:request.top_n]
    results = [RerankResultWithDocument(index=i, relevance_score=scores[i],
                                        document=DocumentText(text=documents[i]))
               if request.return_documents else RerankResult(index=i, relevance_score=scores[i])
               for i in order]
    return RerankResponse(id=new_request_id("rerank"), model=request.model or ctx.default_model,
                          usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens),
                          results=results)


async def score_pairs(ctx: ServingContext, pairs: list[tuple[str, str]],
                      lora: LoRARequest | None,
                      where: Where) -> tuple[list[float], int] | ErrorResponse:
    """Each pair's score and the tokens read, or the error (a 400 for a model that cannot
    score or an input past the context, the engine's error)."""
    try:
        check_scorable(ctx.info.num_labels)
        if ctx.info.num_labels:
            return await _cross_encode(ctx, pairs, lora, where)
        return await _cosines(ctx, pairs, lora, where)
    except _TooLong as e:
        return e.error
    except ValueError as e:
        return value_error(e)
    except Exception as e:  # noqa: BLE001 - engine errors become error values
        return engine_error(e)


async def _cross_encode(ctx: ServingContext, pairs: list[tuple[str, str]],
                        lora: LoRARequest | None, where: Where) -> tuple[list[float], int]:
    prompts = await offload(lambda: [Prompt(ctx.tokenizer.encode_pair(a, b), "")
                                     for a, b in pairs])
    for i, prompt in enumerate(prompts):
        _check_length(ctx, len(prompt.token_ids), f"the pair of {where(i, 1)}", where(i, 1))
    logits = await embed(ctx, prompts, PoolingParams.classifier(), lora)
    return [score_of(v.tolist()) for v in logits], sum(len(p.token_ids) for p in prompts)


async def _cosines(ctx: ServingContext, pairs: list[tuple[str, str]],
                   lora: LoRARequest | None, where: Where) -> tuple[list[float], int]:
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))  # each distinct text once
    prompts = await offload(lambda: [Prompt(ctx.tokenizer.encode(t), t) for t in texts])
    lengths = {t: len(p.token_ids) for t, p in zip(texts, prompts)}
    for i, pair in enumerate(pairs):
        for side, text in enumerate(pair):
            _check_length(ctx, lengths[text], where(i, side), where(i, side))
    vectors = await embed(ctx, prompts, PoolingParams(ctx.config.pooling), lora)
    by_text = {t: v.tolist() for t, v in zip(texts, vectors)}
    return [cosine(by_text[a], by_text[b]) for a, b in pairs], sum(lengths.values())


def _check_length(ctx: ServingContext, num_tokens: int, what: str, param: str) -> None:
    limit = ctx.info.max_model_len
    if num_tokens > limit:
        raise _TooLong(bad_request(
            f"This model's maximum context length is {limit} tokens. However, {what} has "
            f"{num_tokens} tokens. Please reduce the length of the input.",
            param=param.split("[")[0], code="context_length_exceeded"))
