"""LoRA adapters (heron.lora, heron.loader.lora, heron.layers.lora, heron.engine.lora): a PEFT
adapter saved by ``peft`` runs beside heron's base projections and gives transformers + peft's
logits, per row of a mixed batch, never in the one-call decode step, never sharing prefix-cache
blocks with another adapter or the base model; what heron cannot honour is refused by name."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from heron.config import ModelConfig
from heron.engine.kv_cache import KVCacheManager
from heron.engine.request import Request
from heron.layers.lora import AdapterWeights
from heron.loader.lora import load_adapter
from heron.lora import LoRARequest
from heron.sampling_params import SamplingParams
from tests.gguf_files import round_to_blocks_, synthetic_vocab, write_gguf
from tests.model_harness import (
    PagedSession,
    hf_logits,
    load_heron_model,
    make_hf_model,
    prompt_and_greedy_logits,
)
from tests.test_fused_decode import CONFIGS, needs_kernel

ATOL = RTOL = 1e-4  # as the model reference tests (tests/test_gguf_families.py)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),  # biases on q/k/v
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=32),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**SMALL, "num_hidden_layers": 3}, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=8, layer_types=["sliding_attention", "full_attention",
                                       "sliding_attention"], final_logit_softcapping=30.0),
}


def save_adapter(hf: torch.nn.Module, path: Path, seed: int, r: int = 8, alpha: float = 16,
                 targets: list[str] | None = None, **options: object) -> torch.nn.Module:
    """A random PEFT LoRA adapter on a copy of ``hf`` (B not zero), saved at ``path`` as peft
    saves it; returns the PEFT model (transformers + the adapter: the reference)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or PROJECTIONS,
                             init_lora_weights=False, **options)
    model = peft.get_peft_model(copy.deepcopy(hf), config)
    with torch.no_grad():  # a visible effect: products of the size of the base outputs
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.5 / param.shape[-1] ** 0.5)
    model.save_pretrained(path)
    return model.eval()


def heron_adapter(model: torch.nn.Module, path: Path, name: str = "a", lora_id: int = 1,
                  max_rank: int = 16) -> AdapterWeights:
    return load_adapter(LoRARequest(name, lora_id, str(path)), model, max_rank).weights


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    hf = make_hf_model(FAMILIES[request.param](), seed=3)
    directory = tmp_path_factory.mktemp(request.param)
    model = load_heron_model(hf, directory / "base")
    model.enable_lora()
    return hf, model, directory


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_logits_equal_peft(family, rslora: bool) -> None:
    """heron + a PEFT adapter over a 40-token prompt and 3 greedy steps = transformers + peft,
    and far from the base model's logits (the adapter does something)."""
    hf, model, directory = family
    path = directory / f"adapter-{rslora}"
    reference = save_adapter(hf, path, seed=1, use_rslora=rslora)
    logits, tokens = prompt_and_greedy_logits(model, hf.config.vocab_size,
                                              lora=heron_adapter(model, path))
    torch.testing.assert_close(logits, hf_logits(reference, tokens), atol=ATOL, rtol=RTOL)
    assert (logits - hf_logits(hf, tokens)).abs().max() > 0.1



# ---- the one-call decode step ---------------------------------------------------------------


@needs_kernel
def test_decode_steps_with_lora_rows_take_the_modules(tmp_path: Path, monkeypatch) -> None:
    """bf16 on int8 copies, where decode steps run the fused C step: a step with a LoRA row runs
    the modules (its logits equal the modules' to the bit, and carry the adapter); a step
    without one still takes the fused step."""
    from heron.layers.quant import quantize_model
    from heron.models.fused_decode import FusedDecode

    hf = make_hf_model(CONFIGS["qwen2"](), seed=3)
    model = load_heron_model(hf, tmp_path / "base").to(torch.bfloat16)
    quantize_model(model, "int8")
    model.enable_lora()
    save_adapter(hf, tmp_path / "adapter", seed=2)
    lora = heron_adapter(model, tmp_path / "adapter")
    session = PagedSession(model, num_blocks=48, block_size=4, dtype=torch.bfloat16)
    assert model.prepare_decode(session.kv_caches)
    calls = []
    fused_call = FusedDecode.__call__
    monkeypatch.setattr(FusedDecode, "__call__",
                        lambda self, *a: calls.append(1) or fused_call(self, *a))
    session.step({0: [5, 6, 7, 8, 9], 1: [5, 6, 7, 8, 9]}, {0: lora})
    before = [cache.clone() for cache in session.kv_caches]
    tokens = {req: list(t) for req, t in session.tokens.items()}
    with_plan = session.step({0: [10], 1: [10]}, {0: lora})
    assert calls == []
    for cache, saved in zip(session.kv_caches, before):
        cache.copy_(saved)
    session.tokens = tokens
    plan, model.model.fused_decode = model.model.fused_decode, None
    modules = session.step({0: [10], 1: [10]}, {0: lora})
    model.model.fused_decode = plan
    assert torch.equal(with_plan[0], modules[0]) and torch.equal(with_plan[1], modules[1])
    assert (with_plan[0] - with_plan[1]).abs().max() > 0.1  # the adapter's row is another
    session.step({0: [11], 1: [11]})  # no LoRA row: the fused step
    assert calls == [1]


