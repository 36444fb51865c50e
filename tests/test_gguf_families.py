"""A GGUF file loads as the same model as its Hugging Face original, for every family heron serves.

Each family case builds a tiny random model in transformers, saves it with ``save_pretrained``
(the HF original) and writes the same weights as a GGUF file the way llama.cpp's converter
does (``tests/gguf_files.py``: F32 tensors, q/k rows permuted, Gemma norms as ``1 + w``, RoPE
scaling as metadata or as the ``rope_freqs`` tensor). heron's model from the GGUF must have the
original's config (shapes, RoPE variant per layer type, sliding windows) and compute its logits.

Tokenizers are held to llama.cpp's own test vectors (``tests/data``: texts and the ids the
original HF tokenizers give them), built from the file and reloaded from heron's cache. A
Llama 3.2-shaped model with the real Llama 3 vocabulary (F16) runs end to end: config, the HF
original's tokenizer, greedy tokens through ``heron.LLM`` and the eos ids that end generation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from heron.config import ModelConfig
from heron.layers.gguf_weight import GGUFWeight
from heron.layers.linear import Linear
from heron.layers.rotary import rope_parameters
from heron.loader import load_hf_config, load_model
from heron.loader.gguf import GGUFModel
from heron.loader.gguf_rope import llama3_divisors, llama3_from_divisors
from heron.loader.prepared import GGUF_BLOCKS, load_prepared_model
from heron.models.gemma3 import gemma3_layer_types
from heron.models.llama import head_dim_of, layer_sliding_windows
from heron.server.model_facts import read_model_facts
from heron.tokenizer import load_tokenizer
from tests.gguf_files import (
    DATA,
    Vocab,
    llama3_rope_freqs,
    round_to_blocks_,
    round_to_float16_,
    synthetic_vocab,
    vocab_test_vectors,
    write_gguf,
    write_vocab_gguf,
)
from tests.model_harness import (
    PagedSession,
    argmax_continuation,
    hf_logits,
    make_hf_model,
    prompt_and_greedy_logits,
)

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, num_hidden_layers=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # Llama 3.2's


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "heron-cache"
    monkeypatch.setenv("HERON_CACHE_DIR", str(root))
    return root


# ---------------------------------------------------------------------------- families


def _llama3() -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(**SMALL, max_position_embeddings=131072,
                                    rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=True)


def _llama_linear() -> transformers.PretrainedConfig:
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    return transformers.LlamaConfig(**SMALL, max_position_embeddings=256, rope_parameters=rope,
                                    tie_word_embeddings=False)


def _llama_biases() -> transformers.PretrainedConfig:
    # biases on q/k/v/o and the MLP ("llamafied" models): no metadata key, only the tensors
    return transformers.LlamaConfig(**SMALL, max_position_embeddings=256, attention_bias=True,
                                    mlp_bias=True)


def _mistral() -> transformers.PretrainedConfig:
    # head size 32 with hidden 64 / 4 heads: the file must say it (rope.dimension_count)
    return transformers.MistralConfig(**SMALL, head_dim=32, max_position_embeddings=256,
                                      rope_theta=1000000.0, sliding_window=None)


def _qwen2_yarn() -> transformers.PretrainedConfig:
    rope = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
            "original_max_position_embeddings": 64}
    return transformers.Qwen2Config(**SMALL, max_position_embeddings=256, rope_parameters=rope,
                                    tie_word_embeddings=True)


def _qwen3() -> transformers.PretrainedConfig:
    return transformers.Qwen3Config(**SMALL, head_dim=32, max_position_embeddings=256,
                                    tie_word_embeddings=True)


def _gemma3() -> transformers.PretrainedConfig:
    # 6 layers: llama.cpp's (and transformers' default) pattern, layer 5 full attention;
    # linear scaling on full attention only, as Gemma 3 4B+; queries scaled by the head size
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
    return transformers.Gemma3TextConfig(
        **{**SMALL, "num_hidden_layers": 6}, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=8, max_position_embeddings=256, rope_parameters=rope,
        final_logit_softcapping=30.0)


FAMILIES: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama3_rope": _llama3, "llama_linear_rope": _llama_linear, "llama_biases": _llama_biases,
    "mistral": _mistral,
    "qwen2_yarn": _qwen2_yarn, "qwen3": _qwen3, "gemma3": _gemma3,
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    hf = make_hf_model(FAMILIES[request.param](), seed=3)
    directory = tmp_path_factory.mktemp(request.param)
    path = write_gguf(directory / "model.gguf", hf, synthetic_vocab(hf.config.vocab_size))
    return hf, path


def _facts(config: object) -> dict[str, object]:
    """What heron's model classes read of a config, as plain values."""
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
    facts: dict[str, object] = {name: getattr(config, name) for name in names}
    facts["head_dim"] = head_dim_of(config)
    facts["biases"] = [bool(getattr(config, name, False)) for name in ("attention_bias", "mlp_bias")]
    facts["rms_norm_eps"] = float(np.float32(config.rms_norm_eps))  # GGUF stores a float32
    if config.model_type.startswith("gemma3"):
        layer_types = gemma3_layer_types(config)
        facts["layer_types"] = layer_types
        facts["rope"] = {t: rope_parameters(config, t) for t in sorted(set(layer_types))}
        facts["sliding_window"] = config.sliding_window
        facts["query_pre_attn_scalar"] = config.query_pre_attn_scalar
        facts["final_logit_softcapping"] = config.final_logit_softcapping
    else:
        facts["rope"] = rope_parameters(config)
        facts["sliding_windows"] = layer_sliding_windows(config)
    return facts


