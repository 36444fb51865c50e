"""Pooling requests in the engine (tiny random Llama): prefill-only requests through the same
scheduler and batches as generation. The vector equals transformers' final hidden states pooled;
the same prompt gives the same bits alone, in a batch, beside generation; no KV is kept after."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from heron.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from heron.engine.core import EngineCore
from heron.engine.messages import EngineRequest
from heron.pooling_params import PoolingParams
from heron.sampling_params import SamplingParams
from tests.tiny_models import VOCAB, save_tiny_model, save_tiny_server_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"))


def _core(path: Path, dtype: str = "float32", **scheduler: int) -> EngineCore:
    return EngineCore(EngineConfig(ModelConfig(model=str(path), dtype=dtype),
                                   CacheConfig(kv_cache_memory=16 << 20),
                                   SchedulerConfig(**scheduler)))


def _prompts(count: int, seed: int, low: int = 1, high: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(low, high))] for _ in range(count)]


def _pool(prompt: list[int], rid: str, kind: str = "mean", normalize: bool = True) -> EngineRequest:
    return EngineRequest(request_id=rid, prompt_token_ids=prompt,
                         pooling_params=PoolingParams(kind, normalize))


def _run(core: EngineCore, requests: list[EngineRequest]) -> dict[str, np.ndarray]:
    """Every request to the end; the pooled vectors by request id (each sent exactly once)."""
    for r in requests:
        core.add_request(r)
    vectors: dict[str, np.ndarray] = {}
    while core.has_unfinished_requests():
        for out in core.step():
            if out.embedding is not None:
                assert out.request_id not in vectors and out.finish_reason == "stop"
                assert out.new_token_ids == []
                vectors[out.request_id] = np.frombuffer(out.embedding, dtype="<f4")
    return vectors


def _reference(path: Path, prompt: list[int], kind: str) -> np.ndarray:
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        hidden = model(torch.tensor([prompt])).last_hidden_state[0]  # [L, hidden], final norm
    pooled = hidden.mean(0) if kind == "mean" else hidden[-1]
    return torch.nn.functional.normalize(pooled, dim=0).numpy()


@pytest.mark.parametrize("kind", ["mean", "last"])
def test_pooled_vector_matches_transformers(llama_dir: Path, kind: str) -> None:
    core = _core(llama_dir)
    prompts = _prompts(3, seed=1, low=2, high=40)
    got = _run(core, [_pool(p, str(i), kind) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        vec = got[str(i)]
        assert vec.shape == (64,)
        assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(vec, _reference(llama_dir, prompt, kind), atol=1e-5)
    mean, last = (_run(core, [_pool(prompts[0], k, k)])[k] for k in ("mean", "last"))
    assert np.abs(mean - last).max() > 1e-3  # the two poolings are different vectors


def test_unnormalised_vector_keeps_its_norm(llama_dir: Path) -> None:
    core = _core(llama_dir)
    prompt = _prompts(1, seed=2, low=10, high=10)[0]
    raw = _run(core, [_pool(prompt, "raw", normalize=False)])["raw"]
    unit = _run(core, [_pool(prompt, "unit")])["unit"]
    assert abs(float(np.linalg.norm(raw)) - 1.0) > 1e-3
    np.testing.assert_allclose(raw / np.linalg.norm(raw), unit, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_bits_alone_or_in_a_batch_with_generation(llama_dir: Path, dtype: str) -> None:
    """Prompts of 1..60 tokens (short ones take other matmul kernels unless the step is padded)."""
    core = _core(llama_dir, dtype)
    prompts = _prompts(12, seed=3) + [[7], [7, 8, 9]]
    alone = {str(i): _run(core, [_pool(p, str(i))])[str(i)] for i, p in enumerate(prompts)}
    generation = [EngineRequest(request_id=f"g{i}", prompt_token_ids=p,
                                sampling_params=SamplingParams(max_tokens=6, temperature=0))
                  for i, p in enumerate(_prompts(4, seed=4))]
    mixed = [_pool(p, str(i)) for i, p in enumerate(prompts)]
    batch = _run(core, generation[:2] + mixed[:7] + generation[2:] + mixed[7:])
    for rid, vec in alone.items():
        assert vec.tobytes() == batch[rid].tobytes(), f"prompt {rid} of {len(prompts[int(rid)])}"


def test_pooling_frees_its_blocks_and_publishes_no_prefix(llama_dir: Path) -> None:
    core = _core(llama_dir)
    kv = core.scheduler.kv_cache
    prompt = _prompts(1, seed=5, low=50, high=50)[0]
    _run(core, [_pool(prompt, "a")])
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.num_cached_blocks == 0
    _run(core, [EngineRequest(request_id="g", prompt_token_ids=prompt,
                              sampling_params=SamplingParams(max_tokens=2))])
    assert kv.num_cached_blocks > 0  # generation publishes its full blocks...
    assert core.stats().prefix_cache_hits == 0  # (none were left by the pooling request)
    queries = core.stats().prefix_cache_queries
    again = _run(core, [_pool(prompt, "b")])["b"]  # ...which a pooling request does not read
    assert core.stats().prefix_cache_queries == queries + len(prompt)
    assert core.stats().prefix_cache_hits == 0
    assert again.tobytes() == _run(core, [_pool(prompt, "c")])["c"].tobytes()


def test_long_prompt_in_chunks_and_after_preemption(llama_dir: Path) -> None:
    prompts = _prompts(6, seed=6, low=30, high=90)
    alone = _core(llama_dir)
    expected = {str(i): _run(alone, [_pool(p, str(i))])[str(i)] for i, p in enumerate(prompts)}
    chunked = _core(llama_dir, max_num_batched_tokens=16)  # every prompt runs in chunks
    got = _run(chunked, [_pool(p, str(i)) for i, p in enumerate(prompts)])
    for rid, vec in expected.items():
        np.testing.assert_allclose(got[rid], vec, atol=1e-5)
    small = EngineCore(EngineConfig(ModelConfig(model=str(llama_dir), dtype="float32"),
                                    CacheConfig(num_gpu_blocks_override=8),
                                    SchedulerConfig(max_num_batched_tokens=64)))
    generation = [EngineRequest(request_id=f"g{i}", prompt_token_ids=p,
                                sampling_params=SamplingParams(max_tokens=30, ignore_eos=True))
                  for i, p in enumerate(_prompts(3, seed=7, low=20, high=30))]
    got = _run(small, generation + [_pool(p, str(i)) for i, p in enumerate(prompts[:2])])
    assert small.stats().num_preemptions > 0
    for rid in ("0", "1"):
        np.testing.assert_allclose(got[rid], expected[rid], atol=1e-5)


def test_a_pooling_prompt_that_fits_one_step_is_not_chunked(llama_dir: Path) -> None:
    core = _core(llama_dir, max_num_batched_tokens=40)
    core.add_request(EngineRequest(request_id="g", prompt_token_ids=[5] * 30,
                                   sampling_params=SamplingParams(max_tokens=4)))
    core.add_request(_pool([6] * 20, "p"))
    first = core.scheduler.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in first.scheduled] == [("g", 30)]


def test_pooling_prompt_limits(llama_dir: Path) -> None:
    core = _core(llama_dir)
    core_len = core.max_model_len
    with pytest.raises(ValueError, match=f"maximum context length is {core_len} tokens. However, "
                                         f"the input has {core_len + 1} tokens"):
        core.add_request(_pool([5] * (core_len + 1), "long"))
    with pytest.raises(ValueError, match="empty"):
        core.add_request(_pool([], "empty"))
    assert len(_run(core, [_pool([5] * core_len, "full")])["full"]) == 64  # exactly fills
    with pytest.raises(ValueError, match="pooling must be one of mean, last"):
        PoolingParams("cls")


def test_llm_embed_gives_the_engines_vectors(tmp_path: Path) -> None:
    """The offline ``LLM.embed``: one vector per prompt (strings or token ids), the engine's bits,
    transformers' pooled hidden states; then the LLM generates as before."""
    from heron import LLM

    llama_dir = save_tiny_server_model(tmp_path)  # the tiny Llama with a tokenizer
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory="16MiB")
    prompts = _prompts(3, seed=7, low=2, high=40)
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts], PoolingParams("last"),
                     use_tqdm=False)
    engine = _run(_core(llama_dir), [_pool(p, str(i), "last") for i, p in enumerate(prompts)])
    assert len({o.request_id for o in outs}) == 3
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        assert out.prompt_token_ids == prompt and out.finished
        vec = np.array(out.outputs.embedding, dtype=np.float32)
        assert out.outputs.hidden_size == 64 and vec.tobytes() == engine[str(i)].tobytes()
        np.testing.assert_allclose(vec, _reference(llama_dir, prompt, "last"), atol=1e-5)
    text = llm.embed("hello there", use_tqdm=False)[0]  # one string, mean pooling by default
    ids = llm.get_tokenizer().encode("hello there")
    assert text.prompt_token_ids == ids
    np.testing.assert_allclose(text.outputs.embedding, _reference(llama_dir, ids, "mean"), atol=1e-5)
    assert not llm.engine.has_unfinished_requests()
    generated = llm.generate([{"prompt_token_ids": prompts[0]}],
                             SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(generated[0].outputs[0].token_ids) == 4