# ---- a GGUF base --------------------------------------------------------------------------------


def test_adapter_on_gguf_blocks_equals_peft_on_the_dequantized_model(tmp_path: Path) -> None:
    """A GGUF file's Q8_0 blocks stay the weights (read by heron's kernels); the adapter runs
    beside them and gives transformers + peft on the dequantized model."""
    from heron.layers.gguf_weight import GGUFWeight
    from heron.loader.prepared import load_prepared_model

    hf = round_to_blocks_(make_hf_model(FAMILIES["llama"](), seed=3), "Q8_0")
    path = write_gguf(tmp_path / "model.gguf", hf, synthetic_vocab(hf.config.vocab_size),
                      block_format="Q8_0")
    config = ModelConfig(model=str(path), quantization="gguf", dtype="float32")  # exact mode
    loaded, _ = load_prepared_model(config, torch.device("cpu"), torch.float32, "gguf")
    model = loaded.model
    assert isinstance(model.model.layers[0].self_attn.qkv_proj.quantized, GGUFWeight)
    model.enable_lora()
    reference = save_adapter(hf, tmp_path / "adapter", seed=4)
    logits, tokens = prompt_and_greedy_logits(model, hf.config.vocab_size,
                                              lora=heron_adapter(model, tmp_path / "adapter"))
    torch.testing.assert_close(logits, hf_logits(reference, tokens), atol=ATOL, rtol=RTOL)
    assert (logits - hf_logits(hf, tokens)).abs().max() > 0.1


# ---- what is refused ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    hf = make_hf_model(FAMILIES["llama"](), seed=3)
    model = load_heron_model(hf, tmp_path_factory.mktemp("llama"))
    model.enable_lora()
    return hf, model