def test_gguf_config_equals_the_hf_original(family: tuple[torch.nn.Module, Path]) -> None:
    hf, path = family
    ours = load_hf_config(ModelConfig(model=str(path)))
    assert _facts(ours) == _facts(hf.config)


def test_gguf_model_computes_the_hf_original(family: tuple[torch.nn.Module, Path]) -> None:
    """Logits of heron's model from the GGUF at every position of a 40-token prompt and of
    3 decode steps = transformers on the original."""
    hf, path = family
    model = load_model(ModelConfig(model=str(path)), torch.device("cpu"), torch.float32).model
    logits, tokens = prompt_and_greedy_logits(model, hf.config.vocab_size)
    expected = hf_logits(hf, tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("small_first_shard", [False, True], ids=["tensors", "metadata_only"])
def test_split_file_loads_as_one(small_first_shard: bool, tmp_path: Path) -> None:
    """A file in parts (llama.cpp's gguf-split: NAME-00001-of-00004.gguf...; the first may hold
    the metadata alone) loads from its first part as the whole model, in both of the engine's
    ways: dequantized and the file's blocks as the weights; the model catalogue counts every
    part. Before, the tensors of the other parts were missing ("checkpoint is missing 50
    weight(s)")."""
    hf = round_to_blocks_(make_hf_model(_gemma3(), seed=3), "Q8_0", layers_only=False)
    path = write_gguf(tmp_path / "model.gguf", hf, synthetic_vocab(SMALL["vocab_size"]),
                      block_format="Q8_0", layers_only=False, split_max_tensors=30,
                      small_first_shard=small_first_shard)
    parts = sorted(p.name for p in tmp_path.glob("*.gguf"))
    assert parts == [f"model-0000{i}-of-0000{len(parts)}.gguf" for i in range(1, len(parts) + 1)]
    assert path.name == parts[0] and len(parts) == (4 if small_first_shard else 3)
    facts = read_model_facts(ModelConfig(model=str(path)))  # Ollama's /api/show: every part
    assert facts.size == sum(p.stat().st_size for p in tmp_path.glob("*.gguf"))
    assert facts.parameter_count == sum(t.numel() for name, t in hf.state_dict().items()
                                        if name != "lm_head.weight")  # tied: not in the file
    config = ModelConfig(model=str(path), dtype="float32")  # the blocks times float32 activations
    blocks = load_prepared_model(config, torch.device("cpu"), torch.float32, GGUF_BLOCKS)[0].model
    linears = [m for m in blocks.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.quantized, GGUFWeight) for m in linears)
    for model in (load_model(config, torch.device("cpu"), torch.float32).model, blocks):
        logits, tokens = prompt_and_greedy_logits(model, SMALL["vocab_size"])
        torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=1e-4, rtol=1e-4)


