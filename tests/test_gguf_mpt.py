"""An MPT GGUF file loads as the same model as its Hugging Face original.

transformers' GGUF loader has no MPT (config, tokenizer and weights all fail with "GGUF model
with architecture mpt is not supported yet"); heron reads such files itself (``gguf_mpt``).
The files are written the way llama.cpp's converter (``MPTModel``) writes them
(``tests/gguf_files.py``; checked key for key and tensor for tensor against the converter of
llama.cpp's sources), with MPT's real vocabulary (llama.cpp's ``ggml-vocab-mpt.gguf``: GPT-NeoX's
byte-level BPE). 6 heads, not a power of two: the interleaved ALiBi slope order matters.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from heron.config import ModelConfig
from heron.loader import load_hf_config, load_model
from heron.loader.gguf import GGUFModel
from heron.loader.gguf_file import GGUFFile
from heron.tokenizer import load_tokenizer
from tests.gguf_files import DATA, Vocab, vocab_test_vectors, write_gguf
from tests.model_harness import (
    argmax_continuation,
    hf_logits,
    make_hf_model,
    prompt_and_greedy_logits,
)

MPT_VOCAB = DATA / "ggml-vocab-mpt.gguf"
_NEOX_TOKENS = 50277  # GPT-NeoX's tokenizer; the model's 50,432 rows are padded with [PADn]
_CONTROL, _USER_DEFINED = 3, 4


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "heron-cache"
    monkeypatch.setenv("HERON_CACHE_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    # "olmo": what the converter writes for GPT-NeoX's tokenizer today (the hash MPT's shares)
    return Vocab.from_file(MPT_VOCAB).renamed({}, pre="olmo")


def _config(clip_qkv: float | None = None, **extra: object) -> transformers.MptConfig:
    attn = {"alibi": True, "alibi_bias_max": 8, "clip_qkv": clip_qkv}
    return transformers.MptConfig(d_model=48, n_heads=6, n_layers=2, expansion_ratio=4,
                                  max_seq_len=128, vocab_size=50432, attn_config=attn, **extra)


# clip 1/16: a float32 value, as the file stores it
CASES = {"tied": _config, "untied_clip_qkv": lambda: _config(0.0625, tie_word_embeddings=False)}


@pytest.fixture(scope="module", params=list(CASES))
def mpt(request: pytest.FixtureRequest, vocab: Vocab,
        tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    hf = make_hf_model(CASES[request.param](), seed=7)
    return hf, write_gguf(tmp_path_factory.mktemp(request.param) / "model.gguf", hf, vocab)


def test_mpt_gguf_config_equals_the_hf_original(mpt: tuple[torch.nn.Module, Path]) -> None:
    hf, path = mpt
    ours = load_hf_config(ModelConfig(model=str(path)))
    names = ("model_type", "d_model", "n_heads", "n_layers", "expansion_ratio", "max_seq_len",
             "vocab_size", "tie_word_embeddings", "no_bias")
    assert {n: getattr(ours, n) for n in names} == {n: getattr(hf.config, n) for n in names}
    for name in ("alibi", "alibi_bias_max", "clip_qkv", "softmax_scale"):
        assert getattr(ours.attn_config, name) == getattr(hf.config.attn_config, name), name
    assert ours.layer_norm_epsilon == pytest.approx(hf.config.layer_norm_epsilon)
    # the snapshot the engine builds the model from keeps the nested attn_config
    plain = GGUFModel(path).light_config()
    assert plain.attn_config.clip_qkv == hf.config.attn_config.clip_qkv


def test_mpt_gguf_model_computes_the_hf_original(mpt: tuple[torch.nn.Module, Path]) -> None:
    """Logits at every position of a 40-token prompt and 3 decode steps = transformers."""
    hf, path = mpt
    model = load_model(ModelConfig(model=str(path)), torch.device("cpu"), torch.float32).model
    logits, tokens = prompt_and_greedy_logits(model, _NEOX_TOKENS)
    expected = hf_logits(hf, tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    clip = hf.config.attn_config.clip_qkv
    if clip is not None:  # the clamp decides the result: without it the logits differ
        hf.config.attn_config.clip_qkv = None
        for block in hf.transformer.blocks:
            block.attn.clip_qkv = None
        unclipped = hf_logits(hf, tokens)
        for block in hf.transformer.blocks:
            block.attn.clip_qkv = clip
        hf.config.attn_config.clip_qkv = clip
        assert (unclipped - expected).abs().max() > 1e-2


def neox_hf_tokenizer(vocab: Vocab) -> transformers.PreTrainedTokenizerFast:
    """The HF original's tokenizer, laid out as GPT-NeoX's tokenizer.json (MPT's): NFC, GPT-2's
    byte-level split, <|endoftext|> / <|padding|> special, the runs of spaces added tokens."""
    tokens = vocab.tokens[:_NEOX_TOKENS]
    types = list(vocab.metadata["tokenizer.ggml.token_type"])[:_NEOX_TOKENS]
    merges = [tuple(m.split(" ", 1)) for m in vocab.metadata["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=True)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.mark.parametrize("pre", ["mpt", "olmo"])
def test_mpt_gguf_tokenizer_passes_llama_cpp_vectors(pre: str, tmp_path: Path) -> None:
    """Both names the converter has written for GPT-NeoX's tokenizer; no BOS added; the
    stand-in for the HF original passes the same vectors."""
    vocab = Vocab.from_file(MPT_VOCAB).renamed({}, pre=pre)
    path = MPT_VOCAB
    if pre != "mpt":
        path = tmp_path / f"vocab-{pre}.gguf"
        writer = gguf.GGUFWriter(str(path), "mpt")
        for key, value in GGUFFile.read(MPT_VOCAB).metadata.items():  # MPT 7B's hparams
            if key.startswith("mpt."):
                (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
        vocab.write(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
    reference = neox_hf_tokenizer(vocab)
    tok = load_tokenizer(ModelConfig(model=str(path)))
    for text, expected in vocab_test_vectors("mpt"):
        assert tok.encode(text, add_special_tokens=False) == expected, text
        assert reference.encode(text, add_special_tokens=False) == expected, text
        assert tok.decode(expected) == text, text
    assert tok.encode("hi") == [5801]
    assert tok.eos_token_ids == {0}


def test_mpt_gguf_greedy_equals_transformers(mpt: tuple[torch.nn.Module, Path],
                                             vocab: Vocab) -> None:
    """End to end through ``heron.LLM`` from the file's own blocks (the engine's default): the
    HF original's prompt ids and its greedy tokens."""
    import heron

    hf, path = mpt
    text = "Hello world, this is  a test of MPT   in GGUF.\n"
    prompt_ids = neox_hf_tokenizer(vocab).encode(text)
    llm = heron.LLM(model=str(path), dtype="float32", max_model_len=128, kv_cache_memory="4MiB")
    params = heron.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    [output] = llm.generate([text], params)
    assert list(output.prompt_token_ids) == prompt_ids
    assert list(output.outputs[0].token_ids) == argmax_continuation(hf, prompt_ids, 8)


