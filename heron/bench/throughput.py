"""`heron bench throughput`: offline generation speed, heron against transformers in one run.

The workload (defaults): 64 requests with random token prompts of 64-512 tokens and
outputs of 64-256 tokens, ignore_eos so each request produces exactly its output
length. heron runs them all through ``LLM.generate``; transformers runs the same
prompts through batched ``generate`` (left padding, ``--hf-batch-size`` at a time).
Also reported: single-request decode speed for both.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from heron.llm import LLM


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def total_output(self) -> int:
        return sum(self.output_lens)


@dataclass
class Result:
    engine: str
    seconds: float
    output_tokens: int

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("throughput", help="offline throughput: heron vs transformers",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: the embedded Gemma 3 270M)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, nargs=2, default=(64, 512), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(64, 256), metavar=("MIN", "MAX"))
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens for the single-request decode test")
    p.add_argument("--skip-hf", action="store_true", help="do not run the transformers reference")
    p.add_argument("--save-result", default=None, help="write the results as JSON here")
    p.set_defaults(func=run)


def make_workload(vocab_size: int, num: int, input_len: tuple[int, int], output_len: tuple[int, int],
                  seed: int, low_id: int = 1000) -> Workload:
    """Random token prompts (ids above ``low_id`` to stay clear of special tokens)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(low_id, vocab_size) for _ in range(rng.randint(*input_len))]
               for _ in range(num)]
    return Workload(prompts, [rng.randint(*output_len) for _ in range(num)])


def run_heron(llm: LLM, work: Workload) -> Result:
    from heron import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in work.output_lens]
    prompts = [{"prompt_token_ids": p} for p in work.prompts]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    if produced != work.total_output:
        raise RuntimeError(f"heron produced {produced} tokens, expected {work.total_output}")
    return Result("heron", seconds, produced)


def run_hf(model: Any, work: Workload, batch_size: int, pad_id: int) -> Result:
    """transformers batched generate; each batch runs to its longest output, only asked tokens count."""
    import torch  # here, not at import: `heron serve` builds every subcommand's parser

    start = time.perf_counter()
    for i in range(0, len(work.prompts), batch_size):
        prompts = work.prompts[i:i + batch_size]
        new_tokens = max(work.output_lens[i:i + batch_size])
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    return Result("transformers", time.perf_counter() - start, work.total_output)


def single_decode(llm: LLM, hf_model: Any | None, prompt: list[int],
                  tokens: int) -> dict[str, float]:
    from heron import SamplingParams

    out: dict[str, float] = {}
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    out["heron"] = tokens / (time.perf_counter() - start)
    if hf_model is not None:
        import torch

        ids = torch.tensor([prompt])
        start = time.perf_counter()
        with torch.inference_mode():
            hf_model.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        out["transformers"] = tokens / (time.perf_counter() - start)
    return out


def run(args: argparse.Namespace) -> None:
    from heron import LLM

    llm = LLM(args.model, dtype=args.dtype, seed=args.seed, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    vocab = llm.engine.info.vocab_size
    work = make_workload(vocab, args.num_prompts, tuple(args.input_len), tuple(args.output_len), args.seed)
    print(f"workload: {len(work.prompts)} requests, {sum(map(len, work.prompts))} prompt tokens, "
          f"{work.total_output} output tokens; heron dtype {llm.engine.info.dtype}")
    results = [run_heron(llm, work)]
    hf_model = None
    if not args.skip_hf:
        hf_model = load_hf_reference(llm)
        results.append(run_hf(hf_model, work, args.hf_batch_size, pad_id=0))
    decode = single_decode(llm, hf_model, work.prompts[0][:128], args.decode_tokens)
    print_table(results, decode)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump({"results": [asdict(r) | {"output_tok_s": r.output_tok_s} for r in results],
                       "single_decode_tok_s": decode, "args": vars(args) | {"func": None}}, f, indent=2)


def load_hf_reference(llm: LLM) -> Any:
    """transformers model from the same weights heron serves, in the dtype heron runs."""
    import torch
    from transformers import AutoModelForCausalLM

    from heron.loader import hf_reference_path

    path = hf_reference_path(llm.model_config)
    dtype = getattr(torch, llm.engine.info.dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def print_table(results: list[Result], decode: dict[str, float]) -> None:
    base = results[-1].output_tok_s
    print("\n| engine | seconds | output tokens | output tok/s | vs last row |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r.engine} | {r.seconds:.1f} | {r.output_tokens} | {r.output_tok_s:.1f} | "
              f"{r.output_tok_s / base:.2f}x |")
    print("\nsingle-request decode tok/s: " + ", ".join(f"{k} {v:.1f}" for k, v in decode.items()))
