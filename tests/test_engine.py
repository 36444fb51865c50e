"""The whole engine on a tiny random Llama: the same prompts give the same greedy tokens whatever
the batch, budget, cache state or preemption; outputs, stops, seeds, n and logprobs behave.
(Greedy generation against transformers.generate for every architecture: test_models_reference.py.)"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers

from heron import LLM, SamplingParams
from heron.engine.request import Request
from tests.tiny_models import VOCAB, save_tiny_model


def _prompts(count: int, seed: int = 0, low: int = 3, high: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(low, high))] for _ in range(count)]


def _greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = 32) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _llm(path: object, **kwargs: object) -> LLM:
    return LLM(str(path), dtype="float32", skip_tokenizer_init=True, **kwargs)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> object:
    return save_tiny_model(tmp_path_factory.mktemp("llama"))


def test_batch_invariance(llama_dir: object) -> None:
    prompts = _prompts(16, seed=2, low=3, high=60)
    solo = _llm(llama_dir, enable_prefix_caching=False)
    alone = [_greedy(solo, [p])[0] for p in prompts]

    llm = _llm(llama_dir)
    assert _greedy(llm, prompts) == alone, "a batch of 16 mixed lengths"
    stats = llm.engine.stats()
    assert _greedy(llm, prompts) == alone, "with the prefix cache hot"
    assert llm.engine.stats().prefix_cache_hits > stats.prefix_cache_hits

    chunked = _llm(llama_dir, max_num_batched_tokens=8, max_num_seqs=4)
    assert _greedy(chunked, prompts) == alone, "tiny token budget: chunked prefill"

    # 12 blocks of 16 tokens cannot hold 16 sequences of up to 92 tokens: preemption must happen.
    small = _llm(llama_dir, num_gpu_blocks_override=12, enable_prefix_caching=False)
    assert _greedy(small, prompts) == alone, "after preemption"
    assert small.engine.stats().num_preemptions > 0


def test_a_prompt_sent_again_computes_only_its_last_token(llama_dir: object) -> None:
    """Prompts whose tokens fill their blocks, sent again: every block is a prefix-cache hit and
    only the last token is computed again (its K/V go to a scratch slot, not into the shared
    block), with the same greedy tokens as the first time and as an engine without the cache,
    log-probs within float32 rounding (that token's row now attends through the decode kernel,
    not with its prompt: 4.8e-7 seen), and the cached blocks' K/V unchanged."""
    rng = random.Random(7)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (16, 32, 48)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)

    def run(llm: LLM) -> list[tuple[list[int], list[dict[int, float]], int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids),
                 [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs],
                 o.num_cached_tokens) for o in outs]

    def same(ours: list[tuple[list[int], list[dict[int, float]], int]]) -> bool:
        return all(a[0] == b[0] and all(x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-5 for t in x)
                                        for x, y in zip(a[1], b[1]))
                   for a, b in zip(ours, reference))

    reference = run(_llm(llama_dir, enable_prefix_caching=False))
    llm = _llm(llama_dir)
    first = run(llm)
    assert same(first) and [r[2] for r in first] == [0, 0, 0]
    kv = llm.engine.scheduler.kv_cache
    cached = sorted(block.block_id for block in kv._cached.values())
    assert len(cached) >= 6  # the prompts' 1 + 2 + 3 blocks, at least
    before = [cache[:, cached].clone() for cache in llm.engine.runner.kv_caches]
    again = run(llm)
    assert same(again) and [r[2] for r in again] == [15, 31, 47]
    assert llm.engine.stats().prefix_cache_hits == 15 + 31 + 47
    for cache, old in zip(llm.engine.runner.kv_caches, before):
        assert torch.equal(cache[:, cached], old)


def test_outputs_shape_and_lengths(llama_dir: object) -> None:
    llm = _llm(llama_dir)
    prompts = _prompts(3, seed=3)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (1, 7, 20)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, prompt, n in zip(outs, prompts, (1, 7, 20)):
        assert out.prompt_token_ids == prompt
        assert out.finished
        assert len(out.outputs) == 1
        assert len(out.outputs[0].token_ids) == n
        assert out.outputs[0].finish_reason == "length"


def test_stop_token_ids_end_generation(llama_dir: object) -> None:
    llm = _llm(llama_dir)
    prompt = _prompts(1, seed=4)[0]
    free = _greedy(llm, [prompt], max_tokens=12)[0]
    stop_at = free[5]
    first = free.index(stop_at)
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at])
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[:first + 1]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop_at