# ---------------------------------------------------------------------------- refused variants


def _refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vocab: Vocab,
             extra: list[str], keys: dict[str, float]) -> str:
    """The error loading a file of the tiny model with ``extra`` tensors and the
    ``mpt.attention.*`` ``keys`` set (floats as float32, ints as uint32)."""
    import tests.gguf_files as files

    tensors, hparams = files._tensors, files._write_mpt_hparams

    def write_hparams(writer: gguf.GGUFWriter, config: object) -> None:
        hparams(writer, config)
        for key, value in keys.items():
            add = writer.add_float32 if isinstance(value, float) else writer.add_uint32
            add(f"mpt.attention.{key}", value)  # overwrites the key, if written

    monkeypatch.setattr(files, "_write_mpt_hparams", write_hparams)
    monkeypatch.setattr(files, "_tensors", lambda model, arch: tensors(model, arch) + [
        (name, np.zeros(48, np.float32)) for name in extra])
    path = write_gguf(tmp_path / "variant.gguf", make_hf_model(_config(), seed=0), vocab)
    with pytest.raises(ValueError) as error:
        load_hf_config(ModelConfig(model=str(path)))
    return str(error.value)


@pytest.mark.parametrize(("extra", "keys", "reason"), [
    ([], {"max_alibi_bias": 0.0}, "no ALiBi (mpt.attention.max_alibi_bias is 0 or absent)"),
    ([], {"max_alibi_bias": 8.5}, "a fractional mpt.attention.max_alibi_bias (8.5)"),
    ([], {"head_count_kv": 2}, "grouped key/value heads (head_count_kv 2)"),
    (["position_embd.weight"], {}, "learned positions instead of ALiBi"),
    (["blk.0.attn_q_norm.weight"], {}, "q/k LayerNorms (attn_config.qk_ln)"),
    (["blk.0.attn_qkv.bias", "blk.1.ffn_up.bias"], {}, "biases (no_bias=False: attn_qkv, ffn_up)"),
    (["blk.0.ffn_act.scales"], {}, "activation scales (ffn_act)"),
])
def test_mpt_variants_heron_cannot_run_are_refused_by_name(
        extra: list[str], keys: dict[str, float], reason: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, vocab: Vocab) -> None:
    message = _refused(tmp_path, monkeypatch, vocab, extra, keys)
    assert message == f"MPT GGUF file variant.gguf: heron's MPT does not support {reason}"
