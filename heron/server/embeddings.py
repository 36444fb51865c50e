"""POST /v1/embeddings: the served model's own vectors, from the same engine that generates.

Each input becomes one pooling request (``PoolingParams``, the server's ``--pooling``): the
engine computes its prompt like a prefill in the shared batches, pools the final hidden states
and frees its blocks. ``dimensions`` cuts the unit vector and renormalises it here.
"""

from __future__ import annotations

import time

import numpy as np

from heron.engine.client import new_request_id
from heron.engine.messages import EngineRequest
from heron.lora import LoRARequest
from heron.output_processor import Prompt
from heron.pooling_params import PoolingParams
from heron.server.offload import offload
from heron.server.pipeline import RequestError, tokenize
from heron.server.protocol import ErrorResponse, bad_request
from heron.server.protocol_embeddings import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    encode_vector,
)
from heron.server.serving import ServingContext, engine_error, value_error


async def serve_embeddings(ctx: ServingContext, request: EmbeddingRequest) -> (
        EmbeddingResponse | ErrorResponse):
    """Validate, embed every input, answer with the vectors in input order."""
    error = ctx.check_model(request.model) or ctx.check_fields(request)
    if error is not None:
        return error
    try:
        source = await offload(request.to_input)
        request.check_dimensions(ctx.info.hidden_size)
        prompts = await tokenize(ctx, source)
    except RequestError as e:
        return e.error
    except ValueError as e:
        return value_error(e, request)
    for i, prompt in enumerate(prompts):
        error = _check_length(ctx, len(prompt.token_ids), "input" if len(prompts) == 1
                              else f"input[{i}]")
        if error is not None:
            return error
    try:
        vectors = await embed(ctx, prompts, PoolingParams(ctx.config.pooling),
                              ctx.lora_for(request.model))
    except Exception as e:  # noqa: BLE001 - engine errors become error values
        return engine_error(e)
    data = [EmbeddingData(index=i, embedding=encode_vector(v, request.dimensions,
                                                            request.encoding_format))
            for i, v in enumerate(vectors)]
    num_tokens = sum(len(p.token_ids) for p in prompts)
    return EmbeddingResponse(data=data, model=request.model or ctx.default_model,
                             usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))


async def embed(ctx: ServingContext, prompts: list[Prompt], params: PoolingParams,
                lora: LoRARequest | None = None) -> list[np.ndarray]:
    """One pooling request per prompt (with ``lora``'s adapter), all submitted together; the
    vectors in prompt order. Leaving early (a disconnect) aborts the ones still running."""
    request_id = new_request_id("embd")
    arrival = time.monotonic()
    requests = [EngineRequest(request_id=f"{request_id}-{i}", prompt_token_ids=p.token_ids,
                              pooling_params=params, arrival_time=arrival, group=request_id,
                              lora_request=lora)
                for i, p in enumerate(prompts)]
    index = {r.request_id: i for i, r in enumerate(requests)}
    vectors: list[np.ndarray | None] = [None] * len(requests)
    async with ctx.engine.stream(requests) as stream:
        async for out in stream:
            if out.embedding is None:
                continue
            i = index[out.request_id]
            vectors[i] = np.frombuffer(out.embedding, dtype="<f4")
            ctx.metrics.observe_finished("stop", time.monotonic() - arrival,
                                         len(prompts[i].token_ids), 0)
    missing = [r.request_id for r, v in zip(requests, vectors) if v is None]
    if missing:
        raise RuntimeError(f"the engine finished {missing[0]} without a vector")
    return vectors  # type: ignore[return-value]


def _check_length(ctx: ServingContext, num_tokens: int, where: str) -> ErrorResponse | None:
    limit = ctx.info.max_model_len
    if num_tokens <= limit:
        return None
    return bad_request(f"This model's maximum context length is {limit} tokens. However, "
                       f"{where} has {num_tokens} tokens. Please reduce the length of the input.",
                       param="input", code="context_length_exceeded")
