"""What a GGUF architecture means in Hugging Face terms: config, tensor names, tensor fixes.

This is transformers' legacy GGUF conversion (``load_gguf_checkpoint``) restated for the
architectures heron runs, over metadata already read by ``gguf_file`` (transformers parses
every element of the 262k-entry vocabulary arrays in Python just to build a config):

- config: llama.cpp keys renamed through transformers' own ``GGUF_CONFIG_MAPPING`` table,
  ``tie_word_embeddings`` from the absence of ``output.weight``, ``attention_bias`` / ``mlp_bias``
  from the presence of bias tensors, ``vocab_size`` from the
  vocabulary when the file does not state it, ``gemma3`` -> ``gemma3_text``; plus the RoPE
  scaling (``gguf_rope``), which transformers drops;
- names: GGUF tensor name -> checkpoint name, through gguf-py's ``TensorNameMap`` applied to
  the checkpoint names the model expects;
- fixes: llama.cpp permutes llama's q/k rows (rotary pairs adjacent) and stores Gemma norms
  as ``1 + w``; both are undone here, in float32, as transformers does.

MPT, which transformers' GGUF loader lacks, takes its config from ``gguf_mpt`` instead (its
tensors need no fix). Other architectures are left to transformers (``is_fast_arch`` is False
for them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from heron.loader.gguf_file import GGUFFile
from heron.loader.gguf_mpt import mpt_config_dict
from heron.loader.gguf_rope import rope_config

if TYPE_CHECKING:  # the fixes only call tensor methods: torch itself is never needed here
    import torch

# GGUF architecture -> fix applied to (gguf name, float32 tensor, config dict).
TensorFix = Callable[[str, "torch.Tensor", dict[str, Any]], "torch.Tensor"]
_TOKENS_KEY = "tokenizer.ggml.tokens"
_GGUF_TO_HF_MODEL_TYPE = {"gemma3": "gemma3_text"}  # the file holds the text model only
_GEMMA3_27B_LAYERS = 62  # llama.cpp tells Gemma 3 27B by its layer count
RANK_POOLING = 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK: a reranker, scored by its head
RANK_HEAD = "cls.output.weight"  # the head of such a file: [num_labels, hidden]
# llama.cpp's head tensors of BERT-like rerankers, which no decoder family of its reads
_DENSE_HEAD = ("cls.weight", "cls.bias", "cls.output.bias")


def _unpermute_qk(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (``LlamaTensorProcessor``)."""
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads is None or kv_heads is None:
        return tensor
    if ".attn_q." in name:
        return _reverse_permute(tensor, heads)
    if ".attn_k." in name:
        return _reverse_permute(tensor, kv_heads)
    return tensor


