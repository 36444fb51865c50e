"""MPT GGUF files (``general.architecture == "mpt"``): the ``MptConfig`` dict of the file.

transformers' GGUF loader has no MPT; llama.cpp's converter (``MPTModel``) writes these keys,
which heron reads as llama.cpp does:

==========================================  ===============================================
GGUF                                        MptConfig
==========================================  ===============================================
mpt.context_length                          max_seq_len
mpt.embedding_length                        d_model
mpt.block_count                             n_layers
mpt.attention.head_count                    n_heads
mpt.attention.layer_norm_epsilon            layer_norm_epsilon
mpt.attention.max_alibi_bias                attn_config.alibi_bias_max (0: no ALiBi)
mpt.attention.clamp_kqv                     attn_config.clip_qkv
rows of ``token_embd`` (else the tokens)    vocab_size
rows of ``blk.0.ffn_up`` / d_model          expansion_ratio (the converter writes 4 * d_model
                                            as the feed-forward length, whatever the model)
no ``output.weight``                        tie_word_embeddings
==========================================  ===============================================

Variants llama.cpp runs and heron's MPT model does not are refused here, by name: learned
positions instead of ALiBi (``position_embd``), grouped key/value heads (``head_count_kv``),
q/k LayerNorms (``attn_q_norm`` / ``attn_k_norm``), biases (a model with ``no_bias=False``) and
activation scales (``ffn_act``).
"""

from __future__ import annotations

from typing import Any

from heron.loader.gguf_file import GGUFFile

_UNSUPPORTED_TENSORS = {
    "position_embd": "learned positions instead of ALiBi",
    "attn_q_norm": "q/k LayerNorms (attn_config.qk_ln)",
    "attn_k_norm": "q/k LayerNorms (attn_config.qk_ln)",
    "ffn_act": "activation scales (ffn_act)",
}


def mpt_config_dict(gguf_file: GGUFFile) -> dict[str, Any]:
    """The ``MptConfig`` dict of an MPT file; ValueError naming a variant heron cannot run."""
    meta = gguf_file.metadata
    shapes = {info.name: info.shape for info in gguf_file.tensors}
    _check_supported(gguf_file)
    d_model = int(meta["mpt.embedding_length"])
    heads = int(meta["mpt.attention.head_count"])
    max_bias = float(meta.get("mpt.attention.max_alibi_bias", 0.0))
    clamp = meta.get("mpt.attention.clamp_kqv")
    attn_config = {"alibi": True, "alibi_bias_max": int(max_bias), "softmax_scale": None,
                   "clip_qkv": None if clamp is None else float(clamp)}
    return {
        "model_type": "mpt", "d_model": d_model, "n_heads": heads,
        "n_layers": int(meta["mpt.block_count"]),
        "max_seq_len": int(meta["mpt.context_length"]),
        "vocab_size": _vocab_size(gguf_file, shapes),
        "expansion_ratio": _expansion_ratio(gguf_file, shapes, d_model),
        "layer_norm_epsilon": float(meta.get("mpt.attention.layer_norm_epsilon", 1e-5)),
        "no_bias": True, "attn_config": attn_config,
        "tie_word_embeddings": "output.weight" not in shapes,
    }


def _check_supported(gguf_file: GGUFFile) -> None:
    meta = gguf_file.metadata
    reasons = []
    max_bias = float(meta.get("mpt.attention.max_alibi_bias", 0.0))
    if max_bias <= 0.0:
        reasons.append("no ALiBi (mpt.attention.max_alibi_bias is 0 or absent)")
    elif not max_bias.is_integer():  # MptConfig's alibi_bias_max is an int
        reasons.append(f"a fractional mpt.attention.max_alibi_bias ({max_bias})")
    kv_heads = meta.get("mpt.attention.head_count_kv")
    if kv_heads is not None and int(kv_heads) != int(meta["mpt.attention.head_count"]):
        reasons.append(f"grouped key/value heads (head_count_kv {int(kv_heads)})")
    kinds = {_kind(info.name) for info in gguf_file.tensors}
    reasons += sorted({why for kind, why in _UNSUPPORTED_TENSORS.items() if kind in kinds})
    biases = sorted({_kind(info.name) for info in gguf_file.tensors
                     if info.name.endswith(".bias")})
    if biases:
        reasons.append(f"biases (no_bias=False: {', '.join(biases)})")
    if reasons:
        raise ValueError(f"MPT GGUF file {gguf_file.path.name}: heron's MPT does not support "
                         + "; ".join(reasons))


def _kind(name: str) -> str:
    """``blk.3.attn_qkv.bias`` -> ``attn_qkv``; ``position_embd.weight`` -> ``position_embd``."""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]


def _vocab_size(gguf_file: GGUFFile, shapes: dict[str, tuple[int, ...]]) -> int:
    if "token_embd.weight" in shapes:
        return int(shapes["token_embd.weight"][0])
    return len(gguf_file.metadata["tokenizer.ggml.tokens"])  # a vocabulary-only file


def _expansion_ratio(gguf_file: GGUFFile, shapes: dict[str, tuple[int, ...]],
                     d_model: int) -> int:
    up = shapes.get("blk.0.ffn_up.weight")
    inner = int(up[0] if up else gguf_file.metadata["mpt.feed_forward_length"])
    if inner % d_model:
        raise ValueError(f"MPT GGUF: feed-forward size {inner} is no multiple of {d_model}")
    return inner // d_model
