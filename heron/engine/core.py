"""EngineCore: the engine's busy loop body. ``step()`` = schedule -> run -> update.

Token ids in, token ids out: no text, no JSON. The offline ``LLM`` drives it in
process; the server drives it in its own process through ``engine/client.py``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from heron.config import EngineConfig, ModelConfig
from heron.engine.cgroups import cpu_quota, quota_threads
from heron.engine.lora import LoRAManager
from heron.engine.memory import kv_budget, memory_report, weight_bytes
from heron.engine.messages import (
    EngineInfo,
    EngineOutput,
    EngineRequest,
    EngineStats,
    RequestRejected,
    TokenLogprobs,
)
from heron.engine.request import LogprobsDict, Request, RequestStatus
from heron.engine.runner import ModelRunner, prompt_logprobs_chunk
from heron.engine.scheduler import Scheduler
from heron.engine.structured import StructuredOutputManager
from heron.layers.rotary import yarn_context_length
from heron.loader.gguf import rank_head
from heron.loader.gguf_arch import RANK_POOLING
from heron.loader.gguf_file import GGUFFile
from heron.loader.prepared import load_prepared_model
from heron.models.base import CausalLM
from heron.models.score_head import file_rank_head, two_token_head
from heron.scoring import HFOverrides
from heron.tokenizer import load_tokenizer
from heron.tokenizer.load import tokenizer_json_path

logger = logging.getLogger(__name__)


class EngineCore:
    """Loads the model, sizes the KV cache, and steps the scheduler and runner."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.model.device)
        if self.device.type == "cpu":
            fit_threads_to_cpu_quota()
        self.quantization = resolve_quantization(config.model, self.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device,
                                   torch_int4=_runs_torch_int4(self.quantization, self.device),
                                   heron_gguf=_runs_heron_gguf(self.quantization, self.device))
        torch.manual_seed(config.model.seed)
        start = time.monotonic()
        loaded, _ = load_prepared_model(config.model, self.device, self.dtype, self.quantization)
        self.model = loaded.model
        self.hf_config = loaded.hf_config
        _attach_score_head(self.model, self.hf_config, config.model)
        self.eos_token_ids = _eos_token_ids(loaded.hf_config, loaded.generation_config)
        num_blocks, kv_reason = self._num_kv_blocks()
        block_size = config.cache.block_size
        self.max_model_len = self._max_model_len(num_blocks * block_size)
        # LoRA: adapters beside the projections; --lora-modules are read (and checked) here.
        self.lora = (LoRAManager(self.model, config.lora, self.device)
                     if config.lora.enable_lora else None)
        self._lora_users: dict[str, int] = {}  # request id -> the lora_int_id it holds
        self.runner = ModelRunner(self.model, self.device, self.dtype, num_blocks, block_size,
                                  seed=config.model.seed, lora=self.lora)
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, self.max_model_len,
                                   prompt_logprobs_chunk=prompt_logprobs_chunk(_vocab_size(self.hf_config)),
                                   max_loras=config.lora.max_loras if self.lora else None)
        self.info = EngineInfo(
            max_model_len=self.max_model_len, vocab_size=_vocab_size(self.hf_config),
            num_kv_blocks=num_blocks, block_size=block_size, device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."), eos_token_ids=sorted(self.eos_token_ids),
            hidden_size=int(_text_config(self.hf_config).hidden_size),
            num_labels=self.model.num_labels)
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        # Structured outputs: constrained requests wait here while their grammar compiles.
        self.structured = StructuredOutputManager(
            lambda: load_tokenizer(config.model).hf, self.info.vocab_size, self.eos_token_ids,
            tokenizer_json=lambda: tokenizer_json_path(config.model))
        self._rejected: list[RequestRejected] = []
        logger.info("engine ready in %.1f s: %s on %s%s, weights %s, KV cache %d blocks of %d",
                    time.monotonic() - start, self.info.dtype, self.device,
                    _threads_label() if self.device.type == "cpu" else "",
                    _weights_kind(self.model), num_blocks, block_size)
        per_block = ModelRunner.kv_bytes_per_block(self.model, block_size, self.dtype)
        logger.info(memory_report(weight_bytes(self.model), num_blocks * per_block,
                                  num_blocks * block_size, kv_reason, _model_file(config.model)))

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """Queue one sequence; raises ValueError if it cannot be served."""
        params = request.sampling_params
        prompt = request.prompt_token_ids
        pooling = request.pooling_params is not None
        self._check_task(request)
        self._validate_prompt(prompt, params.max_tokens, pooling)
        max_tokens = 0 if pooling else self.max_model_len - len(prompt)
        if params.max_tokens is not None and not pooling:
            max_tokens = min(max_tokens, params.max_tokens)
        params.all_stop_token_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            params.all_stop_token_ids |= self.eos_token_ids
        req = Request(request_id=request.request_id, prompt_token_ids=list(prompt),
                      sampling_params=params, max_tokens=max_tokens,
                      pooling_params=request.pooling_params,
                      group=request.group or request.request_id,
                      lora_request=request.lora_request)
        if request.arrival_time:
            req.arrival_time = request.arrival_time
        if req.request_id in self.scheduler.requests or req.request_id in self._lora_users:
            raise ValueError(f"request id {req.request_id!r} is already in the engine")
        self._acquire_lora(req)
        try:
            if self.structured.prepare(req):
                self.scheduler.add_request(req)
        except BaseException:
            self._release_lora([req.request_id])
            raise
        self._prompt_tokens_total += len(prompt)

    def _acquire_lora(self, req: Request) -> None:
        """Load the request's adapter (ValueError if it cannot be served) and hold it."""
        lora = req.lora_request
        if lora is None:
            return
        if self.lora is None:
            raise ValueError(f"LoRA adapter {lora.lora_name!r} was asked for, but LoRA is not "
                             "enabled (enable_lora=True, --enable-lora)")
        self.lora.acquire(lora)
        self._lora_users[req.request_id] = lora.lora_int_id

    def _release_lora(self, request_ids: Iterable[str]) -> None:
        """Requests that left the engine no longer hold their adapters."""
        if self.lora is None:
            return
        for request_id in request_ids:
            lora_int_id = self._lora_users.pop(request_id, None)
            if lora_int_id is not None:
                self.lora.release(lora_int_id)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        self.structured.abort(request_ids)
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        self._release_lora(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self.structured.num_pending > 0

    def pop_rejected(self) -> list[RequestRejected]:
        """Requests refused after ``add_request`` returned (their grammar failed to compile)."""
        rejected, self._rejected = self._rejected, []
        return rejected

    # ---- the loop body --------------------------------------------------------------------

    def step(self) -> list[EngineOutput]:
        """One engine iteration; returns an output for each request that got a token or finished."""
        if self.structured.num_pending:
            self._admit_compiled()
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        sampled, logprobs = self.runner.execute(sched)
        updated = self.scheduler.update_from_output(sched, sampled, logprobs)
        self._generation_tokens_total += len(sampled)
        self._release_lora(r.request_id for r in updated if r.is_finished)
        return [self._output(req, sampled) for req in updated]

    def stats(self) -> EngineStats:
        s = self.scheduler
        queries, hits = s.prefix_cache_stats()
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting + self.structured.num_pending,
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_queries=queries, prefix_cache_hits=hits, num_preemptions=s.num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total)

    # ---- helpers --------------------------------------------------------------------------

    def _admit_compiled(self) -> None:
        """Requests whose grammar is ready join the scheduler; those whose spec failed are rejected.
        With nothing else to run, wait briefly for a compile instead of spinning."""
        ready, failed = self.structured.collect(wait=not self.scheduler.has_unfinished_requests())
        for req in ready:
            self.scheduler.add_request(req)
        self._rejected += [RequestRejected(request_id=r.request_id, message=m) for r, m in failed]
        self._release_lora(r.request_id for r, _ in failed)

    def _output(self, req: Request, sampled: dict[str, int]) -> EngineOutput:
        got_token = req.request_id in sampled
        new_logprobs = None
        if got_token and req.sampling_params.logprobs is not None and req.output_logprobs:
            new_logprobs = [_to_token_logprobs(req.output_logprobs[-1])]
        prompt_logprobs = None
        if got_token and req.num_output_tokens == 1 and req.prompt_logprobs is not None:
            prompt_logprobs = [None if d is None else _to_token_logprobs(d) for d in req.prompt_logprobs]
        return EngineOutput(
            request_id=req.request_id,
            new_token_ids=[req.token_ids[-1]] if got_token else [],
            new_logprobs=new_logprobs, prompt_logprobs=prompt_logprobs,
            finish_reason=req.finish_reason, stop_reason=req.stop_reason,
            num_cached_tokens=max(req.num_cached_tokens, 0), embedding=_embedding(req))

    def _check_task(self, request: EngineRequest) -> None:
        """ValueError for what the model cannot do: generate (a sequence classifier) or
        classify (no classification head)."""
        pooling = request.pooling_params
        if pooling is None and not self.model.generates:
            raise ValueError("this model is a sequence classifier: it scores (/v1/score, "
                             "/v1/rerank) and embeds, it does not generate text")
        if pooling is not None and pooling.classify and self.model.num_labels == 0:
            raise ValueError("this model has no classification head to score with")

    def _validate_prompt(self, prompt: list[int], max_tokens: int | None, pooling: bool) -> None:
        if not prompt:
            raise ValueError("the prompt is empty: at least one token is needed")
        vocab = self.info.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is out of range for this model's vocabulary (0..{vocab - 1})")
        if pooling and len(prompt) > self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} "
                             f"tokens. However, the input has {len(prompt)} tokens. Please "
                             "reduce the length of the input.")
        if pooling:
            return
        wanted = len(prompt) + (max_tokens or 1)
        if wanted > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {wanted} tokens ({len(prompt)} in the prompt, {max_tokens or 1} for the "
                f"completion). Please reduce the length of the prompt or max_tokens.")

    def _num_kv_blocks(self) -> tuple[int, str]:
        """The pool's size in blocks, and why (see ``memory.kv_budget``)."""
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override, "num_gpu_blocks_override"
        per_block = ModelRunner.kv_bytes_per_block(self.model, cache.block_size, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget, reason = int(free * cache.gpu_memory_utilization), "gpu_memory_utilization"
        else:
            model_len = self.config.model.max_model_len or _model_max_len(self.hf_config)
            needed = self.config.scheduler.max_num_seqs * (model_len + cache.block_size)
            chosen = kv_budget(cache.kv_cache_memory, per_block // cache.block_size, needed)
            budget, reason = chosen.nbytes, chosen.reason
        num_blocks = budget // per_block
        if num_blocks < 2:
            raise ValueError(f"the KV cache budget ({budget} bytes) holds fewer than 2 blocks of "
                             f"{per_block} bytes; raise --kv-cache-memory")
        return num_blocks, reason

    def _max_model_len(self, cache_tokens: int) -> int:
        """The configured length, else the model's; never more than the KV cache can hold."""
        model_len = _model_max_len(self.hf_config)
        wanted = self.config.model.max_model_len or model_len
        if wanted > model_len:
            logger.warning("max_model_len %d exceeds the model's %d", wanted, model_len)
        if wanted > cache_tokens:
            logger.warning("max_model_len %d capped to the KV cache size (%d tokens)", wanted, cache_tokens)
            wanted = cache_tokens
        return wanted


def fit_threads_to_cpu_quota() -> None:
    """No more threads than the cgroup's CPU quota (a container's ``--cpus``), which PyTorch's
    default (the cores it may run on) ignores; ``OMP_NUM_THREADS`` is the user's word and stays."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    threads = torch.get_num_threads()
    fitted = quota_threads(threads)
    if fitted < threads:
        torch.set_num_threads(fitted)
        logger.info("threads: %d, the cgroup's CPU quota (%.2g CPUs); PyTorch would take %d",
                    fitted, cpu_quota(), threads)


def _threads_label() -> str:
    threads = torch.get_num_threads()
    return f" ({threads} thread{'s' if threads > 1 else ''})"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, torch_int4: bool = False,
                  heron_gguf: bool = False) -> torch.dtype:
    """auto: bfloat16 on CUDA and on CPUs where oneDNN takes bf16 (AVX-512 BW/VL/DQ, or Arm bf16):
    half the activation and KV-cache bytes, and heron's CPU kernels work in bf16 (with native
    AVX512-BF16 / AMX or emulated, see ``heron.kernels.cpu``). Measured on a CPU with
    native bf16: about 2x faster than float32 for the default model's bandwidth-bound decode
    (20.9 vs 9.8 tok/s, one request). Also bfloat16 where the projections run PyTorch's int4
    kernel (``torch_int4``), which is scalar code for float32 activations on x86 (2 against 20
    tok/s on an AVX2-only CPU), and where they are GGUF blocks in heron's kernels
    (``heron_gguf``): the one-call decode step and the small per-layer kernels are bf16-only,
    so float32 there would run the modules (the default model on the avx2 variant, oneDNN
    limited to AVX2: 28.7 ms a step in float32 against 17.5 in bf16). float32 elsewhere."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda" or _cpu_has_fast_bf16() or torch_int4 or heron_gguf:
        return torch.bfloat16
    return torch.float32


def _runs_heron_gguf(quantization: str, device: torch.device) -> bool:
    """Whether the projections will be GGUF blocks multiplied by heron's kernels."""
    from heron.kernels.cpu.isa import NONE, selected_variant

    return device.type == "cpu" and quantization == "gguf" and selected_variant() != NONE


def _runs_torch_int4(quantization: str, device: torch.device) -> bool:
    """Whether the projections will be ``PackedWeight``s (PyTorch's int4 kernel): int4, or an
    int8 copy (or GGUF blocks falling back to one) without heron's int8 kernel."""
    from heron.kernels.cpu.isa import NONE, selected_variant

    if device.type != "cpu":
        return False
    return quantization == "int4" or (quantization in ("int8", "gguf") and selected_variant() == NONE)


AUTO_QUANTIZATION = "gguf"


def resolve_quantization(model: ModelConfig, device: torch.device) -> str:
    """auto: a GGUF file's own blocks as the weights on CPU (``gguf``; re-quantized to int8
    where heron's kernels cannot read them); none for float checkpoints, whose users expect
    float numerics, and on CUDA (no kernels here)."""
    from_gguf = model.model is None or str(model.model).endswith(".gguf")
    if model.quantization != "auto":
        if model.quantization != "none" and device.type != "cpu":
            raise ValueError(f"--quantization {model.quantization} is implemented for CPU only")
        if model.quantization == "gguf" and not from_gguf:
            raise ValueError("--quantization gguf keeps a GGUF file's blocks: the model is not a "
                             ".gguf file")
        return model.quantization
    return AUTO_QUANTIZATION if from_gguf and device.type == "cpu" else "none"


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _weights_kind(model: torch.nn.Module) -> str:
    """How the projections hold their weights (the kinds of quantized weight), else float."""
    from heron.layers.gguf_weight import GGUFWeight

    kinds = set()
    for module in model.modules():
        q = getattr(module, "quantized", None)
        if isinstance(q, GGUFWeight):
            kinds.add(f"the GGUF file's blocks ({'exact float32' if q.exact else 'int8 activations'})")
        elif q is not None:
            kinds.add(type(q).__name__)
    return ", ".join(sorted(kinds)) or "float"


def _model_file(model: ModelConfig) -> Path | None:
    """The GGUF file the weights may be mapped from (for the resident-memory count)."""
    if model.model is None:
        from heron.loader.default_model import default_gguf_path

        return default_gguf_path()
    path = Path(model.model).expanduser()
    return path if path.is_file() else None


def _eos_token_ids(hf_config: object, generation_config: dict) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(hf_config, "eos_token_id", None), generation_config.get("eos_token_id")):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _text_config(hf_config: Any) -> Any:
    get = getattr(hf_config, "get_text_config", None)
    return get() if callable(get) else hf_config


