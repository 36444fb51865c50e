"""Test helpers: a transformers model written as a GGUF file the way llama.cpp's converter
writes it, and GGUF vocabularies (llama.cpp's vocab-only test files in ``tests/data``, or a
small synthetic one).

    vocab = Vocab.from_file(DATA / "ggml-vocab-llama-bpe.gguf")
    write_gguf(path, hf_model, vocab, float16=True)

What the converter does and this writer does too: hyperparameters under ``{arch}.*`` keys;
RoPE scaling as metadata (linear, YaRN) or as the ``rope_freqs`` tensor (llama3); llama's
q/k rows permuted so that rotary pairs are adjacent; Gemma norms stored as ``1 + w``; no
``output.weight`` when the embedding is tied; 2-D weights in F16 (``float16``) or F32, 1-D
tensors in F32. Mistral is written as ``llama``, as the converter does. MPT as its converter
(``MPTModel``) writes it: ``max_seq_len`` as the context length, 4 * d_model as the feed-forward
length and 1e-5 as the LayerNorm epsilon whatever the config says, ``clip_qkv`` as
``clamp_kqv``, ``alibi_bias_max`` as ``max_alibi_bias``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from heron.loader.gguf_file import GGUFFile

DATA = Path(__file__).parent / "data"
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma3_text": "gemma3", "mpt": "mpt"}
_ARCH_ENUM = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
_SEPARATOR = "\n__ggml_vocab_test__\n"


@dataclass(frozen=True)
class Vocab:
    """A GGUF vocabulary: the ``tokenizer.*`` metadata of a file."""

    metadata: dict[str, Any]

    @classmethod
    def from_file(cls, path: Path) -> Vocab:
        metadata = GGUFFile.read(path).metadata
        return cls({k: v for k, v in metadata.items() if k.startswith("tokenizer.")})

    @property
    def tokens(self) -> list[str]:
        return list(self.metadata["tokenizer.ggml.tokens"])

    def renamed(self, names: dict[int, str], **keys: Any) -> Vocab:
        """The vocabulary with some tokens renamed and some keys (``tokenizer.ggml.<key>``) set."""
        tokens = self.tokens
        for index, name in names.items():
            tokens[index] = name
        extra = {f"tokenizer.ggml.{key}": value for key, value in keys.items()}
        return Vocab({**self.metadata, "tokenizer.ggml.tokens": tokens, **extra})

    def write(self, writer: gguf.GGUFWriter) -> None:
        for key, value in self.metadata.items():
            if isinstance(value, np.ndarray):
                value = value.tolist()
            if isinstance(value, list):
                writer.add_array(key, value)
            elif isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value)
            else:
                writer.add_string(key, value)


def write_vocab_gguf(path: Path, vocab: Vocab, arch: str = "llama") -> Path:
    """A vocabulary-only GGUF (as llama.cpp's ``ggml-vocab-*.gguf``): no tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    vocab.write(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def synthetic_vocab(size: int) -> Vocab:
    """A SentencePiece vocabulary of ``size`` tokens: <unk> <s> </s> <|im_end|>, 256 bytes,
    then pieces."""
    tokens = ["<unk>", "<s>", "</s>", "<|im_end|>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.BYTE] * 256
    pieces = [f"\u2581w{i}" for i in range(size - len(tokens))]
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))]
    return Vocab({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens + pieces,
                  "tokenizer.ggml.scores": scores,
                  "tokenizer.ggml.token_type": [int(t) for t in types] + [1] * len(pieces),
                  "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                  "tokenizer.ggml.unknown_token_id": 0})


def vocab_test_vectors(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors for ``ggml-vocab-<name>.gguf``: (text, ids)."""
    texts = (DATA / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split(_SEPARATOR)
    if texts and texts[-1] == "":
        texts.pop()
    lines = (DATA / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(lines), name
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


# ----------------------------------------------------------------------------- the writer


@dataclass(frozen=True)
class RankHead:
    """A reranker's head as llama.cpp's converter writes it (``Qwen3Model`` with
    ``is_rerank``): ``cls.output.weight`` [num_labels, hidden] (Qwen3-Reranker's: the LM head
    rows of "yes" then "no"), ``<arch>.pooling_type`` RANK and, where given,
    ``<arch>.classifier.output_labels``."""

    rows: np.ndarray | None  # [num_labels, hidden] float32; None: the metadata alone
    labels: tuple[str, ...] = ()
    block_format: str | None = None  # e.g. "Q8_0"; None: F32

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_pooling_type(gguf.PoolingType.RANK)
        if self.labels:
            writer.add_classifier_output_labels(list(self.labels))
        if self.rows is None:
            return
        rows = np.ascontiguousarray(self.rows, dtype=np.float32)
        if self.block_format is None:
            writer.add_tensor("cls.output.weight", rows)
            return
        qtype = gguf.GGMLQuantizationType[self.block_format]
        writer.add_tensor("cls.output.weight", gguf.quants.quantize(rows, qtype), raw_dtype=qtype)


def write_gguf(path: Path, model: nn.Module, vocab: Vocab, float16: bool = False,
               block_format: str | None = None, layers_only: bool = True,
               split_max_tensors: int = 0, small_first_shard: bool = False,
               rank_head: RankHead | None = None) -> Path:
    """``model`` (a transformers causal LM) as a GGUF file at ``path``; returns ``path``.
    ``block_format`` (e.g. "Q8_0"): the layers' 2-D weights (``layers_only=False``: every 2-D
    weight) in that quantized format (see ``round_to_blocks_`` for the model they then stand
    for). ``split_max_tensors``: split into parts of at most that many tensors, as
    ``gguf-split`` does (``small_first_shard``: a first part with the metadata alone); returns
    the first. ``rank_head``: a reranker (a sequence classifier's backbone: its ``score.weight``
    is left out), written as llama.cpp's converter writes Qwen3-Reranker."""
    config = model.config
    arch = GGUF_ARCH[config.model_type]
    writer = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors,
                             small_first_shard=small_first_shard)
    writer.add_name(f"tiny {config.model_type}")
    rope = {} if arch == "mpt" else _full_attention_rope(config)
    if arch == "mpt":
        _write_mpt_hparams(writer, config)
    else:
        _write_hparams(writer, config, arch)
        _write_rope_scaling(writer, rope)
    vocab.write(writer)
    if rank_head is not None:
        rank_head.write(writer)
    for name, array in _tensors(model, arch):
        blocks = block_format is not None and array.ndim == 2
        if blocks and (name.startswith("blk.") or not layers_only):
            qtype = gguf.GGMLQuantizationType[block_format]
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            continue
        writer.add_tensor(name, array.astype(np.float16) if float16 and array.ndim == 2 else array)
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return writer.format_shard_names(path)[0]


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_hparams(writer: gguf.GGUFWriter, config: Any, arch: str) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_full_attention_rope(config)["rope_theta"])
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim(config))
    if arch != "llama" and "head_dim" in config.to_dict():
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if arch == "gemma3":
        writer.add_sliding_window(config.sliding_window)
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _write_mpt_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(4 * config.d_model)
    writer.add_head_count(config.n_heads)
    writer.add_layer_norm_eps(1e-5)
    attn = config.attn_config
    if attn.clip_qkv is not None:
        writer.add_clamp_kqv(attn.clip_qkv)
    writer.add_max_alibi_bias(float(attn.alibi_bias_max) if attn.alibi else 0.0)


