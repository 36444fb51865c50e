"""``python -m heron.bench.accuracy``: how close heron's modes are to the model in the file.

For the default model, the anchors' second model (``--model second``) or any GGUF
(``--gguf FILE``), on 4 prompts x 32 greedy tokens (``ignore_eos``):

- ``dtype=float32`` (the file's blocks, float32 activations: exact products) against
  transformers, which dequantizes the same GGUF to float32: how many of the 4 greedy
  continuations are identical, and where the first one that is not leaves;
- the default mode (bf16 activations, int8 per group for the integer dot products) against the
  float32 mode: |log-prob| differences of the tokens the default mode chose while decoding,
  re-scored by the float32 model teacher-forced over the same text (mean and max, in nats).

The README states the default mode's tolerance; ``tests/test_quant.py`` holds the default
model to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from heron.bench.peers import anchors_dir, model_files

PROMPTS = [
    "The history of the Roman Empire spans many centuries, beginning with",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Photosynthesis is the process by which green plants",
    "Question: What is the capital of France?\nAnswer:",
]
NEW_TOKENS = 32


def decode_error(llm_quantized: Any, llm_reference: Any) -> torch.Tensor:
    """|logprob| differences on the tokens ``llm_quantized`` chose while decoding greedily,
    re-scored by ``llm_reference`` teacher-forced over the same text. [num_tokens] nats."""
    from heron import SamplingParams

    tok = llm_reference.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(p)} for p in PROMPTS]
    decoded = llm_quantized.generate(prompts, SamplingParams(
        max_tokens=NEW_TOKENS, temperature=0, logprobs=0, ignore_eos=True), use_tqdm=False)
    full = [{"prompt_token_ids": o.prompt_token_ids + o.outputs[0].token_ids} for o in decoded]
    scored = llm_reference.generate(full, SamplingParams(max_tokens=1, prompt_logprobs=0),
                                    use_tqdm=False)
    diffs = []
    for q, r in zip(decoded, scored):
        n = len(q.prompt_token_ids)
        for i, (token, entry) in enumerate(zip(q.outputs[0].token_ids, q.outputs[0].logprobs)):
            diffs.append(abs(entry[token].logprob - r.prompt_logprobs[n + i][token].logprob))
    return torch.tensor(diffs)


def greedy_tokens(llm: Any) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, heron's greedy continuations) as token ids."""
    from heron import SamplingParams

    tok = llm.get_tokenizer()
    prompts = [tok.encode(text) for text in PROMPTS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return prompts, [list(o.outputs[0].token_ids) for o in outputs]


def transformers_greedy(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy continuations of the GGUF at ``path`` (dequantized to float32): its
    argmax at every step over the whole text (no cache argument, whose name transformers is
    changing), EOS included, as heron's ``ignore_eos`` allows (``generate``'s
    ``min_new_tokens`` would forbid EOS instead)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for _ in range(NEW_TOKENS):
                ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            out.append(ids[0, len(prompt):].tolist())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("default", "second"), default="default")
    parser.add_argument("--gguf", default=None, help="any GGUF file (instead of --model)")
    args = parser.parse_args()
    from heron import LLM
    from heron.engine.core import EngineCore
    from heron.loader.default_model import default_gguf_path

    files = model_files(args.model, args.gguf, None, anchors_dir())
    path = files.gguf or default_gguf_path()
    reference = LLM(str(path), dtype="float32")
    prompts, ours = greedy_tokens(reference)
    theirs = transformers_greedy(path, prompts)
    same = sum(a == b for a, b in zip(ours, theirs))
    splits = [next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
              for a, b in zip(ours, theirs) if a != b]
    print(f"{path.name}: float32 greedy tokens equal transformers on {same} of {len(prompts)} "
          f"prompts x {NEW_TOKENS} tokens" + (f" (others leave at token {splits})" if splits else ""))
    auto = LLM(str(path))
    err = decode_error(auto, reference)
    engine = auto.engine
    assert isinstance(engine, EngineCore)  # one in-process engine
    print(f"{path.name}: default mode ({engine.dtype}, {engine.quantization}) vs "
          f"float32: mean {err.mean():.3f} / max {err.max():.3f} nats over {len(err)} tokens")


if __name__ == "__main__":
    main()