def _reverse_permute(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    rest = tensor.shape[1:]
    half_dim = tensor.shape[0] // heads // 2
    # [heads, half_dim, 2, ...] -> [heads, 2, half_dim, ...]: pairs back to halves
    return tensor.reshape(heads, half_dim, 2, *rest).transpose(1, 2).reshape(tensor.shape)


def _undo_norm_offset(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """Gemma norms are stored as ``1 + w`` (``Gemma2TensorProcessor``)."""
    return tensor - 1 if "norm.weight" in name else tensor


def _no_fix(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    return tensor


# The architectures whose conversion transformers does with its generic rules only.
_TENSOR_FIXES: dict[str, TensorFix] = {
    "llama": _unpermute_qk,
    "qwen2": _no_fix,
    "qwen3": _no_fix,
    "gemma3": _undo_norm_offset,
    "mpt": _no_fix,  # config: gguf_mpt
}


def is_fast_arch(gguf_file: GGUFFile) -> bool:
    """Whether heron converts this file itself (else transformers does, slowly)."""
    arch = gguf_file.architecture
    # A llama file named exactly "mistral" is one too: transformers renames its architecture to
    # "mistral", for which its own weight mapping has no gguf-py name (it fails to load)
    return arch in _TENSOR_FIXES


# ----------------------------------------------------------------------------- config


def hf_config_dict(gguf_file: GGUFFile) -> dict[str, Any]:
    """The config dict ``load_gguf_checkpoint`` returns for this file (``is_fast_arch`` ones),
    with the RoPE scaling it leaves out."""
    from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = gguf_file.architecture
    if arch == "mpt":
        return mpt_config_dict(gguf_file)
    names = {info.name for info in gguf_file.tensors}
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in names}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {}).items():
        config.setdefault(key, value)
    for key, value in gguf_file.metadata.items():
        prefix, _, rest = key.partition(".")
        names_of_prefix: Any = GGUF_CONFIG_MAPPING.get(prefix, {})  # {gguf key: config name}
        renamed = names_of_prefix.get(rest)
        if renamed is not None and renamed != -1:
            config[renamed] = _config_value(value)
    config["model_type"] = _GGUF_TO_HF_MODEL_TYPE.get(config["model_type"], config["model_type"])
    if "vocab_size" not in config and _TOKENS_KEY in gguf_file.metadata:
        config["vocab_size"] = len(gguf_file.metadata[_TOKENS_KEY])
    config.update(_llama_cpp_config(gguf_file, config))
    config.update(rope_config(gguf_file, config))
    return config


def _llama_cpp_config(gguf_file: GGUFFile, config: dict[str, Any]) -> dict[str, Any]:
    """What llama.cpp reads from (or derives for) the file that transformers' table leaves out:
    the head size of any architecture, llama.cpp's pooling type, biases from their tensors, as many key/value heads as
    heads where the file does not say (the config classes' defaults differ: 32 for Qwen2),
    Gemma 3's query scale and final logit softcap."""
    arch, metadata = gguf_file.architecture, gguf_file.metadata
    out: dict[str, Any] = {}
    out.update(_bias_config(gguf_file))
    if "num_key_value_heads" not in config and "num_attention_heads" in config:
        out["num_key_value_heads"] = config["num_attention_heads"]  # llama.cpp's default
    # llama.cpp's pooling type (0: none), so that the engine reads a reranker's head
    # (``rank_head_name``) without opening the file again for every other model
    out["gguf_pooling_type"] = int(_config_value(metadata.get(f"{arch}.pooling_type", 0)))
    key_length = metadata.get(f"{arch}.attention.key_length")
    if key_length is not None and "head_dim" not in config:
        out["head_dim"] = int(key_length)
    if arch == "gemma3":  # queries scaled by 1/sqrt(head size), by 1/sqrt(hidden / heads) in 27B
        head_dim = out.get("head_dim", config.get("head_dim"))
        if config.get("num_hidden_layers") == _GEMMA3_27B_LAYERS or head_dim is None:
            head_dim = config["hidden_size"] // config["num_attention_heads"]
        out["query_pre_attn_scalar"] = head_dim
        softcap = metadata.get(f"{arch}.final_logit_softcapping")
        if softcap:
            out["final_logit_softcapping"] = float(softcap)
    return out


# Architectures whose attention biases are a config flag (``attention_bias``: q, k, v and o),
# and those with an ``mlp_bias`` flag too. No metadata key says it: llama.cpp uses whichever
# bias tensors the file has (Qwen2's q/k/v biases are part of its architecture).
_ATTENTION_BIAS_ARCHS = ("llama", "qwen3", "gemma3")
_MLP_BIAS_ARCHS = ("llama",)


def _bias_config(gguf_file: GGUFFile) -> dict[str, Any]:
    """``attention_bias`` / ``mlp_bias`` where the file has such bias tensors (Llama-architecture
    models with biases, e.g. "llamafied" Qwen or InternLM); ``qkv_bias`` where only q/k/v have
    one (a llamafied Qwen: transformers' Llama has no such flag, heron's does)."""
    arch = gguf_file.architecture
    biases = {info.name.split(".")[-2] for info in gguf_file.tensors if info.name.endswith(".bias")}
    out = {}
    if arch in _ATTENTION_BIAS_ARCHS and "attn_output" in biases:
        out["attention_bias"] = True
    elif arch in _ATTENTION_BIAS_ARCHS and biases & {"attn_q", "attn_k", "attn_v"}:
        out["qkv_bias"] = True  # heron's key (models/llama.py): q/k/v only, Qwen2's layout
    if arch in _MLP_BIAS_ARCHS and biases & {"ffn_gate", "ffn_up", "ffn_down"}:
        out["mlp_bias"] = True
    return out


def _config_value(value: Any) -> Any:
    """A metadata value as transformers' parser gives it: arrays as lists, 1-element ones
    unwrapped."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def rank_head_name(gguf_file: GGUFFile) -> str | None:
    """``RANK_HEAD`` for a reranker file (``<arch>.pooling_type`` RANK, as llama.cpp's converter
    writes Qwen3-Reranker), None for any other file. ValueError for a reranker whose head heron
    cannot run as llama.cpp does: none, or a dense layer or bias before it."""
    arch = gguf_file.architecture
    if _config_value(gguf_file.metadata.get(f"{arch}.pooling_type")) != RANK_POOLING:
        return None
    names = {info.name for info in gguf_file.tensors}
    if RANK_HEAD not in names:
        raise ValueError(f"the file's pooling type is RANK (a reranker) but it has no {RANK_HEAD} "
                         "tensor to score with")
    extra = [name for name in _DENSE_HEAD if name in names]
    if extra:
        raise ValueError(f"this {arch} reranker's head has {', '.join(extra)}, which llama.cpp "
                         f"does not read for {arch} and heron does not serve: only {RANK_HEAD}")
    return RANK_HEAD


# ----------------------------------------------------------------------------- tensors


def gguf_to_hf_names(gguf_file: GGUFFile, hf_names: Iterable[str],
                     num_layers: int) -> dict[str, str]:
    """``{gguf tensor name: checkpoint name}`` for the checkpoint names the model expects."""
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == gguf_file.architecture)
    name_map = gguf.get_tensor_name_map(arch, num_layers)
    mapping = {}
    for hf_name in hf_names:
        base, dot, suffix = hf_name.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, dot, suffix = hf_name, "", ""
        gguf_base = name_map.get_name(base)
        if gguf_base is not None:
            mapping[gguf_base + dot + suffix] = hf_name
    return mapping


def fix_config(gguf_file: GGUFFile) -> dict[str, Any]:
    """What ``fix_tensor`` reads of the config (layer and head counts), straight from the
    file's metadata: the same values ``hf_config_dict`` renames, without importing transformers.
    A file without ``head_count_kv`` (converted from a config without ``num_key_value_heads``,
    as early Llama ones) has as many key/value heads as heads, for llama.cpp and transformers."""
    arch, meta = gguf_file.architecture, gguf_file.metadata
    keys = {"num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
            "num_key_value_heads": "attention.head_count_kv"}
    config = {name: _config_value(meta[f"{arch}.{key}"]) for name, key in keys.items()
              if f"{arch}.{key}" in meta}
    if "num_attention_heads" in config:
        config.setdefault("num_key_value_heads", config["num_attention_heads"])
    return config


def fix_tensor(gguf_file: GGUFFile, name: str, tensor: torch.Tensor,
               config: dict[str, Any]) -> torch.Tensor:
    """Undo what llama.cpp's converter did to tensor ``name`` of this architecture.

    Value fixes (``fixes_values``) must see float32, as transformers computes them; the q/k
    row permutation commutes with a cast and may be given any dtype.
    """
    return _TENSOR_FIXES[gguf_file.architecture](name, tensor, config)


def fixes_values(gguf_file: GGUFFile, name: str) -> bool:
    """Whether ``fix_tensor`` computes on this tensor's values (not just moves them)."""
    return _TENSOR_FIXES[gguf_file.architecture] is _undo_norm_offset and "norm.weight" in name