def test_split_file_parts_are_checked(tmp_path: Path) -> None:
    """Another part than the first, or a first part without all the others: an error naming
    the file to pass or the files missing."""
    hf = make_hf_model(_qwen3(), seed=3)
    path = write_gguf(tmp_path / "model.gguf", hf, synthetic_vocab(SMALL["vocab_size"]),
                      split_max_tensors=10)
    second = path.with_name("model-00002-of-00003.gguf")
    with pytest.raises(ValueError, match=rf"{second} is part 2 of 3 of a split GGUF file; pass "
                                         rf"its first part, {path}"):
        load_hf_config(ModelConfig(model=str(second)))
    second.unlink()
    with pytest.raises(ValueError, match=rf"{path} is the first of 3 parts of a split GGUF file; "
                                         rf"missing: {second}$"):
        load_hf_config(ModelConfig(model=str(path)))


def test_mmproj_file_is_named_as_such(tmp_path: Path) -> None:
    """A vision-language model's mmproj file (llama.cpp writes the vision part apart, as
    architecture "clip") passed as the model: said to be one, not transformers' "architecture
    clip is not supported yet"."""
    path = tmp_path / "mmproj-model-f16.gguf"
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_string("clip.projector_type", "gemma3")
    writer.add_tensor("v.patch_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=rf"^{path} is a vision encoder and projector \(an mmproj "
                                         r"file, general.architecture 'clip'\), not a language model"):
        load_hf_config(ModelConfig(model=str(path)))


@pytest.mark.parametrize("config_class", [transformers.LlamaConfig, transformers.Qwen2Config])
def test_file_without_kv_head_count_has_as_many_as_heads(
        config_class: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``{arch}.attention.head_count_kv`` (a converted config without num_key_value_heads, as
    early Llama ones): as many key/value heads as heads, as llama.cpp reads it (not Qwen2Config's
    default of 32), and llama's q/k rows un-permuted with that count."""
    hf = make_hf_model(config_class(**{**SMALL, "num_key_value_heads": 4},
                                    max_position_embeddings=64), seed=0)
    monkeypatch.setattr(gguf.GGUFWriter, "add_head_count_kv", lambda self, count: None)
    path = write_gguf(tmp_path / "no-kv-count.gguf", hf, synthetic_vocab(hf.config.vocab_size))
    assert not any(k.endswith("head_count_kv") for k in GGUFModel(path).file.metadata)
    model = load_model(ModelConfig(model=str(path)), torch.device("cpu"), torch.float32).model
    prompt = list(range(5, 25))
    logits = PagedSession(model.eval()).step({0: prompt})[0]
    torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=1e-4, rtol=1e-4)


def test_llama_file_named_mistral_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A llama file whose general.name is exactly "mistral": transformers renames such a file's
    architecture to "mistral" and then finds no gguf-py tensor names for it ("Unknown gguf
    model_type: mistral"); heron reads it as the llama file it is."""
    hf = make_hf_model(_mistral(), seed=2)
    written = gguf.GGUFWriter.add_name
    monkeypatch.setattr(gguf.GGUFWriter, "add_name", lambda self, name: written(self, "mistral"))
    path = write_gguf(tmp_path / "named-mistral.gguf", hf, synthetic_vocab(SMALL["vocab_size"]))
    assert GGUFModel(path).file.metadata["general.name"] == "mistral"
    model = load_model(ModelConfig(model=str(path)), torch.device("cpu"), torch.float32).model
    prompt = list(range(5, 25))
    logits = PagedSession(model.eval()).step({0: prompt})[0]
    torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=1e-4, rtol=1e-4)


def test_llama_file_with_biases_on_q_k_v_only(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A llamafied Qwen: Qwen2's weights (biases on q/k/v, none on o) in a llama-architecture
    file, its q/k rows and biases permuted as llama.cpp's converter does. It loads as the Qwen2
    model it is (before: a missing o_proj bias, or the q/k/v biases left unread)."""
    import tests.gguf_files as files

    monkeypatch.setitem(files.GGUF_ARCH, "qwen2", "llama")
    hf = make_hf_model(transformers.Qwen2Config(**SMALL, max_position_embeddings=64,
                                                tie_word_embeddings=False), seed=1)
    path = write_gguf(tmp_path / "llamafied.gguf", hf, synthetic_vocab(SMALL["vocab_size"]))
    assert GGUFModel(path).file.architecture == "llama"
    model = load_model(ModelConfig(model=str(path)), torch.device("cpu"), torch.float32).model
    prompt = list(range(5, 25))
    logits = PagedSession(model.eval()).step({0: prompt})[0]
    torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("extra", [[], ["blk.0.ffn_gate_inp.weight"]], ids=["plain", "router"])
def test_tensors_the_model_does_not_take_are_reported(
        extra: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A tensor of the file that no weight of the model takes (here an MoE router a dense
    Llama has no place for) is named in a warning: the model would run without it. llama3's
    rope_freqs (read into the config) is not such a tensor."""
    import tests.gguf_files as files

    written = files._tensors
    monkeypatch.setattr(files, "_tensors", lambda model, arch: written(model, arch) + [
        (name, np.zeros((4, SMALL["hidden_size"]), np.float32)) for name in extra])
    config = transformers.LlamaConfig(**SMALL, max_position_embeddings=64,
                                      rope_parameters={**LLAMA3_ROPE, "factor": 8.0,
                                                       "original_max_position_embeddings": 16})
    path = write_gguf(tmp_path / "extra.gguf", make_hf_model(config, seed=0),
                      synthetic_vocab(SMALL["vocab_size"]))
    with caplog.at_level("WARNING", logger="heron.loader.gguf"):
        load_model(ModelConfig(model=str(path)), torch.device("cpu"), torch.float32)
        load_prepared_model(ModelConfig(model=str(path)), torch.device("cpu"), torch.float32,
                            GGUF_BLOCKS)  # the engine's way: the file's blocks as the weights
    reported = [r.getMessage() for r in caplog.records if "are not used" in r.getMessage()]
    assert reported == ([f"1 tensors of the file are no weight of LlamaForCausalLM and are not "
                         f"used: {extra[0]}"] * 2 if extra else [])


# ---------------------------------------------------------------------------- llama3 RoPE


@pytest.mark.parametrize(("factor", "dim", "original"), [
    (8.0, 128, 8192),  # Llama 3.1 8B / 70B
    (32.0, 64, 8192),  # Llama 3.2 1B / 3B
    (8.0, 16, 16),  # tiny: one frequency in the smoothed band
])
def test_llama3_parameters_read_back_from_rope_freqs(factor: float, dim: int,
                                                     original: int) -> None:
    rope = {**LLAMA3_ROPE, "factor": factor, "original_max_position_embeddings": original}
    config = transformers.LlamaConfig(hidden_size=dim * 2, num_attention_heads=2,
                                      max_position_embeddings=original * 16, rope_parameters=rope)
    divisors = llama3_rope_freqs(config)  # what the converter stores, from transformers' inv_freq
    found = llama3_from_divisors(divisors, rope["rope_theta"], dim)
    assert found == {k: v for k, v in rope.items() if k != "rope_theta"}
    np.testing.assert_allclose(llama3_divisors(found, rope["rope_theta"], dim), divisors, rtol=1e-6)


def test_rope_freqs_of_another_kind_are_refused() -> None:
    assert llama3_from_divisors(np.ones(32, dtype=np.float32), 500000.0, 64) is None
    ramp = np.linspace(1.0, 8.0, 32, dtype=np.float32)  # no llama3 band structure
    with pytest.raises(ValueError, match="does not hold llama3 RoPE scaling"):
        llama3_from_divisors(ramp, 500000.0, 64)
    with pytest.raises(ValueError, match="expected \\(32,\\)"):
        llama3_from_divisors(np.ones(16, dtype=np.float32), 500000.0, 64)


# ---------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "llama-spm", "deepseek-llm",
                                  "deepseek-coder"])