def _full_attention_rope(config: Any) -> dict[str, Any]:
    rope = dict(config.rope_parameters)
    return dict(rope.get("full_attention", rope))


def _write_rope_scaling(writer: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
    elif kind not in ("default", "llama3"):  # llama3: the rope_freqs tensor
        raise ValueError(f"no GGUF form for rope_type {kind!r}")


def llama3_rope_freqs(config: Any) -> np.ndarray:
    """[head_dim // 2] float32: the converter's per-frequency divisors for llama3 scaling,
    taken here as transformers' unscaled inv_freq over its llama3 one."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = head_dim(config)
    base = float(_full_attention_rope(config)["rope_theta"])
    plain = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    return (plain / scaled).numpy().astype(np.float32)


def _tensors(model: nn.Module, arch: str) -> list[tuple[str, np.ndarray]]:
    config = model.config
    names = gguf.get_tensor_name_map(_ARCH_ENUM[arch], config.num_hidden_layers)
    out = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if hf_name == "score.weight":  # a sequence classifier's head: ``RankHead``
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = names.get_name(base)
        assert gguf_base is not None, hf_name
        array = tensor.detach().float().numpy()
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            array = _permute(array, config.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            array = _permute(array, config.num_key_value_heads)
        elif arch == "gemma3" and hf_name.endswith("norm.weight"):
            array = array + 1.0
        out.append((f"{gguf_base}.{suffix}", array))
    return out


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows from [half | half] to interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def round_to_float16_(model: nn.Module) -> nn.Module:
    """Round every 2-D weight to float16 in place: an F16 GGUF then holds the very same values."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(param.half().float())
    return model


def round_to_blocks_(model: nn.Module, block_format: str, layers_only: bool = True) -> nn.Module:
    """Replace every 2-D weight of the layers (``layers_only=False``: every 2-D weight) by its
    ``block_format`` blocks dequantized, in place: a GGUF written with ``block_format`` then
    holds exactly these values (blocks of 32 along a row, as a row permutation leaves them)."""
    qtype = gguf.GGMLQuantizationType[block_format]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (".layers." in name or not layers_only) and param.dim() == 2:
                blocks = gguf.quants.quantize(param.numpy(), qtype)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, qtype).copy()))
    return model
