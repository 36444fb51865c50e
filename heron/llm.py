"""The offline API: ``LLM(model).generate(prompts, params)``, ``.chat(conversations, params)``
``.embed(prompts)`` and ``.score(text_1, text_2)``.

Runs the same EngineCore as the server, in process (no HTTP, no ZMQ), and the same output
processor (``heron.output_processor``): same request, same choices.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from tqdm.auto import tqdm

from heron.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    gguf_memory_for,
    parse_size,
)
from heron.engine.core import EngineCore
from heron.engine.messages import EngineRequest, TokenLogprobs
from heron.engine.request import Logprob, LogprobsDict
from heron.heap import keep_step_buffers, release_free_heap
from heron.lora import LoRARequest
from heron.output_processor import ChoiceDelta, OutputProcessor, Prompt, RequestState
from heron.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from heron.pooling_params import PoolingParams
from heron.sampling_params import SamplingParams
from heron.scoring import check_scorable, cosine, pair_texts, score_of
from heron.tokenizer import load_tokenizer
from heron.tokenizer.tokenizer import Tokenizer

if TYPE_CHECKING:
    from heron.llm_dp import DataParallelEngine

PromptType = str | dict[str, Any]
LoRAArg = LoRARequest | Sequence[LoRARequest | None] | None
Conversation = list[dict[str, Any]]


class LLM:
    """An engine plus a tokenizer, driven synchronously. Keyword arguments mirror the CLI flags.

    ``LLM()`` serves the embedded default model (Gemma 3 270M); ``LLM("/path/to/hf_dir")`` or
    ``LLM("/path/to/model.gguf")`` a local model. ``data_parallel_size=N`` spreads ``generate``
    over N engine cores in their own processes (``data_parallel_backend="ray"``: Ray actors),
    routed as the server routes; ``close()`` stops them. ``enable_lora=True``: ``generate``
    and ``chat`` take ``lora_request`` (``heron.lora.LoRARequest``, one or one per prompt), at
    most ``max_loras`` adapters running at once, of rank up to ``max_lora_rank``.
    ``hf_overrides`` (vLLM's, as a dict or JSON): a causal LM served as a reranker
    (``heron.scoring.HFOverrides``).
    """

    def __init__(self, model: str | None = None, *, tokenizer: str | None = None,
                 dtype: str = "auto", device: str = "auto", max_model_len: int | None = None,
                 seed: int = 0, load_format: str = "auto", chat_template: str | None = None,
                 quantization: str = "auto", gguf_memory: str = "auto",
                 block_size: int = 16, kv_cache_memory: str | int | None = None,
                 gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True,
                 num_gpu_blocks_override: int | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, skip_tokenizer_init: bool = False,
                 data_parallel_size: int = 1, data_parallel_backend: str = "mp",
                 cpus_per_engine: int | None = None, ray_address: str = "auto",
                 router: str = "prefix", enable_lora: bool = False, max_loras: int = 1,
                 max_lora_rank: int = 16,
                 hf_overrides: dict[str, Any] | str | None = None) -> None:
        if isinstance(hf_overrides, dict):
            hf_overrides = json.dumps(hf_overrides)
        self.model_config = ModelConfig(
            model=model, tokenizer=tokenizer, dtype=dtype, device=device,
            max_model_len=max_model_len, seed=seed, load_format=load_format,
            chat_template=chat_template, quantization=quantization,
            gguf_memory=gguf_memory_for(gguf_memory, data_parallel_size),
            hf_overrides=hf_overrides)
        config = EngineConfig(
            model=self.model_config,
            cache=CacheConfig(block_size=block_size,
                              kv_cache_memory=None if kv_cache_memory is None else parse_size(kv_cache_memory),
                              gpu_memory_utilization=gpu_memory_utilization,
                              enable_prefix_caching=enable_prefix_caching,
                              num_gpu_blocks_override=num_gpu_blocks_override),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens),
            lora=LoRAConfig(enable_lora=enable_lora, max_loras=max_loras,
                            max_lora_rank=max_lora_rank))
        parallel = ParallelConfig(data_parallel_size=data_parallel_size,
                                  backend=data_parallel_backend, cpus_per_engine=cpus_per_engine,
                                  ray_address=ray_address, router=router)
        self._setup(config, parallel, skip_tokenizer_init)

    @classmethod
    def from_engine_config(cls, config: EngineConfig, skip_tokenizer_init: bool = False) -> LLM:
        """An LLM (one engine, in this process) for a ready EngineConfig: what ``heron chat``
        builds from its flags."""
        llm = cls.__new__(cls)
        llm.model_config = config.model
        llm._setup(config, ParallelConfig(), skip_tokenizer_init)
        return llm

    def _setup(self, config: EngineConfig, parallel: ParallelConfig,
               skip_tokenizer_init: bool) -> None:
        # skip_tokenizer_init: token ids in, token ids out (no text), as in vLLM.
        self.tokenizer: Tokenizer | None = None if skip_tokenizer_init else load_tokenizer(config.model)
        self.engine = _make_engine(config, parallel)
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        release_free_heap()  # what loading freed (see heron.heap)
        keep_step_buffers()  # the steps' large buffers reused, not mapped anew

    def close(self) -> None:
        """Stop the engine processes of a data-parallel LLM (nothing to do for one engine)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def get_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this LLM was built with skip_tokenizer_init=True: it has no tokenizer")
        return self.tokenizer

    # ---- public API -----------------------------------------------------------------------

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRAArg = None) -> list[RequestOutput]:
        """Complete each prompt: a string, or ``{"prompt_token_ids": [...]}`` (vLLM's TokensPrompt);
        with ``lora_request``'s adapter (one for all, or one per prompt; None: the base model)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        encoded = [self._encode(p) for p in prompts]
        return self._run(encoded, _per_prompt(sampling_params, len(encoded)), use_tqdm,
                         _loras_per_prompt(lora_request, len(encoded)))

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None,
             lora_request: LoRAArg = None) -> list[RequestOutput]:
        """Answer one conversation (a list of messages) or a list of conversations (with
        ``lora_request`` as in ``generate``)."""
        one = bool(messages) and isinstance(messages[0], dict)
        conversations = cast(list[Conversation], [messages] if one else list(messages))
        encoded: list[tuple[str | None, list[int]]] = [
            self._chat_prompt(conv, add_generation_prompt=add_generation_prompt,
                              continue_final_message=continue_final_message, tools=tools,
                              **(chat_template_kwargs or {}))
            for conv in conversations]
        return self._run(encoded, _per_prompt(sampling_params, len(encoded)), use_tqdm,
                         _loras_per_prompt(lora_request, len(encoded)))

    def stream_chat(self, messages: Conversation, sampling_params: SamplingParams | None = None,
                    **template_kwargs: Any) -> Iterator[CompletionOutput]:
        """Answer one conversation step by step: one CompletionOutput per engine step with the
        text and token ids that step added (often none); the last one has the finish reason.
        Closing the iterator before the end (``break``, ``close()``) aborts the request."""
        params = (sampling_params or SamplingParams()).clone()
        if params.n != 1:
            raise ValueError(f"stream_chat answers with one sequence, got n={params.n}")
        text, ids = self._chat_prompt(messages, **template_kwargs)
        state = self._add(text, ids, params)
        try:
            while not state.finished:
                yield _step_output(state, [d for s, d in self._step() if s is state])
        finally:
            self._release([state])

    def embed(self, prompts: PromptType | Sequence[PromptType],
              pooling_params: PoolingParams | None = None,
              use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """One vector per prompt: the model's final hidden states pooled (``PoolingParams``:
        the mean, L2-normalised, by default), in the same engine steps and with the same bits
        as ``/v1/embeddings``. Prompts as for ``generate``."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = pooling_params or PoolingParams()
        encoded = [self._encode(p)[1] for p in prompts]
        vectors = self._pool(encoded, params, "Embedded prompts", use_tqdm)
        return [EmbeddingRequestOutput(
            request_id=f"embed-{next(self._ids)}", prompt_token_ids=ids,
            outputs=EmbeddingOutput(v.tolist())) for ids, v in zip(encoded, vectors)]

    def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str],
              use_tqdm: bool = True) -> list[ScoringRequestOutput]:
        """One score per pair (``heron.scoring.pair_texts``: one text against each of the
        others, or two lists zipped), as ``/v1/score`` computes it: a cross-encoder's
        classifier score of the pair, else the cosine similarity of the two embeddings."""
        pairs = pair_texts(text_1 if isinstance(text_1, str) else list(text_1),
                           text_2 if isinstance(text_2, str) else list(text_2))
        num_labels = self.engine.info.num_labels
        check_scorable(num_labels)
        tokenizer = self.get_tokenizer()
        if num_labels:
            encoded = [tokenizer.encode_pair(a, b) for a, b in pairs]
            logits = self._pool(encoded, PoolingParams.classifier(), "Scored pairs", use_tqdm)
            scores = [score_of(v.tolist()) for v in logits]
        else:
            texts = sorted({t for pair in pairs for t in pair})
            vectors = self._pool([tokenizer.encode(t) for t in texts], PoolingParams(),
                                 "Embedded texts", use_tqdm)
            by_text = dict(zip(texts, vectors))
            scores = [cosine(by_text[a].tolist(), by_text[b].tolist()) for a, b in pairs]
            encoded = [[] for _ in pairs]
        return [ScoringRequestOutput(request_id=f"score-{next(self._ids)}",
                                     prompt_token_ids=ids, outputs=ScoringOutput(score))
                for ids, score in zip(encoded, scores)]

    def _pool(self, encoded: list[list[int]], params: PoolingParams, desc: str,
              use_tqdm: bool) -> list[np.ndarray]:
        """One pooling request per prompt, all in the engine at once: their vectors in order."""
        requests = [EngineRequest(request_id=f"pool-{next(self._ids)}", prompt_token_ids=ids,
                                  pooling_params=params) for ids in encoded]
        vectors: dict[str, bytes] = {}
        try:
            for request in requests:
                self.engine.add_request(request)
            with tqdm(total=len(requests), desc=desc, disable=not use_tqdm) as bar:
                while len(vectors) < len(requests) and self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.embedding is not None:
                            vectors[out.request_id] = out.embedding
                            bar.update(1)
        finally:
            unfinished = [r.request_id for r in requests if r.request_id not in vectors]
            if unfinished:
                self.engine.abort_requests(unfinished)
        return [np.frombuffer(vectors[r.request_id], dtype="<f4") for r in requests]

    # ---- the loop -------------------------------------------------------------------------

    def _chat_prompt(self, conversation: Conversation, add_generation_prompt: bool = True,
                     **template_kwargs: Any) -> tuple[str, list[int]]:
        tokenizer = self.get_tokenizer()
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return text, tokenizer.encode(text, add_special_tokens=False)

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        if isinstance(prompt, dict) and "prompt" in prompt:
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return prompt, self.get_tokenizer().encode(prompt)
        raise ValueError(f"a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', "
                         f"got {type(prompt).__name__}")

    def _run(self, encoded: list[tuple[str | None, list[int]]], params: list[SamplingParams],
             use_tqdm: bool, loras: list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        states: list[RequestState] = []
        loras = loras or [None] * len(encoded)
        try:
            for (text, ids), p, lora in zip(encoded, params, loras):
                states.append(self._add(text or "", ids, p, lora))
            self._drive(states, use_tqdm)
        finally:
            self._release(states)
        return [self._result(state, text) for state, (text, _) in zip(states, encoded)]

    def _add(self, text: str, ids: list[int], params: SamplingParams,
             lora: LoRARequest | None = None) -> RequestState:
        """Register a request with the output processor and its n sequences with the engine."""
        state = self.processor.add_request(str(next(self._ids)), [Prompt(ids, text)], params,
                                           lora_request=lora)
        try:
            for request in state.requests:
                self.engine.add_request(request)
        except BaseException:
            self._release([state])
            raise
        return state

    def _drive(self, states: list[RequestState], use_tqdm: bool) -> None:
        """Step the engine until every request finished."""
        with tqdm(total=len(states), desc="Processed prompts", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for state, delta in self._step():
                    if delta.finished and state.finished:
                        bar.update(1)

    def _step(self) -> list[tuple[RequestState, ChoiceDelta]]:
        """One engine step through the output processor; sequences a stop string ended are
        aborted in the engine."""
        outputs = self.engine.step()
        for rejected in self.engine.pop_rejected():
            raise ValueError(rejected.message)  # a grammar that failed to compile
        processed = self.processor.process_outputs(outputs)
        if processed.to_abort:
            self.engine.abort_requests(processed.to_abort)
        return processed.deltas

    def _release(self, states: list[RequestState]) -> None:
        """Abort what still runs (an error, or an interrupt) and forget the requests."""
        unfinished = [sid for state in states for sid in state.unfinished_ids()]
        if unfinished:
            self.engine.abort_requests(unfinished)
        self.processor.remove(states)

    def _logprobs(self, entry: TokenLogprobs) -> LogprobsDict:
        words = (self.tokenizer.token_strings(entry.token_ids) if self.tokenizer
                 else [None] * len(entry.token_ids))
        return {t: Logprob(lp, rank, word)
                for t, lp, rank, word in zip(entry.token_ids, entry.logprobs, entry.ranks, words)}

    def _result(self, state: RequestState, prompt: str | None) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=c.index, text=c.text, token_ids=c.token_ids,
                cumulative_logprob=c.cumulative_logprob,
                logprobs=[self._logprobs(e) for e in c.logprobs] if c.logprobs else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for c in state.choices.values()]
        entries = state.prompt_logprobs.get(0)
        prompt_logprobs = None if entries is None else [
            None if e is None else self._logprobs(e) for e in entries]
        return RequestOutput(
            request_id=state.request_id, prompt=prompt,
            prompt_token_ids=state.prompts[0].token_ids, prompt_logprobs=prompt_logprobs,
            outputs=outputs, finished=state.finished,
            num_cached_tokens=max(c.num_cached_tokens for c in state.choices.values()))


def _make_engine(config: EngineConfig, parallel: ParallelConfig) -> EngineCore | DataParallelEngine:
    """One EngineCore in this process, or N engine cores in their own (heron.llm_dp)."""
    if parallel.data_parallel_size == 1 and parallel.backend == "mp":
        return EngineCore(config)
    from heron.llm_dp import DataParallelEngine

    return DataParallelEngine(config, parallel)


def _step_output(state: RequestState, deltas: list[ChoiceDelta]) -> CompletionOutput:
    """What one engine step added to the one choice of ``state`` (``stream_chat``)."""
    choice = state.choice(0)
    return CompletionOutput(index=0, text="".join(d.text for d in deltas),
                            token_ids=[t for d in deltas for t in d.token_ids],
                            cumulative_logprob=choice.cumulative_logprob, logprobs=None,
                            finish_reason=choice.finish_reason, stop_reason=choice.stop_reason)


def _loras_per_prompt(lora: LoRAArg, count: int) -> list[LoRARequest | None]:
    if lora is None or isinstance(lora, LoRARequest):
        return [lora] * count
    if len(lora) != count:
        raise ValueError(f"got {len(lora)} LoRA requests for {count} prompts")
    return list(lora)


def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params.clone() for _ in range(count)]
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return [p.clone() for p in params]