def test_gguf_tokenizer_passes_llama_cpp_vectors(name: str) -> None:
    """Built from the file, then reloaded from the cache: the ids of the original HF tokenizer
    for llama.cpp's texts (Llama 3's ``ignore_merges``: "Cửa Việt" is 3 tokens), the text back,
    and no token the file does not have."""
    path = DATA / f"ggml-vocab-{name}.gguf"
    size = len(Vocab.from_file(path).tokens)
    for start in ("built", "reloaded"):
        tok = load_tokenizer(ModelConfig(model=str(path)))
        assert tok.vocab_size == size, start
        for text, expected in vocab_test_vectors(name):
            ids = tok.encode(text, add_special_tokens=False)
            assert ids == expected, (start, text)
            assert tok.decode(ids) == text, (start, text)


# Llama 3's vocabulary under other pre-tokenizer names: the ids llama.cpp's `llama-tokenize`
# (the anchors' build, llama-cpp-python 0.3.36's sources, `--no-bos`) gives for _PRE_TEXT from
# the same file. Each name splits the text its own way (case runs, digits alone or in threes,
# punctuation before letters, newlines alone), and all but falcon3 / pixtral (Llama 3's) differ
# from llama-bpe; transformers, which built these before, splits them all as GPT-2.
_PRE_TEXT = "x=.HelloWorld XMLHttpRequest 12345678 Cửa Việt\n\n  end"
_LLAMA3_IDS = [87, 47034, 9906, 10343, 46938, 220, 4513, 10961, 2495, 356, 91163, 101798, 271,
               220, 842]
