"""Where one engine step's time goes: ``python -m heron.bench.steps [--model M] [--quantization Q]``.

Runs a model in process (the default one unless ``--model`` names a directory or GGUF file), fills a batch of B decoding requests (128-token prompts),
and times 40 decode steps, reporting the median milliseconds of the step and of its parts:
``model`` (the forward pass), ``lm_head`` (logits), ``sampler``, ``build_batch`` (the runner's
flat batch), ``sampling_batch`` (the sampler's input), ``schedule`` and ``update`` (the
scheduler). ``--split`` also times the step with
the projections, then the LM head too, replaced by zeros: what is left is the cost of the
small ops (norms, RoPE, attention, casts) and of Python. It runs the model's modules (a fused
decode step, ``heron.models.fused_decode``, has no projection calls to replace). ``--cpu-time``
times in the process's CPU seconds instead of wall time (with ``OMP_NUM_THREADS=1``: the time
the step's thread ran, whatever else shares the cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from heron import LLM, SamplingParams
from heron.engine.core import EngineCore
from heron.engine.messages import EngineRequest
from heron.layers.linear import Linear


def instrument(engine: EngineCore, times: dict[str, list[float]],
               clock: Callable[[], float] = time.perf_counter) -> None:
    """Wrap the step and its parts so that each call appends its duration to ``times``
    (seconds of ``clock``)."""
    parts = {"step": (engine, "step"), "schedule": (engine.scheduler, "schedule"),
             "update": (engine.scheduler, "update_from_output"),
             "build_batch": (engine.runner, "_build_batch"), "model": (engine.runner.model, "forward"),
             "lm_head": (engine.runner.model, "compute_logits"),
             "sampler": (engine.runner.sampler, "forward"),
             "sampling_batch": (engine.runner, "sampling_batch")}
    for name, (owner, attr) in parts.items():
        setattr(owner, attr, _timed(getattr(owner, attr), times[name], clock))


def _timed(fn: Callable, sink: list[float], clock: Callable[[], float]) -> Callable:
    def wrapper(*args: object, **kwargs: object) -> object:
        start = clock()
        out = fn(*args, **kwargs)
        sink.append(clock() - start)
        return out
    return wrapper


def fill(engine: EngineCore, batch: int, tag: str, temperature: float = 0.0) -> None:
    params = SamplingParams(max_tokens=200, ignore_eos=True, temperature=temperature)
    for i in range(batch):
        prompt = [2] + list(range(1000 + 50 * i, 1127 + 50 * i))
        engine.add_request(EngineRequest(request_id=f"{tag}-{i}", prompt_token_ids=prompt,
                                         sampling_params=params))
    for _ in range(3):  # prefill, then settle
        engine.step()


def _reset(times: dict[str, list[float]]) -> None:
    for values in times.values():  # in place: the wrappers hold these lists
        values.clear()


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a directory or GGUF file (default: the embedded model)")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--split", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (argmax); 1.0 is what an OpenAI client gets by default")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time in the process's CPU seconds (all its threads: with one "
                             "thread, steadier than wall time on a shared machine)")
    args = parser.parse_args()
    engine = LLM(args.model, tokenizer=args.tokenizer, quantization=args.quantization).engine
    assert isinstance(engine, EngineCore)  # one in-process engine (no data_parallel_size)
    times: dict[str, list[float]] = defaultdict(list)
    instrument(engine, times, time.process_time if args.cpu_time else time.perf_counter)
    for batch in args.batch:
        fill(engine, batch, f"b{batch}", args.temperature)
        _reset(times)
        for _ in range(args.steps):
            engine.step()
        parts = sorted(((k, v) for k, v in times.items() if v), key=lambda kv: -sum(kv[1]))
        print(f"batch {batch}: " + ", ".join(f"{k} {median_ms(v):.1f}" for k, v in parts), flush=True)
        if args.split:
            _split(engine, args.steps, times)
        engine.abort_requests([f"b{batch}-{i}" for i in range(batch)])


def _split(engine: EngineCore, steps: int, times: dict[str, list[float]]) -> None:
    lm_head = engine.runner.model.lm_head
    forward, head = Linear.forward, lm_head.forward
    vocab = engine.info.vocab_size
    inner: Any = getattr(engine.runner.model, "model", None)
    fused = getattr(inner, "fused_decode", None)
    if fused is not None:  # one compiled call: no projection to replace, so split the modules
        print("  (the split runs the model's modules, not its fused decode step)", flush=True)
        inner.fused_decode = None
    try:
        # Patching methods is the point here: the step runs on with parts replaced by zeros.
        Linear.forward = _zero_projection  # type: ignore[method-assign]
        for label in ("without projections", "without projections and LM head"):
            _reset(times)
            for _ in range(steps):
                engine.step()
            print(f"  {label}: step {median_ms(times['step']):.1f}", flush=True)
            lm_head.forward = (  # type: ignore[method-assign]
                lambda hidden: torch.zeros(hidden.shape[0], vocab))
    finally:
        Linear.forward = forward  # type: ignore[method-assign]
        lm_head.forward = head  # type: ignore[method-assign]
        if fused is not None:
            inner.fused_decode = fused


def _zero_projection(self: Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[0], self.out_features, dtype=x.dtype)


if __name__ == "__main__":
    main()