def _vocab_size(hf_config: Any) -> int:
    return int(_text_config(hf_config).vocab_size)


def _model_max_len(hf_config: Any) -> int:
    """The model's context length: its config's, or longer where YaRN scaling extends it."""
    cfg = _text_config(hf_config)
    for name in ("max_position_embeddings", "max_seq_len", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return max(value, yarn_context_length(cfg) or 0)
    return 2048


def _attach_score_head(model: CausalLM, hf_config: Any, model_config: ModelConfig) -> None:
    """A causal LM served as a reranker gets its score head: from ``--hf-overrides``
    (``_attach_two_token_head``), else a GGUF reranker's from its file (``file_rank_head``)."""
    overrides = HFOverrides.parse(model_config.hf_overrides)
    if overrides is not None:
        _attach_two_token_head(model, hf_config, model_config, overrides)
        return
    path = _model_file(model_config)
    pooling = getattr(_text_config(hf_config), "gguf_pooling_type", None)  # None: not recorded
    if path is None or pooling not in (None, RANK_POOLING):
        return
    rows = rank_head(GGUFFile.read(path))
    if rows is not None:
        model.score = file_rank_head(rows, int(_text_config(hf_config).hidden_size))


def _attach_two_token_head(model: CausalLM, hf_config: Any, model_config: ModelConfig,
                           overrides: HFOverrides) -> None:
    """``--hf-overrides``: the two-token score head (``two_token_head``), its tokens looked up
    in the model's vocabulary."""
    overrides.check_family(list(getattr(hf_config, "architectures", None) or []))
    vocab = load_tokenizer(model_config).hf.get_vocab()
    missing = [t for t in (overrides.false_token, overrides.true_token) if t not in vocab]
    if missing:
        raise ValueError(f"--hf-overrides: classifier_from_token {missing[0]!r} is not a token "
                         "of this model's vocabulary")
    model.score = two_token_head(model, vocab[overrides.false_token], vocab[overrides.true_token])


def _embedding(req: Request) -> bytes | None:
    """A finished pooling request's vector as float32 little-endian bytes."""
    if req.pooled is None or req.status is not RequestStatus.FINISHED_STOPPED:
        return None
    return req.pooled.to(torch.float32).numpy().astype("<f4").tobytes()


def _to_token_logprobs(entry: LogprobsDict) -> TokenLogprobs:
    ids = list(entry)
    return TokenLogprobs(token_ids=ids, logprobs=[entry[i].logprob for i in ids],
                         ranks=[entry[i].rank or 0 for i in ids])