_NO_IGNORE_MERGES = [87, 47034, 9906, 10343, 46938, 220, 4513, 10961, 2495, 356, 91163, 11655,
                     26298, 83, 271, 220, 842]
_SINGLE_DIGITS = [87, 47034, 9906, 10343, 46938, 220, 16, 17, 18, 19, 20, 21, 22, 23, 356, 91163,
                  11655, 26298, 83, 271, 220, 842]


@pytest.mark.parametrize(("pre", "expected"), [
    ("falcon3", _LLAMA3_IDS),
    ("pixtral", _LLAMA3_IDS),
    ("smaug-bpe", _NO_IGNORE_MERGES),
    ("dbrx", _NO_IGNORE_MERGES),
    ("deepseek-r1-qwen", _SINGLE_DIGITS),
    ("smollm", _SINGLE_DIGITS),
    ("tekken", [87, 47034, 9906, 10343, 12138, 2977, 1939, 220, 16, 17, 18, 19, 20, 21, 22, 23,
                356, 91163, 101798, 271, 220, 842]),
    ("deepseek-llm", [87, 47034, 9906, 10343, 46938, 220, 4513, 10961, 2495, 356, 51774, 64,
                      11655, 26298, 83, 198, 198, 220, 842]),
    ("deepseek-coder", [87, 28, 13, 9906, 10343, 46938, 220, 16, 17, 18, 19, 20, 21, 22, 23, 356,
                        51774, 64, 11655, 26298, 83, 198, 198, 220, 842]),
])
def test_gguf_pre_tokenizers_split_as_llama_cpp(tmp_path: Path, pre: str,
                                                expected: list[int]) -> None:
    path = write_vocab_gguf(tmp_path / f"llama3-vocab-as-{pre}.gguf",
                            Vocab.from_file(DATA / "ggml-vocab-llama-bpe.gguf").renamed({}, pre=pre))
    for start in ("built", "reloaded"):
        tok = load_tokenizer(ModelConfig(model=str(path)))
        assert tok.encode(_PRE_TEXT, add_special_tokens=False) == expected, start
        assert tok.decode(expected) == _PRE_TEXT, start


def test_gguf_unknown_pre_tokenizer_is_named_in_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_vocab_gguf(tmp_path / "llama3-vocab-as-made-up.gguf", Vocab.from_file(
        DATA / "ggml-vocab-llama-bpe.gguf").renamed({}, pre="made-up"))
    with caplog.at_level("WARNING"):
        load_tokenizer(ModelConfig(model=str(path)))
    assert "this GGUF's pre-tokenizer 'made-up' is not one heron builds" in caplog.text


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("llama-bpe", "Cửa Việt", [128000, 34, 91163, 101798]),
    # not a Llama 3 token: plain text, as the HF original and llama.cpp encode it
    ("llama-bpe", "<|endoftext|>", [128000, 27, 91, 8862, 728, 428, 91, 29]),
    ("llama-bpe", "hi<|eot_id|>", [128000, 6151, 128009]),
    ("qwen2", "<|im_start|>hi<|endoftext|>", [151644, 6023, 151643]),  # no BOS
    ("llama-spm", " (", [1, 29871, 313]),  # a space before the text, then " ("
    ("llama-spm", "a</s>b", [1, 263, 2, 289]),  # and after a special token
])
def test_gguf_tokenizer_special_tokens(name: str, text: str, expected: list[int]) -> None:
    for start in ("built", "reloaded"):
        tok = load_tokenizer(ModelConfig(model=str(DATA / f"ggml-vocab-{name}.gguf")))
        assert tok.encode(text) == expected, start