@pytest.mark.parametrize(("options", "message"), [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head'] is not supported"),
    ({"bias": "lora_only"}, "bias='lora_only' is not supported (only 'none')"),
    ({"targets": ["embed_tokens", "q_proj"]},
     "target_modules 'embed_tokens' is not supported (projections only"),
    ({"targets": ["lm_head"]}, "target_modules 'lm_head' is not supported"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern={'q_proj': 4} is not supported"),
    ({"r": 32}, "rank r=32 exceeds max_lora_rank=16 (raise --max-lora-rank)"),
])
def test_unsupported_adapters_are_refused_by_name(llama, tmp_path: Path, options: dict,
                                                  message: str) -> None:
    hf, model = llama
    save_adapter(hf, tmp_path / "x", seed=0, **options)
    with pytest.raises(ValueError) as e:
        heron_adapter(model, tmp_path / "x", name="x")
    assert f"LoRA adapter 'x' ({tmp_path / 'x'}): " in str(e.value)
    assert message in str(e.value)


def test_pickled_adapter_is_refused(llama, tmp_path: Path) -> None:
    hf, model = llama
    reference = save_adapter(hf, tmp_path / "ok", seed=0)
    reference.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    with pytest.raises(ValueError, match=r"adapter_model.bin is a pickle, which heron does not "
                                         r"load; save the adapter as adapter_model.safetensors"):
        heron_adapter(model, tmp_path / "bin")


def test_adapter_of_another_shape_is_refused(llama, tmp_path: Path) -> None:
    hf, model = llama
    other = make_hf_model(transformers.LlamaConfig(**{**SMALL, "intermediate_size": 80}))
    save_adapter(other, tmp_path / "other", seed=0)
    with pytest.raises(ValueError, match=r"base_model.model.model.layers.0.mlp.down_proj.lora_A"
                                         r".weight has shape \(8, 80\), the base model expects "
                                         r"\(8, 96\)"):
        heron_adapter(model, tmp_path / "other")


def test_adapter_tensors_that_are_not_projections_are_refused(llama, tmp_path: Path) -> None:
    hf, model = llama
    save_adapter(hf, tmp_path / "x", seed=0)
    weights = load_file(tmp_path / "x" / "adapter_model.safetensors")
    weights["base_model.model.model.norm.lora_A.weight"] = torch.zeros(8, 64)
    weights["base_model.model.model.norm.lora_B.weight"] = torch.zeros(64, 8)
    save_file(weights, tmp_path / "x" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="targets 'model.norm', which is not a projection"):
        heron_adapter(model, tmp_path / "x")


def test_missing_adapter_directory_and_config(llama, tmp_path: Path) -> None:
    _, model = llama
    with pytest.raises(ValueError, match=r"\(.*nowhere\): no such directory"):
        heron_adapter(model, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no adapter_config.json"):
        heron_adapter(model, tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        heron_adapter(model, tmp_path / "empty")


# ---- the prefix cache and the router --------------------------------------------------------


def test_prefix_cache_keeps_adapters_apart() -> None:
    """The same 32 tokens under adapter a, adapter b and none: no block shared across them."""
    kv = KVCacheManager(num_blocks=32, block_size=8)
    a, b = LoRARequest("a", 1, "/a"), LoRARequest("b", 2, "/b")

    def admit(request_id: str, lora: LoRARequest | None) -> int:
        req = Request(request_id, list(range(33)), SamplingParams(), max_tokens=4,
                      lora_request=lora)
        hits, num_hit = kv.get_computed_blocks(req)
        assert kv.allocate_slots(req, req.num_tokens - num_hit, hits)
        return num_hit

    assert admit("base", None) == 0
    assert admit("a1", a) == 0
    assert admit("b1", b) == 0
    assert admit("a2", a) == 32
    assert admit("base2", None) == 32
    assert admit("a-moved", LoRARequest("a", 1, "/elsewhere")) == 0  # another adapter, same id


def test_router_keeps_an_adapters_prefix_apart() -> None:
    from heron.engine.dp_routing import PrefixAffinity, block_hashes

    prompt = list(range(40))
    assert block_hashes(prompt, 16) != block_hashes(prompt, 16, "a")
    assert block_hashes(prompt, 16, "a") != block_hashes(prompt, 16, "b")
    policy = PrefixAffinity(2, 16)
    base = policy.pick(prompt, [0, 0], [True, True])
    assert policy.affine_engine(prompt) == base
    assert policy.affine_engine(prompt, "a") is None  # the base model's prefix is not a's
    adapted = policy.pick(prompt, [1, 0], [True, True], "a")
    assert policy.affine_engine(prompt, "a") == adapted


# ---- the offline LLM: LLM(enable_lora=True).generate(..., lora_request=...) ----------------------

PROMPT = "The quick brown fox jumps over the lazy dog, twice."  # 52 tokens: 3 full blocks


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """The tiny server model (char tokenizer), two adapters on it, and their references."""
    from tests.tiny_models import save_tiny_server_model

    root = tmp_path_factory.mktemp("served")
    path = save_tiny_server_model(root / "model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs = {name: save_adapter(hf, root / name, seed=seed) for name, seed in (("a", 5), ("b", 6))}
    loras = {name: LoRARequest(name, i + 1, str(root / name)) for i, name in enumerate(refs)}
    return path, hf, refs, loras


@pytest.fixture(scope="module")
def llm(served):
    from heron.llm import LLM

    path = served[0]
    return LLM(str(path), dtype="float32", enable_lora=True, max_loras=2, block_size=16)


GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)


def _ids(out) -> list[int]:
    return list(out.outputs[0].token_ids)


def _logprobs(out) -> list[float]:
    return [next(iter(d.values())).logprob for d in out.outputs[0].logprobs]


def test_llm_generate_with_an_adapter_is_peft_greedy(served, llm) -> None:
    from tests.model_harness import argmax_continuation

    _, hf, refs, loras = served
    prompt = llm.get_tokenizer().encode(PROMPT)
    adapted = llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=loras["a"])[0]
    base = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0]
    assert _ids(adapted) == argmax_continuation(refs["a"], prompt, 8)
    assert _ids(base) == argmax_continuation(hf, prompt, 8)
    assert _ids(adapted) != _ids(base)


def test_mixed_batch_gives_each_row_its_own_adapter(llm, served) -> None:
    """Adapter a, adapter b and none in one step: each row's tokens are exactly those it gets
    alone, its logprobs the same within float rounding."""
    loras = served[3]
    prompts = [PROMPT, PROMPT[:30], "Another prompt, no adapter."]
    order = [loras["a"], loras["b"], None]
    together = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=order)
    for prompt, lora, out in zip(prompts, order, together):
        alone = llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=lora)[0]
        assert _ids(out) == _ids(alone)
        torch.testing.assert_close(_logprobs(out), _logprobs(alone), atol=1e-5, rtol=0)
    same = llm.generate([PROMPT] * 3, GREEDY, use_tqdm=False, lora_request=order)
    assert len({tuple(_ids(o)) for o in same}) == 3  # one prompt, three models: three answers


