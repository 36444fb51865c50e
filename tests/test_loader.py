"""heron.loader: sources, HF directories, GGUF files (tiny and the default model), the cache.

The tiny tests build a random Llama in transformers and save it either with save_pretrained
or as a GGUF file written here the way llama.cpp's converter does (q/k rows permuted, some
tensors Q8_0), then check heron against transformers loading the very same files.
The ``slow`` tests load the default Gemma 3 270M GGUF and its transformers reference.
(The default model's tokenizer against transformers' is in test_tokenizer.py.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from heron import cache as heron_cache
from heron.cache import CACHE_FORMAT, cache_root, entry_dir, file_sha256
from heron.config import ModelConfig
from heron.loader import (
    hf_reference_path,
    load_hf_config,
    load_model,
    model_display_name,
    resolve_source,
)
from heron.loader.default_model import DEFAULT_MODEL_NAME, locate_default_model
from heron.loader.gguf import GGUFModel
from heron.loader.gguf_file import GGUFFile, dequantize
from heron.loader.safetensors import find_safetensors_files, iter_safetensors
from heron.tokenizer import load as heron_tokenizer_load
from heron.tokenizer import load_tokenizer
from heron.tokenizer.gguf_vocab import build_gguf_tokenizer, derive_merges

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|im_end|>{% endfor %}"
# gguf_pooling_type: heron's record of llama.cpp's pooling type (a reranker's RANK), which
# transformers' config does not carry
SKIP_CONFIG_KEYS = {"transformers_version", "_name_or_path", "name_or_path", "architectures",
                    "gguf_pooling_type"}


def _tiny_llama_config(vocab_size: int, **extra: object) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, **extra)


def _tiny_llama(config: transformers.LlamaConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so that a wrong norm mapping shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _config_dict(config: transformers.PretrainedConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in SKIP_CONFIG_KEYS}


# ---------------------------------------------------------------------------- sources


def test_unknown_hub_id_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="could not be found in the local Hugging Face cache or "
                                         "downloaded"):
        load_hf_config(ModelConfig(model="Qwen/Qwen2.5-0.5B"))


@pytest.mark.parametrize("name", ["/no/such/dir", "./missing.gguf", "missing.gguf", "a b c"])
def test_missing_paths_are_clear_errors(name: str) -> None:
    with pytest.raises(ValueError, match="not found"):
        resolve_source(name)


def test_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_source(str(path))


def test_display_names() -> None:
    assert model_display_name(ModelConfig()) == DEFAULT_MODEL_NAME == "gemma-3-270m"
    assert model_display_name(ModelConfig(model="/models/x")) == "/models/x"


# ---------------------------------------------------------------------------- HF directories


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    model = _tiny_llama(_tiny_llama_config(256, bos_token_id=1, eos_token_id=2))
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=1, eos_token_id=[2, 7], pad_token_id=0, do_sample=True, temperature=0.6, top_p=0.9)
    model.save_pretrained(path, max_shard_size="100KB")  # several shards and an index
    return path


def test_hf_dir_config_and_generation_config(hf_dir: Path) -> None:
    config = load_hf_config(ModelConfig(model=str(hf_dir)))
    assert config.architectures == ["LlamaForCausalLM"]
    assert _config_dict(config) == _config_dict(transformers.AutoConfig.from_pretrained(hf_dir))
    loaded = load_model(ModelConfig(model=str(hf_dir), load_format="dummy"), torch.device("cpu"),
                        torch.float32)
    assert loaded.generation_config == {"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 0,
                                        "do_sample": True, "temperature": 0.6, "top_p": 0.9}


def test_hf_dir_weights_stream_from_shards(hf_dir: Path) -> None:
    files = find_safetensors_files(hf_dir)
    assert len(files) > 1 and (hf_dir / "model.safetensors.index.json").is_file()
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    streamed = dict(iter_safetensors(files))
    expected = reference.state_dict()
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(streamed[name], tensor), name


def test_hf_dir_without_index_uses_every_shard(hf_dir: Path, tmp_path: Path) -> None:
    for path in find_safetensors_files(hf_dir):
        (tmp_path / path.name).symlink_to(path)
    assert [p.name for p in find_safetensors_files(tmp_path)] == [
        p.name for p in find_safetensors_files(hf_dir)]


def test_load_model_fills_heron_model(hf_dir: Path) -> None:
    loaded = load_model(ModelConfig(model=str(hf_dir)), torch.device("cpu"), torch.bfloat16)
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ref = reference.state_dict()
    params = dict(loaded.model.named_parameters())
    assert not loaded.model.training
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params.values())
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.1.post_attention_layernorm.weight"):
        assert torch.equal(params[name], ref[name].to(torch.bfloat16)), name
    qkv = torch.cat([ref[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(params["model.layers.0.self_attn.qkv_proj.weight"], qkv.to(torch.bfloat16))


def test_load_model_in_a_stand_in_class(hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader alone: transformers' own class as the 'model class', exact float32 copy."""
    import heron.loader as loader

    monkeypatch.setattr(loader, "_model_class", lambda config: transformers.LlamaForCausalLM)
    loaded = load_model(ModelConfig(model=str(hf_dir)), torch.device("cpu"), torch.float32)
    expected = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    got = loaded.model.state_dict()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(got[name], tensor), name
    assert torch.get_default_dtype() == torch.float32  # construction context restored
    assert torch.nn.init.normal_.__name__ == "normal_"