@pytest.mark.parametrize(("name", "eos"), [
    ("llama-bpe", {128001, 128009}),  # <|end_of_text|> (the file's eos), <|eot_id|>
    ("qwen2", {151643, 151645}),  # <|endoftext|> (the file's eos), <|im_end|>
    ("llama-spm", {2}),
])
def test_gguf_eos_ids(name: str, eos: set[int]) -> None:
    path = DATA / f"ggml-vocab-{name}.gguf"
    assert load_tokenizer(ModelConfig(model=str(path))).eos_token_ids == eos
    generation_eos = GGUFModel(path).generation_config()["eos_token_id"]
    assert set(generation_eos if isinstance(generation_eos, list) else [generation_eos]) == eos


def test_gguf_eot_and_eom_ids_end_generation(tmp_path: Path) -> None:
    """Ids the file names under tokenizer.ggml.eot_token_id / eom_token_id end generation,
    whatever their text (llama.cpp's EOT / EOM tokens)."""
    hf = make_hf_model(transformers.LlamaConfig(**SMALL, max_position_embeddings=64), seed=0)
    plain = synthetic_vocab(hf.config.vocab_size).renamed({3: "<|custom_end|>"})
    for keys, eos in (({}, 2), ({"eot_token_id": 3}, [2, 3]), ({"eom_token_id": 3}, [2, 3])):
        path = write_gguf(tmp_path / f"{sorted(keys)}.gguf", hf, plain.renamed({}, **keys))
        assert GGUFModel(path).generation_config()["eos_token_id"] == eos, keys


def test_gguf_special_token_id_outside_the_vocabulary_is_ignored(tmp_path: Path) -> None:
    """A pad id past the vocabulary (a token added after it, common in fine-tunes' files):
    llama.cpp warns and goes without; so does the tokenizer, instead of an IndexError."""
    path = write_vocab_gguf(tmp_path / "pad-past-the-vocabulary.gguf",
                            synthetic_vocab(300).renamed({}, padding_token_id=300))
    tok = load_tokenizer(ModelConfig(model=str(path)))
    assert tok.encode("w1")[0] == 1  # BOS
    assert tok.eos_token_ids == {2, 3}


# ---------------------------------------------------------------------------- Llama 3.2, end to end

# The Llama 3 split regex, as in the original tokenizer.json (written out here, independently
# of heron's copy).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPECIALS = 256
INSTRUCT_NAMES = {128008: "<|eom_id|>"}  # Llama 3.1+: a reserved token of Llama 3 renamed
LLAMA3_EOS = [128001, 128008, 128009]  # Llama 3.2 Instruct's generation_config


def _llama3_hf_tokenizer(vocab: Vocab) -> transformers.PreTrainedTokenizerFast:
    """The HF original's tokenizer, laid out as Llama 3's tokenizer.json: 128,000 BPE tokens
    (``ignore_merges``), then 256 special added tokens; BOS added by the post-processor."""
    tokens = vocab.tokens
    plain = len(tokens) - _LLAMA3_SPECIALS
    merges = [tuple(m.split(" ")) for m in vocab.metadata["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens[:plain])},
                                   merges=merges, ignore_merges=True, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in tokens[plain:]])
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", plain)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


