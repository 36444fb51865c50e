"""Decode speed with and without a JSON-schema constraint, in one run on one engine.

    python -m heron.bench.structured [--model PATH] [--batch 1 8] [--max-tokens 96] [--repeats 3]

For each batch size, the same chat prompt is decoded ``batch`` times at once, free and under
a JSON schema, alternating, ``--repeats`` times. Only decode steps are timed (the step that
prefills the prompts is left out), so the number is generated tokens per second of decode.
A warm-up request builds the grammar engine's tokenizer index and compiles the schema first.
Prints the median of the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

from heron.engine.messages import EngineRequest
from heron.llm import LLM
from heron.sampling_params import SamplingParams
from heron.structured.params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "biography": {"type": "string"},
        "hobbies": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "biography", "hobbies"],
}
PROMPT = "Describe a fictional person as JSON, with a long biography and many hobbies."


def decode_tok_s(llm: LLM, prompt: list[int], batch: int, max_tokens: int,
                 spec: StructuredOutputsParams | None, tag: str) -> tuple[float, int]:
    """(tokens per second over the decode steps of ``batch`` copies of ``prompt``, tokens)."""
    core = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=spec is None,
                            structured_outputs=spec)
    for i in range(batch):
        core.add_request(EngineRequest(request_id=f"{tag}-{i}", prompt_token_ids=prompt,
                                       sampling_params=params.clone()))
    tokens, seconds, first = 0, 0.0, True
    while core.has_unfinished_requests():
        start = time.perf_counter()
        outputs = core.step()
        elapsed = time.perf_counter() - start
        if not outputs:
            continue  # waiting for a compile
        if first:
            first = False  # the prefill step
            continue
        tokens += sum(len(o.new_token_ids) for o in outputs)
        seconds += elapsed
    return (tokens / seconds if seconds else 0.0), tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    llm = LLM(args.model, kv_cache_memory="512MiB")
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    prompt = tokenizer.encode(text, add_special_tokens=False)
    spec = StructuredOutputsParams.json_schema(SCHEMA)
    decode_tok_s(llm, prompt, 1, 4, spec, "warmup")
    print(f"{'batch':>5} {'free tok/s':>11} {'json tok/s':>11} {'ratio':>6} {'json tokens':>12}")
    for batch in args.batch:
        free, constrained, counts = [], [], []
        for r in range(args.repeats):
            free.append(decode_tok_s(llm, prompt, batch, args.max_tokens, None, f"f{batch}-{r}")[0])
            speed, count = decode_tok_s(llm, prompt, batch, args.max_tokens, spec, f"j{batch}-{r}")
            constrained.append(speed)
            counts.append(count)
        f, j = statistics.median(free), statistics.median(constrained)
        print(f"{batch:>5} {f:>11.1f} {j:>11.1f} {j / f:>6.2f} {statistics.median(counts):>12}")


if __name__ == "__main__":
    main()
