"""A seeded random mixed workload for heron's engine, and the checks it must pass.

    models = build_models(root)                     # tiny Llama / Qwen2 / Gemma 3: HF and GGUF
    case = make_case(seed, models)                  # engine settings + requests, all from the seed
    report = run_case(case)                         # mixed run, each request alone, the checks
    assert not report.failures, report.failures

One case is one engine (a random block size, context, token budget, KV pool small enough to
preempt, prefix caching on or off) and a list of requests that arrive at random steps while
others run: greedy, seeded and unseeded sampling, ``n > 1``, logprobs and prompt logprobs, stop
strings and stop token ids, ``min_tokens`` / ``max_tokens`` at 1 and at the context end,
``ignore_eos``, penalties, ``logit_bias``, structured output (regex, choice, JSON schema),
prompts sharing prefixes (exact prefixes of each other, repeats: fully cached), prompts of
exactly a block, of ``max_model_len - 1`` tokens, and aborts mid-flight.

Each greedy or seeded request that was not aborted must equal the same request run alone on a
fresh engine of the same settings: the same token ids, text, finish and stop reason, and
logprobs (sampled and prompt) within ``LOGPROB_TOL``. Every request (unseeded ones too) must
obey its own parameters (lengths, stops, min_tokens, its grammar), and the engine must end
with nothing running or waiting and every KV block free.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from heron import LLM, SamplingParams
from heron.engine.messages import EngineRequest
from heron.outputs import RequestOutput
from heron.pooling_params import PoolingParams
from heron.structured.params import StructuredOutputsParams
from tests.model_harness import randomize_
from tests.tiny_models import VOCAB, char_tokenizer

# Logprobs alone and in the mix: within 1e-5 where the model runs in heron's GGUF kernels (seen:
# equal bits). float32 checkpoints run torch's matmuls, whose bits depend on the number of rows
# (MKL), and these random models' logits span about +-100 (float32's spacing there: 7.6e-6):
# up to 1.1e-4 seen (Qwen2), so there within 5e-4.
LOGPROB_TOL = 1e-5
LOGPROB_TOL_F32 = 5e-4
EOS = 2
CHARS = range(4, 104)  # the character tokenizer's printable characters
MAX_STEPS = 20_000  # a run that takes more steps than this is stuck


# ============================================================================ the models


def _configs() -> dict[str, transformers.PretrainedConfig]:
    # head_dim 32: bf16 attention takes heron's paged kernel (head_dim % 32 == 0), as real models do
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=EOS, pad_token_id=0)
    return {
        "llama": transformers.LlamaConfig(**common, num_hidden_layers=2, tie_word_embeddings=False),
        "qwen2": transformers.Qwen2Config(**common, num_hidden_layers=2, use_sliding_window=True,
                                          sliding_window=8, max_window_layers=1,
                                          tie_word_embeddings=True),
        "gemma3": transformers.Gemma3TextConfig(
            **common, num_hidden_layers=3, head_dim=32, sliding_window=8,
            query_pre_attn_scalar=32, final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    }


@dataclass(frozen=True)
class SoakModel:
    """A model heron loads: its path, the tokenizer directory (the character tokenizer), the
    dtype it runs in ("auto": the engine's default), its ``quantization``."""

    name: str
    path: str
    tokenizer: str
    dtype: str
    quantization: str = "auto"


def build_models(root: Path, gguf: bool = True) -> dict[str, SoakModel]:
    """Tiny random Llama / Qwen2 / Gemma 3 checkpoints in ``root`` (reused when there), each as
    an HF directory run in float32, in the default dtype (bfloat16 where the CPU has it), and
    re-quantized to int8 (``quantization="int8"``, the
    default dtype: heron's int8 kernels), and (``gguf``) as a GGUF file of Q8_0 blocks (every 2-D
    weight, as in the default model) run in the
    engine's default dtype through heron's GGUF kernels; all with the character tokenizer."""
    from tests.gguf_files import synthetic_vocab, write_gguf

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = root / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        char_tokenizer().save_pretrained(tokenizer)
    models = {}
    for name, config in _configs().items():
        directory = root / name
        gguf_path = root / f"{name}.gguf"
        if not (directory / "config.json").exists() or (gguf and not gguf_path.exists()):
            torch.manual_seed(0)
            hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            randomize_(hf, seed=len(name))
            _flatten_logits(hf)
            hf.save_pretrained(directory)
            char_tokenizer().save_pretrained(directory)
            if gguf:
                write_gguf(gguf_path, hf, synthetic_vocab(VOCAB), block_format="Q8_0",
                           layers_only=False)
        models[f"{name}-f32"] = SoakModel(f"{name}-f32", str(directory), str(directory), "float32")
        models[f"{name}-bf16"] = SoakModel(f"{name}-bf16", str(directory), str(directory), "auto")
        models[f"{name}-int8"] = SoakModel(f"{name}-int8", str(directory), str(directory), "auto",
                                           "int8")
        if gguf:
            models[f"{name}-gguf"] = SoakModel(f"{name}-gguf", str(gguf_path), str(tokenizer),
                                               "auto")
    return models


def _flatten_logits(hf: torch.nn.Module) -> None:
    """Scale the final norm by 1/20: randomize_'s logits span about +-100, so that sampling at
    any temperature is near greedy; at +-5 seeded requests draw different tokens from
    different seeds (and from a shared generator, which the comparison must catch)."""
    norm = hf.model.norm.weight
    with torch.no_grad():
        if hf.config.model_type == "gemma3_text":  # Gemma's norm scales by 1 + w
            norm.copy_((1 + norm) / 20 - 1)
        else:
            norm.div_(20)


# ============================================================================ a case


@dataclass(frozen=True)
class EngineSettings:
    model: SoakModel
    block_size: int
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int
    num_blocks: int
    prefix_caching: bool

    def make(self) -> LLM:
        return LLM(self.model.path, tokenizer=self.model.tokenizer, dtype=self.model.dtype,
                   quantization=self.model.quantization,
                   max_model_len=self.max_model_len, block_size=self.block_size,
                   num_gpu_blocks_override=self.num_blocks,
                   max_num_batched_tokens=self.max_num_batched_tokens,
                   max_num_seqs=self.max_num_seqs, enable_prefix_caching=self.prefix_caching)


@dataclass
class Spec:
    """One request: its prompt and parameters, the step it arrives at and (maybe) the number
    of steps after which it is aborted."""

    rid: int
    prompt: list[int]
    params: SamplingParams
    kind: str  # "greedy" | "seeded" | "random" (unseeded: checked, not compared) | "embed"
    arrive: int
    abort_after: int | None = None
    pooling: PoolingParams | None = None  # kind "embed": an embedding request

    def describe(self) -> str:
        p = self.params
        fields = {k: v for k, v in vars(p).items()
                  if k != "all_stop_token_ids" and v != getattr(_DEFAULTS, k)}
        what = self.pooling if self.kind == "embed" else fields
        return (f"rid={self.rid} kind={self.kind} arrive={self.arrive} "
                f"abort_after={self.abort_after} prompt({len(self.prompt)})={self.prompt} {what}")


_DEFAULTS = SamplingParams()


@dataclass
class Case:
    seed: int
    settings: EngineSettings
    specs: list[Spec]


def make_case(seed: int, models: dict[str, SoakModel], num_requests: int | None = None,
              model: str | None = None) -> Case:
    rng = random.Random(seed)
    chosen = models[model] if model else models[rng.choice(sorted(models))]
    block_size = rng.choice((4, 8, 16))
    max_model_len = rng.choice((48, 64, 96, 128))
    min_blocks = -(-max_model_len // block_size)
    settings = EngineSettings(
        model=chosen, block_size=block_size, max_model_len=max_model_len,
        max_num_batched_tokens=rng.choice((3, 8, 16, 33, 64, 2048)),
        max_num_seqs=rng.choice((2, 4, 8, 64)),
        num_blocks=min_blocks + rng.choice((0, 1, 3, min_blocks, 4 * min_blocks)),
        prefix_caching=rng.random() < 0.8)
    gen = _Generator(rng, settings)
    count = num_requests or rng.randint(6, 18)
    return Case(seed, settings, [gen.spec(i) for i in range(count)])


class _Generator:
    def __init__(self, rng: random.Random, settings: EngineSettings) -> None:
        self.rng = rng
        self.s = settings
        self.prompts: list[list[int]] = []
        self.bases = [self._tokens(rng.randint(settings.block_size, settings.max_model_len // 2))
                      for _ in range(2)]
        self.arrival = 0

    def _tokens(self, n: int) -> list[int]:
        rng = self.rng
        return [rng.choice(CHARS) if rng.random() < 0.85 else rng.randrange(3, VOCAB)
                for _ in range(n)]

    def prompt(self) -> list[int]:
        rng, s = self.rng, self.s
        limit = s.max_model_len - 1
        shape = rng.choice(("fresh", "fresh", "shared", "shared", "prefix", "repeat", "block",
                            "long", "one"))
        if shape == "shared":
            base = rng.choice(self.bases)
            p = base + self._tokens(rng.randint(1, 12))
        elif shape == "prefix" and self.prompts:
            other = rng.choice(self.prompts)
            p = other[:rng.randint(1, len(other))]
        elif shape == "repeat" and self.prompts:
            p = list(rng.choice(self.prompts))
        elif shape == "block":
            p = self._tokens(s.block_size * rng.randint(1, max(1, limit // s.block_size)))
        elif shape == "long":
            p = self._tokens(limit)
        elif shape == "one":
            p = self._tokens(1)
        else:
            p = self._tokens(rng.randint(2, 40))
        p = p[:limit] or self._tokens(1)
        self.prompts.append(p)
        return p

    def spec(self, rid: int) -> Spec:
        rng = self.rng
        prompt = self.prompt()
        kind = rng.choice(("greedy", "greedy", "seeded", "seeded", "random", "embed"))
        pooling = None
        if kind == "embed":
            pooling = PoolingParams(rng.choice(("mean", "last")), rng.random() < 0.7)
            params = SamplingParams()
        else:
            params = self.params(kind, len(prompt))
        self.arrival += rng.choice((0, 0, 0, 1, 2, 5))
        abort = rng.choice((0, 1, 2, 4, 9)) if rng.random() < 0.12 else None
        return Spec(rid, prompt, params, kind, self.arrival, abort, pooling)

    def params(self, kind: str, prompt_len: int) -> SamplingParams:
        rng = self.rng
        room = self.s.max_model_len - prompt_len
        kw: dict[str, Any] = {}
        kw["max_tokens"] = rng.choice((1, 1, None, room, rng.randint(1, min(room, 24)),
                                       rng.randint(1, min(room, 24))))
        cap = kw["max_tokens"] or room
        if rng.random() < 0.2:
            kw["min_tokens"] = rng.randint(0, cap)
        if kind == "greedy":
            kw["temperature"] = 0.0
        else:
            kw["temperature"] = rng.choice((0.5, 1.0, 1.5))
            if rng.random() < 0.3:
                kw["top_k"] = rng.choice((1, 5, 50))
            if rng.random() < 0.3:
                kw["top_p"] = rng.choice((0.5, 0.9))
            if rng.random() < 0.2:
                kw["min_p"] = rng.choice((0.05, 0.2))
        if kind == "seeded":
            kw["seed"] = rng.randrange(1 << 32)
        if kind != "greedy" or rng.random() < 0.2:
            kw["n"] = rng.choice((1, 1, 2, 3))
        kw["ignore_eos"] = rng.random() < 0.3
        if rng.random() < 0.3:
            kw["logprobs"] = rng.choice((0, 1, 5))
        if rng.random() < 0.2:
            kw["prompt_logprobs"] = rng.choice((0, 2))
        if rng.random() < 0.2:
            kw["stop_token_ids"] = [rng.choice(CHARS) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.2:
            kw["stop"] = ["".join(chr(32 + rng.randrange(95)) for _ in range(rng.randint(1, 2)))
                          for _ in range(rng.randint(1, 2))]
            kw["include_stop_str_in_output"] = rng.random() < 0.3
        if rng.random() < 0.2:
            kw["repetition_penalty"] = rng.choice((0.8, 1.2, 2.0))
        if rng.random() < 0.2:
            kw["presence_penalty"] = rng.choice((-1.0, 0.5, 2.0))
        if rng.random() < 0.2:
            kw["frequency_penalty"] = rng.choice((-0.5, 1.0))
        if rng.random() < 0.15:
            kw["logit_bias"] = {rng.randrange(VOCAB): rng.choice((-100.0, 5.0, 100.0))
                                for _ in range(rng.randint(1, 3))}
        if rng.random() < 0.15:
            kw["structured_outputs"] = rng.choice(_STRUCTURED)
        return SamplingParams(**kw)


_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
           "required": ["a", "b"], "additionalProperties": False}
_STRUCTURED = (
    StructuredOutputsParams("regex", "[a-c]{2,6}"),
    StructuredOutputsParams("regex", "(yes|no)!"),
    StructuredOutputsParams("choice", json.dumps(["alpha", "beta", "gamma delta"])),
    StructuredOutputsParams("json", json.dumps(_SCHEMA)),
)


# ============================================================================ running a case


@dataclass
class Result:
    spec: Spec
    output: RequestOutput | None  # None: aborted before it finished, or an embedding
    aborted: bool = False
    embedding: list[float] | None = None  # kind "embed"


class _Embedding:
    """An embedding request in the mix: added to the engine directly, its vector caught from
    the step's outputs."""

    def __init__(self, llm: LLM, spec: Spec) -> None:
        self.request_id = f"embed-{spec.rid}"
        self.vector: list[float] | None = None
        llm.engine.add_request(EngineRequest(request_id=self.request_id,
                                             prompt_token_ids=list(spec.prompt),
                                             pooling_params=spec.pooling))

    @property
    def finished(self) -> bool:
        return self.vector is not None


def _step(llm: LLM, embeddings: dict[str, _Embedding]) -> None:
    """``LLM._step`` that also hands each embedding request its vector."""
    outputs = llm.engine.step()
    for rejected in llm.engine.pop_rejected():
        raise ValueError(rejected.message)
    for out in outputs:
        if out.embedding is not None:
            embeddings[out.request_id].vector = np.frombuffer(out.embedding, "<f4").tolist()
    processed = llm.processor.process_outputs(outputs)
    if processed.to_abort:
        llm.engine.abort_requests(processed.to_abort)


def run_mixed(llm: LLM, specs: list[Spec]) -> dict[int, Result]:
    """Step one engine through the whole workload: requests join at their arrival step, some
    are aborted a few steps later; returns each request's result."""
    pending = sorted(specs, key=lambda s: s.arrive)
    live: dict[int, tuple[Spec, Any, int]] = {}  # rid -> (spec, RequestState, step added)
    embeddings: dict[str, _Embedding] = {}
    results: dict[int, Result] = {}
    step = 0
    while pending or live:
        while pending and pending[0].arrive <= step:
            spec = pending.pop(0)
            if spec.pooling is not None:
                state: Any = _Embedding(llm, spec)
                embeddings[state.request_id] = state
            else:
                state = llm._add("", list(spec.prompt), spec.params.clone())
            live[spec.rid] = (spec, state, step)
        for rid, (spec, state, added) in list(live.items()):
            if isinstance(state, _Embedding) and state.finished:
                results[rid] = Result(spec, None, embedding=state.vector)
                del live[rid]
            elif state.finished:
                results[rid] = Result(spec, llm._result(state, None))
                llm._release([state])
                del live[rid]
            elif spec.abort_after is not None and step - added >= spec.abort_after:
                if isinstance(state, _Embedding):
                    llm.engine.abort_requests([state.request_id])
                else:
                    llm._release([state])
                results[rid] = Result(spec, None, aborted=True)
                del live[rid]
        if live:
            _step(llm, embeddings)
        step += 1
        if step > MAX_STEPS:
            raise RuntimeError(f"the workload did not finish in {MAX_STEPS} steps")
    return results


def run_alone(llm: LLM, spec: Spec) -> RequestOutput:
    """``spec`` alone on ``llm``, whose prefix cache is first emptied: as on a fresh engine."""
    llm.engine.scheduler.kv_cache.reset_prefix_cache()
    return llm.generate([{"prompt_token_ids": list(spec.prompt)}], spec.params.clone(),
                        use_tqdm=False)[0]


# ============================================================================ the checks


@dataclass
class Report:
    seed: int
    settings: EngineSettings
    failures: list[str] = field(default_factory=list)
    requests: int = 0
    compared: int = 0
    aborted: int = 0
    preemptions: int = 0
    prefix_hits: int = 0


def run_case(case: Case, reference: LLM | None = None) -> Report:
    """The case's mixed run, each compared request alone, every check; failures as text."""
    report = Report(case.seed, case.settings, requests=len(case.specs))
    llm = case.settings.make()
    try:
        results = run_mixed(llm, case.specs)
    except Exception as err:  # noqa: BLE001 - any exception is a finding
        report.failures.append(f"mixed run raised {type(err).__name__}: {err}")
        return report
    report.failures += check_engine_idle(llm)
    stats = llm.engine.stats()
    report.preemptions, report.prefix_hits = stats.num_preemptions, stats.prefix_cache_hits
    ref = reference or case.settings.make()
    for rid in sorted(results):
        result = results[rid]
        if result.aborted:
            report.aborted += 1
            continue
        f32 = case.settings.model.dtype == "float32"
        if result.embedding is not None:
            alone_vector = ref.embed([{"prompt_token_ids": result.spec.prompt}],
                                     result.spec.pooling, use_tqdm=False)[0].outputs.embedding
            report.compared += 1
            diff = _max_diff(result.embedding, alone_vector)
            if diff > (LOGPROB_TOL_F32 if f32 else LOGPROB_TOL):
                report.failures.append(f"{result.spec.describe()}: embedding differs alone "
                                       f"by up to {diff}")
            continue
        if result.output is None:
            raise ValueError(f"request {rid} has no output")
        problems = check_own_params(result.spec, result.output, case.settings,
                                    llm.engine.eos_token_ids)
        if result.spec.kind != "random":
            alone = run_alone(ref, result.spec)
            problems += compare(result.output, alone, LOGPROB_TOL_F32 if f32 else LOGPROB_TOL)
            report.compared += 1
        report.failures += [f"{result.spec.describe()}: {p}" for p in problems]
    report.failures += [f"reference engine: {p}" for p in check_engine_idle(ref)]
    return report


def _max_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else math.inf


def check_engine_idle(llm: LLM) -> list[str]:
    engine = llm.engine
    sched = engine.scheduler
    kv = sched.kv_cache
    problems = []
    if sched.requests or sched.running or sched.waiting or engine.structured.num_pending:
        problems.append(f"engine not idle: {len(sched.requests)} requests, {len(sched.running)} "
                        f"running, {len(sched.waiting)} waiting, "
                        f"{engine.structured.num_pending} compiling")
    if kv.num_free_blocks != kv.num_blocks:
        problems.append(f"{kv.num_blocks - kv.num_free_blocks} KV blocks still held")
    held = [b.block_id for b in kv.blocks if b.ref_count != 0]
    if held:
        problems.append(f"blocks with references left: {held}")
    if llm.processor.num_sequences:
        problems.append(f"{llm.processor.num_sequences} sequences left in the output processor")
    return problems


def compare(got: RequestOutput, want: RequestOutput, tol: float = LOGPROB_TOL) -> list[str]:
    """``got`` (from the mix) against ``want`` (alone); logprobs within ``tol``."""
    problems = []
    if len(got.outputs) != len(want.outputs):
        return [f"{len(got.outputs)} outputs, alone {len(want.outputs)}"]
    for a, b in zip(got.outputs, want.outputs):
        tag = f"choice {a.index}"
        if a.token_ids != b.token_ids:
            problems.append(f"{tag}: tokens {a.token_ids} != alone {b.token_ids}")
            continue
        if (a.text, a.finish_reason, a.stop_reason) != (b.text, b.finish_reason, b.stop_reason):
            problems.append(f"{tag}: {(a.text, a.finish_reason, a.stop_reason)} != alone "
                            f"{(b.text, b.finish_reason, b.stop_reason)}")
        problems += [f"{tag} logprobs: {p}" for p in _compare_logprobs(a.logprobs, b.logprobs, tol)]
    problems += [f"prompt logprobs: {p}"
                 for p in _compare_logprobs(got.prompt_logprobs, want.prompt_logprobs, tol)]
    return problems


def _compare_logprobs(got: list | None, want: list | None, tol: float) -> list[str]:
    """Entries equal in tokens and ranks, values within ``tol``. Looser where ``tol`` is the
    float32 one: there a token within ``tol`` of another may swap places with it (a top-k set
    or a rank that differs at such a near tie), which float32 matmuls' rounding explains."""
    if (got is None) != (want is None):
        return [f"present {got is not None}, alone {want is not None}"]
    if got is None or want is None:
        return []
    if len(got) != len(want):
        return [f"{len(got)} entries, alone {len(want)}"]
    for pos, (x, y) in enumerate(zip(got, want)):
        if x is None or y is None:
            if x is not y:
                return [f"position {pos}: {x} vs alone {y}"]
            continue
        problem = _entry_problem(x, y, tol, loose=tol > LOGPROB_TOL)
        if problem:
            return [f"position {pos}: {problem}"]
    return []


def _entry_problem(x: dict, y: dict, tol: float, loose: bool) -> str | None:
    if set(x) != set(y) and not loose:
        return f"tokens {sorted(x)} vs alone {sorted(y)}"
    for t in set(x) & set(y):
        off = abs(x[t].logprob - y[t].logprob) > tol
        if off or (x[t].rank != y[t].rank and not loose):
            return f"token {t}: {x[t]} vs alone {y[t]}"
    floor = min(v.logprob for v in y.values())  # the alternatives listed alone reach this
    for t in set(x) ^ set(y):
        entry = x.get(t) or y[t]
        if entry.logprob < floor - tol:
            return f"token {t} ({entry}) listed on one side only"
    return None


def check_own_params(spec: Spec, out: RequestOutput, s: EngineSettings,
                     eos: set[int]) -> list[str]:
    """What any output of ``spec`` must satisfy, whatever it sampled (``eos``: the engine's
    end tokens)."""
    p = spec.params
    problems = []
    if out.prompt_token_ids != spec.prompt:
        problems.append("prompt_token_ids differ from the prompt")
    if len(out.outputs) != p.n or [o.index for o in out.outputs] != list(range(p.n)):
        problems.append(f"{len(out.outputs)} outputs for n={p.n}")
    if not 0 <= out.num_cached_tokens < len(spec.prompt) + (1 if len(spec.prompt) == 0 else 0):
        problems.append(f"num_cached_tokens {out.num_cached_tokens} for {len(spec.prompt)} tokens")
    if p.prompt_logprobs is not None:
        if out.num_cached_tokens:
            problems.append("prompt logprobs asked but the prompt hit the prefix cache")
        if out.prompt_logprobs is None or len(out.prompt_logprobs) != len(spec.prompt):
            problems.append("prompt logprobs missing or of the wrong length")
        elif out.prompt_logprobs[0] is not None or any(
                spec.prompt[i] not in e for i, e in enumerate(out.prompt_logprobs) if i and e):
            problems.append("prompt logprobs do not hold the prompt's tokens")
    max_tokens = min(p.max_tokens or s.max_model_len, s.max_model_len - len(spec.prompt))
    for o in out.outputs:
        problems += [f"choice {o.index}: {m}" for m in _check_choice(spec, o, max_tokens, eos)]
    return problems


def _check_choice(spec: Spec, o: Any, max_tokens: int, eos: set[int]) -> list[str]:
    p = spec.params
    ids = list(o.token_ids)
    stops = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else eos)
    problems = []
    if not ids:
        problems.append("no tokens")
    if len(ids) > max_tokens:
        problems.append(f"{len(ids)} tokens, max_tokens {max_tokens}")
    early = [i for i, t in enumerate(ids[:-1]) if t in stops and i + 1 >= p.min_tokens]
    if early:
        problems.append(f"a stop token at {early[0]} did not end it: {ids}")
    if o.finish_reason == "length":
        if len(ids) != max_tokens:
            problems.append(f"finish 'length' after {len(ids)} of {max_tokens} tokens")
    elif o.finish_reason == "stop":
        problems += _check_stop(spec, o, ids, stops)
    else:
        problems.append(f"finish_reason {o.finish_reason!r}")
    if p.logprobs is not None:
        if o.logprobs is None or len(o.logprobs) != len(ids):
            problems.append("logprobs missing or of the wrong length")
        elif any(t not in e or len(e) > p.logprobs + 1 for t, e in zip(ids, o.logprobs)):
            problems.append("a logprobs entry lacks its token or has too many")
        elif o.cumulative_logprob is None or not math.isclose(
                o.cumulative_logprob, sum(e[t].logprob for t, e in zip(ids, o.logprobs)),
                rel_tol=1e-6, abs_tol=1e-6):
            problems.append("cumulative_logprob is not the sum of the logprobs")
    if p.structured_outputs is not None and o.finish_reason == "stop" and o.stop_reason is None:
        # ended by its grammar (or an end token the grammar allowed); a stop string or a
        # stop_token_ids entry may cut it short
        problems += _check_structured(p.structured_outputs, o.text)
    return problems


def _check_stop(spec: Spec, o: Any, ids: list[int], stops: set[int]) -> list[str]:
    p = spec.params
    if isinstance(o.stop_reason, str):
        if o.stop_reason not in p.stop:
            return [f"stop_reason {o.stop_reason!r} is none of the stop strings"]
        return []
    if ids[-1] not in stops and p.structured_outputs is not None:
        return []  # the grammar completed: it ends the output, min_tokens or not
    if len(ids) < p.min_tokens:
        return [f"stopped after {len(ids)} tokens, min_tokens {p.min_tokens}"]
    if ids[-1] in stops:
        expected = ids[-1] if ids[-1] in (p.stop_token_ids or ()) else None
        if o.stop_reason != expected:
            return [f"stop_reason {o.stop_reason!r}, expected {expected!r}"]
        return []
    if p.structured_outputs is None:
        return [f"finish 'stop' on token {ids[-1]}, not a stop token ({o.stop_reason!r})"]
    return []


def _check_structured(so: StructuredOutputsParams, text: str) -> list[str]:
    if so.kind == "regex" and not re.fullmatch(so.spec, text):
        return [f"text {text!r} does not match {so.spec!r}"]
    if so.kind == "choice" and text not in json.loads(so.spec):
        return [f"text {text!r} is not one of {so.spec}"]
    if so.kind == "json":
        try:
            value = json.loads(text)
        except ValueError:
            return [f"text {text!r} is not JSON"]
        if not (isinstance(value, dict) and set(value) == {"a", "b"}
                and type(value["a"]) is int and type(value["b"]) is bool):
            return [f"JSON {text!r} does not follow the schema"]
    return []