@pytest.fixture(scope="module")
def llama32(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path]:
    """(transformers model, HF directory, F16 GGUF): Llama 3.2's RoPE and vocabulary (with
    Instruct's token names and eos), 1 head of 64, 2 layers, tied embeddings."""
    vocab = Vocab.from_file(DATA / "ggml-vocab-llama-bpe.gguf").renamed(
        INSTRUCT_NAMES, eos_token_id=128009)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab.tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=131072,
        rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=True, bos_token_id=128000,
        eos_token_id=LLAMA3_EOS)
    hf = round_to_float16_(make_hf_model(config, seed=5))
    directory = tmp_path_factory.mktemp("llama32")
    hf.save_pretrained(directory / "hf")
    _llama3_hf_tokenizer(vocab).save_pretrained(directory / "hf")
    gguf_path = write_gguf(directory / "model-f16.gguf", hf, vocab, float16=True)
    return hf, directory / "hf", gguf_path


def test_llama32_hf_tokenizer_is_llama3s(llama32: tuple[torch.nn.Module, Path, Path]) -> None:
    """The stand-in for the HF original's tokenizer passes llama.cpp's Llama 3 vectors."""
    _, hf_dir, _ = llama32
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text, expected in vocab_test_vectors("llama-bpe"):
        assert reference.encode(text, add_special_tokens=False) == expected, text
    assert reference.encode("hi")[0] == 128000


def test_llama32_gguf_config_rope_and_eos(llama32: tuple[torch.nn.Module, Path, Path]) -> None:
    hf, _, path = llama32
    config = load_hf_config(ModelConfig(model=str(path)))
    assert config.rope_parameters == hf.config.rope_parameters == LLAMA3_ROPE
    assert _facts(config) == _facts(hf.config)
    tok = load_tokenizer(ModelConfig(model=str(path)))
    assert tok.eos_token_ids == set(LLAMA3_EOS)


def _long_text() -> str:
    """~1,700 tokens of llama.cpp's test texts, with text that looks like special tokens."""
    pieces = [text for text, _ in vocab_test_vectors("llama-bpe")]
    return " Cửa Việt <|endoftext|> <|end_of_text|> ".join(pieces * 2)


def test_llama32_gguf_tokenizes_as_the_hf_original(
        llama32: tuple[torch.nn.Module, Path, Path]) -> None:
    _, hf_dir, path = llama32
    ours = load_tokenizer(ModelConfig(model=str(path)))
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in ("Cửa Việt", "<|endoftext|>", "a<|eot_id|>b<|eom_id|>", _long_text()):
        ids = ours.encode(text)
        assert ids == reference.encode(text), text[:40]
        assert max(ids) < ours.vocab_size == hf_dir_vocab_size(hf_dir)
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def hf_dir_vocab_size(hf_dir: Path) -> int:
    return int(json.loads((hf_dir / "config.json").read_text())["vocab_size"])


def test_llama32_gguf_greedy_equals_transformers_on_a_long_prompt(
        llama32: tuple[torch.nn.Module, Path, Path]) -> None:
    """The issue's case: a long prompt through the F16 GGUF in float32; greedy tokens equal
    transformers' on the HF original from the first one (the llama3 RoPE is applied)."""
    import heron

    hf, hf_dir, path = llama32
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompt_ids = reference.encode(_long_text())
    assert 1000 < len(prompt_ids) < 2000
    llm = heron.LLM(model=str(path), dtype="float32", quantization="none", max_model_len=2048,
                    kv_cache_memory="16MiB")
    params = heron.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    [output] = llm.generate([_long_text()], params)
    assert list(output.prompt_token_ids) == prompt_ids
    assert list(output.outputs[0].token_ids) == argmax_continuation(hf, prompt_ids, 8)


def test_llama32_gguf_stops_on_every_eos(llama32: tuple[torch.nn.Module, Path, Path]) -> None:
    """<|end_of_text|>, <|eom_id|> and <|eot_id|> each end generation (pushed to the top by
    logit_bias); another control token does not."""
    import heron

    _, _, path = llama32
    llm = heron.LLM(model=str(path), dtype="float32", quantization="none", max_model_len=256,
                    kv_cache_memory="4MiB")
    for token_id in (*LLAMA3_EOS, 128002):
        params = heron.SamplingParams(max_tokens=4, temperature=0, logit_bias={token_id: 100.0})
        [output] = llm.generate(["Hello"], params)
        finished = output.outputs[0]
        assert finished.token_ids[0] == token_id
        assert finished.finish_reason == ("length" if token_id == 128002 else "stop"), token_id
