"""Decode speed with a LoRA adapter against the base model, in process (heron.LLM).

    python scripts/lora_speed.py [--model PATH] [--rank 16] [--rounds 5]

Makes a random PEFT adapter (rank ``--rank`` on q/k/v/o and gate/up/down) for the HF twin of the
model (``--hf``: the default model's is the anchors' gemma-hf directory), then times 64 greedy
tokens at batch 1 alternating base and adapter, and one batch of 16 each. Prints tok/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def make_adapter(hf_dir: str, rank: int, out: Path) -> None:
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                             "up_proj", "down_proj"])
    peft.get_peft_model(model, config).save_pretrained(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="served model (default: heron's default)")
    parser.add_argument("--hf", default=str(Path.home() / ".cache/heron-anchors/gemma-hf"),
                        help="the model's HF directory (the adapter's shapes)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from heron import LLM, SamplingParams
    from heron.lora import LoRARequest

    with tempfile.TemporaryDirectory() as tmp:
        make_adapter(args.hf, args.rank, Path(tmp) / "adapter")
        llm = LLM(args.model, enable_lora=True, max_lora_rank=args.rank)
        adapter = LoRARequest("bench", 1, str(Path(tmp) / "adapter"))
        params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
        prompt = "The history of the city of Paris begins"
        runs: dict[str, list[float]] = {"base": [], "lora": []}
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, lora in (("base", None), ("lora", adapter)):
                start = time.perf_counter()
                llm.generate([prompt], params, lora_request=lora, use_tqdm=False)
                runs[name].append(64 / (time.perf_counter() - start))
        for name, values in runs.items():
            kept = values[1:]
            print(f"{name}: batch 1 {[round(v, 1) for v in kept]} tok/s, median "
                  f"{statistics.median(kept):.1f}")
        prompts = [f"{prompt} {i}" for i in range(16)]
        for name, lora in (("base", None), ("lora", adapter), ("base", None), ("lora", adapter)):
            start = time.perf_counter()
            llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
            print(f"{name}: batch 16 {16 * 64 / (time.perf_counter() - start):.1f} tok/s")


if __name__ == "__main__":
    main()