def test_prefix_cache_is_not_shared_across_adapters(served) -> None:
    """The same prompt under the base model, then adapter a: a's blocks are its own (nothing
    cached for it at first, its answer is a's), then cached for a's next request."""
    from heron.llm import LLM
    from tests.model_harness import argmax_continuation

    path, hf, refs, loras = served
    llm = LLM(str(path), dtype="float32", enable_lora=True, block_size=16)
    prompt = llm.get_tokenizer().encode(PROMPT)
    base = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0]
    first = llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=loras["a"])[0]
    again = llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=loras["a"])[0]
    other = llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=loras["b"])[0]
    base_again = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and other.num_cached_tokens == 0
    assert again.num_cached_tokens == base_again.num_cached_tokens == 48
    assert _ids(first) == _ids(again) == argmax_continuation(refs["a"], prompt, 8)
    assert _ids(other) == argmax_continuation(refs["b"], prompt, 8)
    assert _ids(base) == _ids(base_again) == argmax_continuation(hf, prompt, 8)


def test_max_loras_one_runs_two_adapters_in_turn(served) -> None:
    from heron.llm import LLM

    path, _, _, loras = served
    llm = LLM(str(path), dtype="float32", enable_lora=True, max_loras=1, block_size=16)
    order = [loras["a"], loras["b"], loras["a"], None]
    together = llm.generate([PROMPT] * 4, GREEDY, use_tqdm=False, lora_request=order)
    for lora, out in zip(order, together):
        assert _ids(out) == _ids(llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=lora)[0])
    assert llm.engine.lora is not None and len(llm.engine.lora.loaded) == 1


def test_lora_request_without_enable_lora_is_refused(served) -> None:
    from heron.llm import LLM

    path, _, _, loras = served
    llm = LLM(str(path), dtype="float32")
    with pytest.raises(ValueError, match=r"LoRA adapter 'a' was asked for, but LoRA is not enabled "
                                         r"\(enable_lora=True, --enable-lora\)"):
        llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=loras["a"])
    assert not llm.engine.has_unfinished_requests()


def test_one_id_is_one_adapter(llm, served) -> None:
    loras = served[3]
    clash = LoRARequest("c", loras["a"].lora_int_id, loras["b"].lora_path)
    llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=loras["a"])
    with pytest.raises(ValueError, match="lora_int_id 1 is LoRA adapter 'a'"):
        llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=clash)


def test_lora_modules_flag_forms() -> None:
    """``--lora-modules``: name=path and vLLM's JSON object, numbered from 1; others refused."""
    from heron.cli import lora_modules

    spec = '{"name": "b", "path": "/p/b", "base_model_name": "base"}'
    assert lora_modules(["a=/p/a", spec]) == (LoRARequest("a", 1, "/p/a"),
                                              LoRARequest("b", 2, "/p/b", "base"))
    for bad in ("a", "=/p", '{"name": "b"}', '{"name": "b", "path": "/p", "x": 1}', "{oops"):
        with pytest.raises(ValueError, match="--lora-modules: "):
            lora_modules([bad])
