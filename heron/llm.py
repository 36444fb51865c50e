"""The offline API: ``LLM(model).generate(prompts, params)`` and ``.chat(conversations, params)``.

Runs the same EngineCore as the server, in process: no HTTP, no ZMQ.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from tqdm.auto import tqdm

from heron.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    parse_size,
)
from heron.engine.core import EngineCore
from heron.engine.messages import EngineOutput, EngineRequest, TokenLogprobs
from heron.engine.request import Logprob, LogprobsDict
from heron.outputs import CompletionOutput, RequestOutput
from heron.sampling_params import SamplingParams
from heron.tokenizer import load_tokenizer
from heron.tokenizer.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from heron.llm_dp import DataParallelEngine

PromptType = str | dict[str, Any]
Conversation = list[dict[str, Any]]


@dataclass
class _Sequence:
    """One of a request's n sequences while it generates."""

    index: int
    detokenizer: IncrementalDetokenizer | None
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobsDict] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Pending:
    """A request of the current call: its prompt and its sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[_Sequence]
    prompt_logprobs: list[LogprobsDict | None] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


class LLM:
    """An engine plus a tokenizer, driven synchronously. Keyword arguments mirror the CLI flags.

    ``LLM()`` serves the embedded default model (Gemma 3 270M); ``LLM("/path/to/hf_dir")`` or
    ``LLM("/path/to/model.gguf")`` a local model. ``data_parallel_size=N`` spreads ``generate``
    over N engine cores in their own processes (``data_parallel_backend="ray"``: Ray actors),
    routed as the server routes; ``close()`` stops them.
    """

    def __init__(self, model: str | None = None, *, tokenizer: str | None = None,
                 dtype: str = "auto", device: str = "auto", max_model_len: int | None = None,
                 seed: int = 0, load_format: str = "auto", chat_template: str | None = None,
                 quantization: str = "auto",
                 block_size: int = 16, kv_cache_memory: str | int = "2GiB",
                 gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True,
                 num_gpu_blocks_override: int | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, skip_tokenizer_init: bool = False,
                 data_parallel_size: int = 1, data_parallel_backend: str = "mp",
                 cpus_per_engine: int | None = None, ray_address: str = "auto",
                 router: str = "prefix") -> None:
        self.model_config = ModelConfig(
            model=model, tokenizer=tokenizer, dtype=dtype, device=device,
            max_model_len=max_model_len, seed=seed, load_format=load_format,
            chat_template=chat_template, quantization=quantization)
        config = EngineConfig(
            model=self.model_config,
            cache=CacheConfig(block_size=block_size, kv_cache_memory=parse_size(kv_cache_memory),
                              gpu_memory_utilization=gpu_memory_utilization,
                              enable_prefix_caching=enable_prefix_caching,
                              num_gpu_blocks_override=num_gpu_blocks_override),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens))
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
        self._ids = itertools.count()

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
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete each prompt: a string, or ``{"prompt_token_ids": [...]}`` (vLLM's TokensPrompt)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        encoded = [self._encode(p) for p in prompts]
        return self._run(encoded, _per_prompt(sampling_params, len(encoded)), use_tqdm)

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of messages) or a list of conversations."""
        one = bool(messages) and isinstance(messages[0], dict)
        conversations = cast(list[Conversation], [messages] if one else list(messages))
        encoded: list[tuple[str | None, list[int]]] = [
            self._chat_prompt(conv, add_generation_prompt=add_generation_prompt,
                              continue_final_message=continue_final_message, tools=tools,
                              **(chat_template_kwargs or {}))
            for conv in conversations]
        return self._run(encoded, _per_prompt(sampling_params, len(encoded)), use_tqdm)

    def stream_chat(self, messages: Conversation, sampling_params: SamplingParams | None = None,
                    **template_kwargs: Any) -> Iterator[CompletionOutput]:
        """Answer one conversation step by step: one CompletionOutput per engine step with the
        text and token ids that step added (often none); the last one has the finish reason.
        Closing the iterator before the end (``break``, ``close()``) aborts the request."""
        params = (sampling_params or SamplingParams()).clone()
        if params.n != 1:
            raise ValueError(f"stream_chat answers with one sequence, got n={params.n}")
        text, ids = self._chat_prompt(messages, **template_kwargs)
        req = self._add(text, ids, params)
        seq = req.sequences[0]
        seq_id = f"{req.request_id}-0"
        try:
            while not req.finished:
                before = len(seq.token_ids)
                for out in self._step():
                    if out.request_id == seq_id:
                        self._apply(out, req, seq)
                yield self._delta(seq, before)
        finally:
            if not req.finished:
                self.engine.abort_requests([seq_id])

    # ---- the loop -------------------------------------------------------------------------

    def _chat_prompt(self, conversation: Conversation, add_generation_prompt: bool = True,
                     **template_kwargs: Any) -> tuple[str, list[int]]:
        tokenizer = self.get_tokenizer()
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return text, tokenizer.encode(text, add_special_tokens=False)

    def _step(self) -> list[EngineOutput]:
        outputs = self.engine.step()
        for rejected in self.engine.pop_rejected():
            raise ValueError(rejected.message)  # a grammar that failed to compile
        return outputs

    @staticmethod
    def _delta(seq: _Sequence, before: int) -> CompletionOutput:
        """What the last step added to ``seq`` (all remaining text once it finished)."""
        detok = seq.detokenizer
        text = "" if detok is None else detok.flush() if seq.finish_reason else detok.get_delta()
        return CompletionOutput(index=seq.index, text=text, token_ids=seq.token_ids[before:],
                                cumulative_logprob=seq.cumulative_logprob, logprobs=None,
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)

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
             use_tqdm: bool) -> list[RequestOutput]:
        pending = [self._add(text, ids, p) for (text, ids), p in zip(encoded, params)]
        by_seq = {f"{r.request_id}-{s.index}": (r, s) for r in pending for s in r.sequences}
        bar = tqdm(total=len(pending), desc="Processed prompts", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for out in self._step():
                    req, seq = by_seq[out.request_id]
                    was_done = req.finished
                    self._apply(out, req, seq)
                    if req.finished and not was_done:
                        bar.update(1)
        finally:
            bar.close()
            unfinished = [sid for sid, (_, s) in by_seq.items() if s.finish_reason is None]
            if unfinished:
                self.engine.abort_requests(unfinished)
        return [self._result(r) for r in pending]

    def _add(self, text: str | None, ids: list[int], params: SamplingParams) -> _Pending:
        request_id = str(next(self._ids))
        sequences = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            child = params.clone(n=1, seed=seed)
            detok = None if self.tokenizer is None else IncrementalDetokenizer(self.tokenizer, ids, child)
            sequences.append(_Sequence(i, detok, child))
        pending = _Pending(request_id, text, ids, sequences)
        added = []
        try:
            for seq in sequences:
                seq_id = f"{request_id}-{seq.index}"
                self.engine.add_request(EngineRequest(request_id=seq_id, prompt_token_ids=ids,
                                                      sampling_params=seq.params))
                added.append(seq_id)
        except ValueError:
            self.engine.abort_requests(added)
            raise
        return pending

    def _apply(self, out: EngineOutput, req: _Pending, seq: _Sequence) -> None:
        seq.token_ids.extend(out.new_token_ids)
        req.num_cached_tokens = max(req.num_cached_tokens, out.num_cached_tokens)
        if out.prompt_logprobs is not None and req.prompt_logprobs is None:
            req.prompt_logprobs = [None if t is None else self._logprobs(t) for t in out.prompt_logprobs]
        if out.new_logprobs:
            seq.logprobs = seq.logprobs or []
            for entry in out.new_logprobs:
                seq.logprobs.append(self._logprobs(entry))
                seq.cumulative_logprob = (seq.cumulative_logprob or 0.0) + entry.logprobs[0]
        stop = seq.detokenizer.update(out.new_token_ids) if seq.detokenizer else None
        if stop is not None and out.finish_reason is None:
            self.engine.abort_requests([out.request_id])
            seq.finish_reason, seq.stop_reason = "stop", stop
        elif stop is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop
        elif out.finish_reason is not None:
            seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason

    def _logprobs(self, entry: TokenLogprobs) -> LogprobsDict:
        words = (self.tokenizer.token_strings(entry.token_ids) if self.tokenizer
                 else [None] * len(entry.token_ids))
        return {t: Logprob(lp, rank, word)
                for t, lp, rank, word in zip(entry.token_ids, entry.logprobs, entry.ranks, words)}

    @staticmethod
    def _result(req: _Pending) -> RequestOutput:
        outputs = []
        for seq in req.sequences:
            text = ""
            if seq.detokenizer is not None:
                seq.detokenizer.flush()
                text = seq.detokenizer.output_text
            outputs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=seq.token_ids,
                cumulative_logprob=seq.cumulative_logprob, logprobs=seq.logprobs,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(request_id=req.request_id, prompt=req.prompt,
                             prompt_token_ids=req.prompt_token_ids, prompt_logprobs=req.prompt_logprobs,
                             outputs=outputs, finished=req.finished,
                             num_cached_tokens=req.num_cached_tokens)


def _make_engine(config: EngineConfig, parallel: ParallelConfig) -> EngineCore | DataParallelEngine:
    """One EngineCore in this process, or N engine cores in their own (heron.llm_dp)."""
    if parallel.data_parallel_size == 1 and parallel.backend == "mp":
        return EngineCore(config)
    from heron.llm_dp import DataParallelEngine

    return DataParallelEngine(config, parallel)


def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params.clone() for _ in range(count)]
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return [p.clone() for p in params]