def test_min_tokens_blocks_stop_token(llama_dir: object) -> None:
    llm = _llm(llama_dir)
    prompt = _prompts(1, seed=4)[0]
    first_token = _greedy(llm, [prompt], max_tokens=1)[0][0]
    params = SamplingParams(max_tokens=6, min_tokens=4, temperature=0, stop_token_ids=[first_token])
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 4
    assert first_token not in out.token_ids[:4]


def test_seeded_sampling_is_reproducible_across_batches(llama_dir: object) -> None:
    llm = _llm(llama_dir)
    prompt = _prompts(1, seed=5)[0]
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": prompt}], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": p} for p in _prompts(5, seed=6)]
    batch = llm.generate(others[:2] + [{"prompt_token_ids": prompt}] + others[2:],
                         [SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)] * 2
                         + [seeded] + [SamplingParams(max_tokens=16, temperature=0.7)] * 3,
                         use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    other_seed = seeded.clone(seed=99)
    again = llm.generate([{"prompt_token_ids": prompt}], other_seed, use_tqdm=False)[0].outputs[0].token_ids
    assert again != alone


def test_n_sequences_share_the_prompt(llama_dir: object) -> None:
    llm = _llm(llama_dir)
    prompt = _prompts(1, seed=7, low=40, high=40)[0]
    params = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_logprobs_match_reference(llama_dir: object) -> None:
    llm = _llm(llama_dir)
    prompt = _prompts(1, seed=8)[0]
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    ref = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    seq = prompt + out.outputs[0].token_ids
    with torch.inference_mode():
        logprobs = torch.log_softmax(ref(torch.tensor([seq])).logits[0].float(), dim=-1)
    for step, (token, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        row = logprobs[len(prompt) - 1 + step]
        assert entry[token].rank == 1
        assert entry[token].logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert set(entry) == set(row.topk(3).indices.tolist()) | {token}
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        expected = float(logprobs[pos - 1, prompt[pos]])
        assert entry[prompt[pos]].logprob == pytest.approx(expected, abs=1e-4)
    total = sum(entry[t].logprob for t, entry in zip(out.outputs[0].token_ids, out.outputs[0].logprobs))
    assert out.outputs[0].cumulative_logprob == pytest.approx(total)


def test_prompt_logprobs_in_small_pieces_and_steps_match_one_piece(
    llama_dir: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """echo + logprobs: a few vocabulary rows at a time, a few prompt tokens per step, and the
    same numbers as one [rows, vocabulary] block; a free request steps meanwhile."""
    from heron.engine import runner

    prompt = _prompts(1, seed=9, low=40, high=40)[0]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3)
    whole = _llm(llama_dir).generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    monkeypatch.setattr(runner, "_LOGPROBS_PIECE_ELEMENTS", 3 * VOCAB)  # 3 rows per piece
    llm = _llm(llama_dir)
    assert llm.engine.scheduler.prompt_logprobs_chunk == 24  # 8 pieces of 3 rows
    steps: list[dict[str, int]] = []
    schedule = llm.engine.scheduler.schedule

    def record():  # noqa: ANN202
        out = schedule()
        steps.append({s.request.request_id: s.num_new_tokens for s in out.scheduled})
        return out

    monkeypatch.setattr(llm.engine.scheduler, "schedule", record)
    free = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    both = llm.generate([{"prompt_token_ids": prompt}, {"prompt_token_ids": [7, 8, 9]}],
                        [params, free], use_tqdm=False)
    echo_id = min(steps[0])  # request ids are numbered in order
    assert [s[echo_id] for s in steps if echo_id in s] == [24, 16]
    assert all(len(s) == 2 for s in steps[:2]), "the free request stepped alongside"
    pieces, expected = both[0].prompt_logprobs, whole[0].prompt_logprobs
    assert pieces[0] is None and len(pieces) == len(expected) == len(prompt)
    for got, want in zip(pieces[1:], expected[1:]):
        assert list(got) == list(want)  # the prompt token first, then the same top 3
        for token in want:
            assert got[token].rank == want[token].rank
            assert got[token].logprob == pytest.approx(want[token].logprob, abs=1e-5)


def test_prompt_too_long_is_a_clear_error(llama_dir: object) -> None:
    llm = _llm(llama_dir, max_model_len=64)
    with pytest.raises(ValueError, match="maximum context length is 64 tokens"):
        llm.generate([{"prompt_token_ids": [5] * 60}], SamplingParams(max_tokens=10), use_tqdm=False)
    # the engine keeps serving afterwards
    assert len(_greedy(llm, [[5] * 10], max_tokens=3)[0]) == 3


_KERNELS_AT_START = """
import sys
from heron import LLM
from heron.kernels.cpu.isa import kernel_cache_dir
LLM(sys.argv[1], dtype="float32", skip_tokenizer_init=True)
print(sorted(p.name.split("-")[0] for p in kernel_cache_dir().glob("*.so")))
"""


_KERNELS_BEFORE_COPY = """
import functools, sys
from heron import LLM
from heron.kernels.cpu.isa import kernel_cache_dir
from heron.loader import gguf_file
real, seen = gguf_file.GGUFFile._in_memory.func, []
def spy(self):
    seen.append(sorted(p.name.split("-")[0] for p in kernel_cache_dir().glob("*.so")))
    return real(self)
prop = functools.cached_property(spy)
prop.__set_name__(gguf_file.GGUFFile, "_in_memory")
gguf_file.GGUFFile._in_memory = prop
LLM(sys.argv[1], dtype="bfloat16", skip_tokenizer_init=True, gguf_memory="copy")
print(seen)
"""


def test_a_first_start_compiles_before_it_reads_the_blocks_into_memory(tmp_path: Path) -> None:
    """--gguf-memory copy: the engine's kernels are compiled before the file's blocks are read
    into memory, so the compiler's memory does not add to theirs in the first start's peak."""
    import os
    import subprocess
    import sys

    from tests.test_gguf_native import _hf_model, write_gguf

    path = tmp_path / "tiny-llama.gguf"
    write_gguf(path, "llama", _hf_model("llama"))
    env = {**os.environ, "HERON_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HERON_CPU_KERNELS", None)
    done = subprocess.run([sys.executable, "-c", _KERNELS_BEFORE_COPY, str(path)], env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    seen = done.stdout.splitlines()[-1]
    assert all(name in seen for name in ("fused_decode", "elementwise", "paged_attention",
                                         "gguf_matmul")), done.stdout + done.stderr


def test_the_sampler_kernels_are_built_before_the_first_step(llama_dir: object,
                                                               tmp_path: object) -> None:
    """On a first start the compiler runs while the engine loads, not in the first step (where
    its memory would add to the peak of the model's pages just read in)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HERON_CACHE_DIR": str(tmp_path)}
    env.pop("HERON_CPU_KERNELS", None)
    done = subprocess.run([sys.executable, "-c", _KERNELS_AT_START, str(llama_dir)], env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    assert "elementwise" in done.stdout.splitlines()[-1], done.stdout + done.stderr


def test_logit_bias_and_prompt_ids_are_made_once_per_request(llama_dir: object) -> None:
    """The runner turns a request's logit_bias (ids past the vocabulary dropped) and, where
    repetition_penalty reads them, its prompt ids into tensors on its first sampled step and
    keeps them; each step adds only its output ids."""
    llm = _llm(llama_dir)
    favoured = 5
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                            logit_bias={favoured: 100.0, VOCAB + 3: 50.0})
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], params, use_tqdm=False)
    assert out[0].outputs[0].token_ids == [favoured] * 6

    runner = llm.engine.runner  # type: ignore[attr-defined]
    params = params.clone(repetition_penalty=1.3)
    request = Request("r", [1, 2, VOCAB + 1, 3], params, max_tokens=6)
    first = runner.sampling_batch([request], VOCAB).penalties
    kept = request.fixed_tensors
    request.token_ids.append(7)  # a step's output
    second = runner.sampling_batch([request], VOCAB).penalties
    assert kept is not None and request.fixed_tensors is kept
    assert kept.prompt_ids.tolist() == [1, 2, 3]
    assert first.seen_index.tolist() == [1, 2, 3] and second.seen_index.tolist() == [1, 2, 3, 7]
    for penalties in (first, second):
        assert penalties.bias_index.tolist() == [favoured]
        assert penalties.bias_values.tolist() == [100.0]


def test_prompt_logprobs_of_a_one_token_prompt(llama_dir: object) -> None:
    """A one-token prompt has no token to score: its prompt logprobs are ``[None]`` (as vLLM
    gives), not None as if none had been asked for; a two-token prompt scores its second."""
    llm = _llm(llama_dir)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2, ignore_eos=True)
    one, two = llm.generate([{"prompt_token_ids": [7]}, {"prompt_token_ids": [7, 9]}], params,
                            use_tqdm=False)
    assert one.prompt_logprobs == [None]
    assert two.prompt_logprobs is not None and two.prompt_logprobs[0] is None
    assert len(two.prompt_logprobs) == 2 and 9 in two.prompt_logprobs[1]
