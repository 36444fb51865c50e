"""Loading a GGUF model with its quantized tensors kept as the file's blocks: the only copy.

Every projection, embedding and LM head whose checkpoint tensors include a quantized one gets
a ``GGUFWeight`` over views of the file's blocks, memory-mapped or read once into memory on
huge pages (``--gguf-memory``; its float ``weight`` becomes a meta tensor: no memory); a fused module (q/k/v, gate/up) gets one part per tensor, whatever their
formats (a float part is read as its F32/F16/BF16 rows). llama.cpp's q/k row permutation is
undone by reading the rows in another order (``BlockRows.row_ids``), not by moving them. A
tied LM head multiplies with its embedding's ``GGUFWeight``. Everything else (norms, biases,
modules whose tensors are all float) is loaded as before, in the model's dtype::

    token_embd.weight  Q8_0  -> model.embed_tokens.quantized (rows looked up), lm_head too
    blk.0.attn_q/k/v   Q5_0, Q5_0, Q8_0 -> model.layers.0.self_attn.qkv_proj.quantized (3 parts)
    blk.0.attn_norm    F32   -> model.layers.0.input_layernorm.weight (a tensor, as before)
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from heron.kernels.cpu.gguf import BLOCK_FORMATS, FLOAT_FORMATS, BlockRows, GGUFKernels
from heron.layers.gguf_weight import GGUFWeight
from heron.layers.linear import Embedding, Linear, LMHead, MergedLinear, use_only_quantized
from heron.loader.gguf import GGUFModel
from heron.loader.gguf_arch import fix_config, fix_tensor, fixes_values, gguf_to_hf_names
from heron.loader.gguf_file import TensorInfo
from heron.loader.weights import load_weights, resolve
from heron.models.base import WeightMapping

logger = logging.getLogger(__name__)

_BLOCK_TYPES = frozenset(type_id for type_id, _, _ in BLOCK_FORMATS.values())
_FLOAT_TYPES = frozenset(type_id for type_id, _, _ in FLOAT_FORMATS.values())


@dataclass(frozen=True)
class _Tensor:
    """One file tensor bound for a shard (or the whole) of a module's weight."""

    hf_name: str
    shard: int | None
    info: TensorInfo


def load_gguf_native(model: nn.Module, gguf_model: GGUFModel, checkpoint_names: list[str],
                     dtype: torch.dtype, exact: bool, kernels: GGUFKernels,
                     in_memory: bool = False) -> int:
    """Fill ``model`` (built in ``dtype``) from the file, quantized tensors as blocks (mapped,
    or ``in_memory``: read into memory on huge pages, see ``GGUFFile.block_rows``); returns the
    bytes of the file that ``GGUFWeight``s read."""
    file = gguf_model.file
    config = fix_config(file)
    mapping = gguf_to_hf_names(file, checkpoint_names, int(config["num_hidden_layers"]))
    gguf_model.report_unused(checkpoint_names, type(model).__name__, mapping)
    weight_mapping: WeightMapping = getattr(model, "weight_mapping", WeightMapping())
    by_module = _weights_by_module(model, file.tensors, mapping, weight_mapping)
    mapped, provided, native_names = 0, [], set()
    unread: set[str] = set()  # formats heron's kernels do not read: those modules dequantized
    for module_name, tensors in by_module.items():
        module = model.get_submodule(module_name)
        if not isinstance(module, (Linear, LMHead, Embedding)) or not _keeps_blocks(module, tensors):
            unread |= {t.info.ggml_type.name for t in tensors
                       if int(t.info.ggml_type) not in _BLOCK_TYPES | _FLOAT_TYPES}
            continue
        parts = [_block_rows(gguf_model, t.info, config, in_memory)
                 for t in sorted(tensors, key=_shard_order)]
        weight = GGUFWeight(parts, module.weight.shape[1], exact, kernels, mapped=not in_memory)
        _check_rows(module_name, module, weight)
        tied = [head for head in model.modules()
                if isinstance(head, LMHead) and head.weight is module.weight]
        use_only_quantized(module, weight)
        for head in tied:  # the head reads the embedding's blocks: the same object
            head.weight, head.quantized = module.weight, weight
        mapped += weight.nbytes
        provided.append(f"{module_name}.weight")
        native_names |= {t.hf_name for t in tensors}
    rest = [name for name in mapping.values() if name not in native_names]
    load_weights(model, gguf_model.weights(rest, dtype), provided=provided)
    logger.info("GGUF blocks kept as weights: %d modules, %.0f MiB of the file %s (%s mode)",
                len(provided), mapped / 2**20,
                "read into memory on 2 MiB pages" if in_memory else "mapped",
                "exact float32" if exact else "int8 activations")
    if unread:
        logger.warning("GGUF tensors of type %s are dequantized to %s (heron's kernels read %s)",
                       ", ".join(sorted(unread)), dtype, ", ".join(BLOCK_FORMATS))
    return mapped


def _weights_by_module(model: nn.Module, tensors: tuple[TensorInfo, ...], mapping: dict[str, str],
                       weight_mapping: WeightMapping) -> dict[str, list[_Tensor]]:
    """The file's tensors that fill a ``weight`` parameter, grouped by module."""
    grouped: dict[str, list[_Tensor]] = defaultdict(list)
    for info in tensors:
        hf_name = mapping.get(info.name)
        if hf_name is None or _ignored(hf_name, weight_mapping):
            continue
        param_name, shard = resolve(hf_name, weight_mapping)
        module_name, _, leaf = param_name.rpartition(".")
        if leaf == "weight":
            grouped[module_name].append(_Tensor(hf_name, shard, info))
    return grouped


def _ignored(hf_name: str, weight_mapping: WeightMapping) -> bool:
    return any(re.search(pattern, hf_name) for pattern in weight_mapping.ignored)


def _keeps_blocks(module: Linear | LMHead | Embedding, tensors: list[_Tensor]) -> bool:
    """A module keeps the blocks where one of its tensors is quantized and all are readable."""
    types = {int(t.info.ggml_type) for t in tensors}
    if not types & _BLOCK_TYPES or not types <= _BLOCK_TYPES | _FLOAT_TYPES:
        return False
    if isinstance(module, Embedding):
        return len(tensors) == 1
    if isinstance(module, MergedLinear):
        return sorted(_shard_order(t) for t in tensors) == list(range(module.num_shards))
    return len(tensors) == 1


def _shard_order(tensor: _Tensor) -> int:
    return 0 if tensor.shard is None else tensor.shard


def _block_rows(gguf_model: GGUFModel, info: TensorInfo, config: dict,
                in_memory: bool) -> BlockRows:
    """The tensor's rows in the file; llama.cpp's row permutations undone by ``row_ids``."""
    data = gguf_model.file.block_rows(info, in_memory)
    if fixes_values(gguf_model.file, info.name):
        raise ValueError(f"{info.name}: a value fix cannot be applied to blocks")
    ids = torch.arange(data.shape[0])
    moved = fix_tensor(gguf_model.file, info.name, ids, config)
    return BlockRows(data, int(info.ggml_type), None if torch.equal(moved, ids) else moved.contiguous())


def _check_rows(module_name: str, module: Linear | LMHead | Embedding, weight: GGUFWeight) -> None:
    expected = tuple(module.weight.shape)
    if (weight.out_features, weight.in_features) != expected:
        raise ValueError(f"{module_name}: the file's tensors make a [{weight.out_features}, "
                         f"{weight.in_features}] weight, the model expects {list(expected)}")