def test_dummy_weights_need_no_files(hf_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
    config = ModelConfig(model=str(tmp_path), load_format="dummy", seed=3)
    first = load_model(config, torch.device("cpu"), torch.float32).model
    second = load_model(config, torch.device("cpu"), torch.float32).model
    params = list(first.parameters())
    assert all(p.abs().max() <= 1e-3 for p in params)
    assert all(p.std() > 1e-4 for p in params if p.numel() > 16)
    for a, b in zip(params, second.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="safetensors"):
        load_model(ModelConfig(model=str(tmp_path)), torch.device("cpu"), torch.float32)
    (tmp_path / "generation_config.json").unlink()  # defaults then come from config.json
    loaded = load_model(config, torch.device("cpu"), torch.float32)
    assert loaded.generation_config == {"bos_token_id": 1, "eos_token_id": 2}


# ---------------------------------------------------------------------------- a tiny GGUF


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: specials, 256 byte tokens, letters and a few merges."""
    tokens = ["<unk>", "<s>", "</s>", "<|im_end|>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
             gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    merged = ["\u2581h", "\u2581he", "\u2581hel", "\u2581hell", "\u2581hello", "\u2581w", "\u2581wo",
              "\u2581wor", "\u2581worl", "\u2581world", "\u2581t", "\u2581th", "\u2581the", "in", "ing"]
    letters = ["\u2581", *"abcdefghijklmnopqrstuvwxyz", *".,!?:"]
    tokens += merged + letters
    types += [gguf.TokenType.NORMAL] * (len(merged) + len(letters))
    scores = [0.0] * 260 + [-float(i) for i in range(len(merged))] + [-100.0] * len(letters)
    return tokens, scores, [int(t) for t in types]


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter stores q/k rows so that rotary pairs are adjacent."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _write_tiny_gguf(path: Path, model: transformers.LlamaForCausalLM, tokens: list[str],
                     scores: list[float], types: list[int],
                     chat_template: str | None = CHAT_TEMPLATE) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, array, qtype in _gguf_tensors(model):
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_tensors(model: transformers.LlamaForCausalLM) -> list[tuple[str, np.ndarray, object]]:
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    f32, q8 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0
    out = [("token_embd.weight", sd["model.embed_tokens.weight"], q8),
           ("output_norm.weight", sd["model.norm.weight"], f32),
           ("output.weight", sd["lm_head.weight"], f32)]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [
            (f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], f32),
            (f"blk.{i}.attn_q.weight", _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], HEADS), f32),
            (f"blk.{i}.attn_k.weight", _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], KV_HEADS), f32),
            (f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], q8),
            (f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], f32),
            (f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], f32),
            (f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], f32),
            (f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], f32),
            (f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], q8),
        ]
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.LlamaForCausalLM]:
    tokens, scores, types = _vocab()
    model = _tiny_llama(_tiny_llama_config(len(tokens)))
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.Q8_0.gguf"
    _write_tiny_gguf(path, model, tokens, scores, types)
    return path, model


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "heron-cache"
    monkeypatch.setenv("HERON_CACHE_DIR", str(root))
    return root


def test_gguf_config_equals_transformers(tiny_gguf: tuple[Path, object], cache_dir: Path) -> None:
    path, _ = tiny_gguf
    config = load_hf_config(ModelConfig(model=str(path)))
    expected = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert config.architectures == ["LlamaForCausalLM"]
    assert _config_dict(config) == _config_dict(expected)
    assert (config.hidden_size, config.num_key_value_heads, config.vocab_size) == (HIDDEN, KV_HEADS,
                                                                              len(_vocab()[0]))


def test_gguf_weights_equal_transformers(tiny_gguf: tuple[Path, transformers.LlamaForCausalLM],
                                         cache_dir: Path) -> None:
    path, original = tiny_gguf
    ours = dict(GGUFModel(path).weights())
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], tensor), name
    exact = original.state_dict()  # F32 tensors round-trip exactly, q/k un-permuted
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.norm.weight", "lm_head.weight"):
        assert torch.equal(ours[name], exact[name]), name
    quantized = ours["model.layers.0.mlp.down_proj.weight"]  # Q8_0: close, not equal
    torch.testing.assert_close(quantized, exact["model.layers.0.mlp.down_proj.weight"],
                               atol=2e-3, rtol=0)
    assert not torch.equal(quantized, exact["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gguf_weights_in_a_smaller_dtype_are_the_float32_ones_cast(
        tiny_gguf: tuple[Path, object], cache_dir: Path, dtype: torch.dtype) -> None:
    path, _ = tiny_gguf
    threads = torch.get_num_threads()
    float32 = dict(GGUFModel(path).weights())
    cast = dict(GGUFModel(path).weights(dtype=dtype))
    assert cast.keys() == float32.keys()
    for name, tensor in float32.items():
        assert cast[name].dtype == dtype and torch.equal(cast[name], tensor.to(dtype)), name
    assert torch.get_num_threads() == threads  # single-threaded only while loading


def test_gguf_weights_only_those_asked_for(tiny_gguf: tuple[Path, object], cache_dir: Path) -> None:
    path, _ = tiny_gguf
    wanted = ["model.layers.1.self_attn.k_proj.weight", "model.norm.weight", "not.a.tensor"]
    assert sorted(name for name, _ in GGUFModel(path).weights(wanted)) == sorted(wanted[:2])


def test_gguf_load_model_in_a_stand_in_class(tiny_gguf: tuple[Path, object], cache_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """load_model asks the GGUF for the model's own parameter names: transformers' class here."""
    import heron.loader as loader

    path, _ = tiny_gguf
    monkeypatch.setattr(loader, "_model_class", lambda config: transformers.LlamaForCausalLM)
    loaded = load_model(ModelConfig(model=str(path)), torch.device("cpu"), torch.float32)
    expected = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_gguf_fused_model_gets_its_shards(tiny_gguf: tuple[Path, object], cache_dir: Path) -> None:
    """heron's Llama fuses q/k/v and gate/up: the checkpoint names it asks for are split back."""
    path, _ = tiny_gguf
    loaded = load_model(ModelConfig(model=str(path)), torch.device("cpu"), torch.float32)
    reference = dict(GGUFModel(path).weights())
    params = dict(loaded.model.named_parameters())
    qkv = torch.cat([reference[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(params["model.layers.1.self_attn.qkv_proj.weight"], qkv)
    gate_up = torch.cat([reference[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(params["model.layers.0.mlp.gate_up_proj.weight"], gate_up)


def test_gguf_cache_is_filled_then_served(tiny_gguf: tuple[Path, object], cache_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = tiny_gguf
    config = ModelConfig(model=str(path))
    first_tok = load_tokenizer(config)
    first = load_model(config, torch.device("cpu"), torch.float32)
    entry = cache_dir / f"v{CACHE_FORMAT}" / file_sha256(path, cache_dir)
    assert entry == entry_dir(file_sha256(path, cache_dir), cache_dir)
    assert {p.name for p in entry.iterdir()} == {"config.json", "generation_config.json",
                                                 "plain_config.json", "tokenizer"}
    assert (entry / "tokenizer" / "tokenizer.json").is_file()
    assert not [p for p in entry.rglob("*.tmp")]

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(heron_tokenizer_load, "build_gguf_tokenizer", no_conversion)
    monkeypatch.setattr(GGUFModel, "_prepare_metadata", no_conversion)
    second = load_model(config, torch.device("cpu"), torch.float32)
    second_tok = load_tokenizer(config)
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert second.generation_config == first.generation_config
    texts = ["hello world, the thing 中!", " <|im_end|>ing\n", "ünï 😀"]
    for text in texts:  # built (first start) and reloaded (later starts) tokenizers agree
        assert second_tok.encode(text) == first_tok.encode(text)
        assert second_tok.decode(first_tok.encode(text)) == first_tok.decode(first_tok.encode(text))
    assert second_tok.special_token_ids == first_tok.special_token_ids
    assert second_tok.eos_token_ids == first_tok.eos_token_ids
    assert second_tok.chat_template == first_tok.chat_template


def test_gguf_cache_of_another_format_is_not_trusted(tiny_gguf: tuple[Path, object],
                                                     cache_dir: Path) -> None:
    path, _ = tiny_gguf
    digest = file_sha256(path, cache_dir)
    legacy = cache_dir / digest  # format 1 kept entries here; a broken one must not be read
    (legacy / "tokenizer").mkdir(parents=True)
    (legacy / "config.json").write_text("{not json")
    (legacy / "tokenizer" / "tokenizer.json").write_text("{")
    config = load_hf_config(ModelConfig(model=str(path)))
    assert config.vocab_size == len(_vocab()[0])
    assert load_tokenizer(ModelConfig(model=str(path))).encode("hello")[0] == 1
    assert (entry_dir(digest, cache_dir) / "config.json").is_file()


def test_gguf_tokenizer_and_generation_config(tiny_gguf: tuple[Path, object],
                                              cache_dir: Path) -> None:
    path, _ = tiny_gguf
    tok = load_tokenizer(ModelConfig(model=str(path)))
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours, theirs = (json.loads(t.backend_tokenizer.to_str()) for t in (tok.hf, reference))
    assert ours["model"] == theirs["model"]  # vocabulary and the merges derived from it
    assert ours["added_tokens"] == theirs["added_tokens"]
    for text in ("hello world", "hello 中 world!", "ünï 😀", "a\n\nb "):
        assert tok.encode(text) == reference.encode(text), text
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True) == text
    # a space goes before the text and after each special token (sentencepiece, llama.cpp),
    # also where the text starts with one (transformers' GGUF path then adds none)
    tokens = _vocab()[0]
    space, the = tokens.index("\u2581"), tokens.index("\u2581the")
    assert tok.encode(" the", add_special_tokens=False) == [space, the]
    assert tok.encode("the<|im_end|>the") == [1, the, 3, the]
    assert tok.decode([space, the]) == " the"
    assert tok.encode("中", add_special_tokens=False)[-3:] == [4 + 0xE4, 4 + 0xB8, 4 + 0xAD]
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>hi<|im_end|>"
    assert tok.eos_token_ids == {2, 3}  # </s> and the <|im_end|> control token
    generation = GGUFModel(path).generation_config()
    assert generation == {"bos_token_id": 1, "eos_token_id": [2, 3]}


def test_gguf_without_chat_template_raises_at_use(tiny_gguf: tuple[Path, object], cache_dir: Path,
                                                  tmp_path: Path) -> None:
    path, model = tiny_gguf
    tokens, scores, types = _vocab()
    bare = tmp_path / "bare.gguf"
    _write_tiny_gguf(bare, model, tokens, scores, types, chat_template=None)
    tok = load_tokenizer(ModelConfig(model=str(bare)))
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------------- GGUF pieces


def test_gguf_metadata_equals_gguf_reader(tiny_gguf: tuple[Path, object]) -> None:
    path, _ = tiny_gguf
    ours = GGUFFile.read(path)
    reader = gguf.GGUFReader(str(path))
    assert list(ours.metadata) == [k for k in reader.fields if not k.startswith("GGUF.")]
    for key, value in ours.metadata.items():
        expected = reader.fields[key].contents()
        assert (value.tolist() if isinstance(value, np.ndarray) else value) == pytest.approx(expected), key
    assert [(t.name, t.ggml_type, t.nbytes) for t in ours.tensors] == [
        (t.name, t.tensor_type, int(t.n_bytes)) for t in reader.tensors]
    for info, tensor in zip(ours.tensors, reader.tensors):
        expected = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
        assert torch.equal(ours.dequantized(info), torch.from_numpy(expected).reshape(info.shape))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"])
def test_dequantize_equals_gguf_py(type_name: str) -> None:
    """Random blocks (any bytes are valid blocks; some scales are inf/nan) of every common type."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 48, 2 * 256
    raw = np.random.default_rng(0).integers(0, 256, rows * cols // block_size * type_size,
                                            dtype=np.uint8)
    with np.errstate(invalid="ignore"):  # inf scale x 0
        expected = gguf.quants.dequantize(raw.reshape(rows, -1), qtype).reshape(rows, cols)
        ours = dequantize(raw, qtype, (rows, cols)).numpy()
    assert ours.dtype == np.float32
    assert np.array_equal(ours, expected, equal_nan=True)


@pytest.mark.parametrize("positions", [True, False])
def test_derived_merges_equal_transformers(positions: bool) -> None:
    """Same merges, same order as transformers' generate_merges (many equal scores here)."""
    from transformers.tokenization_utils_base import generate_merges

    rng = np.random.default_rng(1)
    letters = list("abcde▁")
    words = {"".join(rng.choice(letters, size=rng.integers(1, 6))) for _ in range(400)}
    tokens = letters + sorted(words - set(letters))
    vocab = {token: index for index, token in enumerate(tokens)}
    if positions:  # Gemma: the position is the score
        scores = {token: -float(index) for index, token in enumerate(tokens)}
    else:  # llama: the file's scores, with ties
        scores = {token: float(rng.integers(-5, 0)) for token in tokens}
    assert derive_merges(vocab, scores) == generate_merges(vocab, scores)


def test_other_vocabularies_are_left_to_transformers(tiny_gguf: tuple[Path, object]) -> None:
    path, _ = tiny_gguf
    parsed = GGUFFile.read(path)
    for changes in ({"tokenizer.ggml.model": "gpt2"}, {"tokenizer.ggml.model": "t5"},
                    {"general.architecture": "phi3"}, {"tokenizer.ggml.merges": ["a b"]}):
        other = GGUFFile(path, {**parsed.metadata, **changes}, parsed.tensors)
        assert build_gguf_tokenizer(other) is None, changes
    assert build_gguf_tokenizer(parsed) is not None


def test_file_digest_is_remembered(tmp_path: Path) -> None:
    path = tmp_path / "f.gguf"
    path.write_bytes(b"abc")
    root = tmp_path / "cache"
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_sha256(path, root) == digest
    assert len(list((root / "digests").iterdir())) == 1
    assert file_sha256(path, root) == digest
    path.write_bytes(b"abcd")  # size changes: hashed again
    assert file_sha256(path, root) != digest


def test_atomic_writes_leave_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "entry" / "model.safetensors"

    def crash(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heron_cache.atomic_write(target, crash)
    with pytest.raises(KeyboardInterrupt):
        heron_cache.atomic_write_dir(tmp_path / "entry" / "tokenizer", crash_dir)
    assert list((tmp_path / "entry").iterdir()) == []
    heron_cache.atomic_write_text(target, "ok")
    assert target.read_text() == "ok"
    assert [p.name for p in (tmp_path / "entry").iterdir()] == ["model.safetensors"]


def crash_dir(tmp: Path) -> None:
    (tmp / "tokenizer.json").write_text("{")
    raise KeyboardInterrupt


def test_cache_root_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("HERON_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "heron"


# ---------------------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def default_reference() -> transformers.PreTrainedModel:
    path = locate_default_model().path
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.slow
def test_default_model_weights_equal_transformers(default_reference: transformers.PreTrainedModel) -> None:
    loaded = load_model(ModelConfig(), torch.device("cpu"), torch.float32)
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    from_model = {k: v for k, v in _config_dict(default_reference.config).items()
                  if k not in ("dtype", "quantization_config")}  # set by from_pretrained itself
    assert {k: v for k, v in _config_dict(loaded.hf_config).items() if k != "dtype"} == from_model
    assert loaded.generation_config == {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}
    default = locate_default_model()
    ours = dict(GGUFModel(default.path, default.sha256).weights())
    ref = default_reference.state_dict()
    # Every tensor of the file (Q8_0 embedding, Q5_0 / Q4_K / Q6_K projections, F32 norms with
    # (1 + w) undone); the tied lm_head is the embedding and not in the file.
    assert ours.keys() == ref.keys() - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name
    params = dict(loaded.model.named_parameters())
    assert torch.equal(params["model.norm.weight"], ref["model.norm.weight"])
    assert torch.equal(params["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])
    qkv = torch.cat([ref[f"model.layers.5.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(params["model.layers.5.self_attn.qkv_proj.weight"], qkv)


@pytest.mark.slow
def test_default_model_cold_start_skips_transformers_conversion(
        cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With an empty cache, config, tokenizer and weights of the default model are all built by
    heron: none of transformers' slow GGUF paths (tens of seconds each) runs."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import tokenization_utils_base

    def slow_path(*args: object, **kwargs: object) -> None:
        raise AssertionError("transformers' GGUF conversion ran")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", slow_path)
    monkeypatch.setattr(tokenization_utils_base, "generate_merges", slow_path)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", slow_path)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", slow_path)
    start = time.perf_counter()
    tok = load_tokenizer(ModelConfig())
    loaded = load_model(ModelConfig(), torch.device("cpu"), torch.bfloat16)
    elapsed = time.perf_counter() - start
    assert tok.encode("Hello world") == [2, 9259, 1902]
    assert loaded.generation_config["eos_token_id"] == [1, 106]
    assert elapsed < 60  # ~5 s on 2 busy cores; transformers' path took ~80 s


@pytest.mark.slow
def test_default_model_cache_entry() -> None:
    load_tokenizer(ModelConfig())
    load_model(ModelConfig(), torch.device("cpu"), torch.float32)
    entry = entry_dir(locate_default_model().sha256)
    for name in ("config.json", "generation_config.json", "tokenizer/tokenizer.json",
                 "tokenizer/tokenizer_config.json"):
        assert (entry / name).is_file(), name
    assert json.loads((entry / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    start = time.perf_counter()
    load_tokenizer(ModelConfig())
    assert time.perf_counter() - start < 5.0
    assert hf_reference_path(ModelConfig()) == str(entry)
    assert (entry / "model.safetensors").is_file()  # written for transformers on request only


def test_tokenizer_override_and_missing_tokenizer(hf_dir: Path, tiny_gguf: tuple[Path, object],
                                                  cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="no usable tokenizer") as info:
        load_tokenizer(ModelConfig(model=str(hf_dir)))  # save_pretrained wrote no tokenizer
    assert "pass one with --tokenizer" in str(info.value)
    path, _ = tiny_gguf
    tok = load_tokenizer(ModelConfig(model=str(hf_dir), tokenizer=str(path)))
    assert tok.eos_token_ids == {2, 7}  # the tokenizer's </s> plus the model's generation_config
    assert tok.encode("hello world")[0] == 1
    assert tok.model_max_length == 256
