"""Prepared weights: a GGUF model's final tensors, written once and memory-mapped on later starts.

By default (``quantization="gguf"``) nothing is prepared: the file's blocks are the weights
(``gguf_native``) and the file itself is mapped. Where the user asks for other weights
(``none``: float, ``int8`` / ``int4``: re-quantized copies), serving a GGUF file takes three
passes over its weights: dequantize every tensor to the
model's dtype, build an int8 (or int4) copy of every projection (``quantize_model``), and on
CPUs without native bf16 turn some projections back to float32 (``keep_float32_weights``).
For the default model that is ~4 s of a ~10 s start. The result depends only on the file and
on a few settings (``WeightRecipe``), so the first start saves it in the file's cache entry
and later starts map it back with safetensors (no pickle), in well under a second::

    <cache root>/v<CACHE_FORMAT>/<sha256 of the GGUF>/prepared/<recipe key>.safetensors
        <parameter name>                       every parameter once (tied ones under the first name)
        <module>.quantized.codes / .scales     a Q8Weight
        <module>.quantized.packed / .scales_and_zeros   a PackedWeight
        metadata "recipe": the WeightRecipe as JSON; "quantized": {module: kind, parts, max_rows}

The recipe key hashes every input that changes a tensor (dtype, quantization, the CPU features
that pick the kernel layout and row limits, the instruction sets of heron's kernel variant and
of PyTorch's kernels (PyTorch packs int4 weights differently for AVX-512 and AVX2), the torch
version, the source of the code that computes the tensors), so a change to any of them writes
a new file instead of trusting an old one: a cache shared between machines, or read under
``HERON_CPU_ISA`` / ``ATEN_CPU_CAPABILITY`` settings other than the writer's, is never misread. Files are written atomically; one that cannot be read or does not fit the model is
skipped with a warning and the model loads the slow way (and rewrites it). The newest
``_KEEP_FILES`` files of an entry are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from heron.cache import atomic_write
from heron.config import ModelConfig
from heron.heap import transparent_huge_pages
from heron.kernels.cpu import cpu_flags, has_native_bf16, load_engine_kernels, q8_gemm
from heron.kernels.cpu.gguf import gguf_kernels
from heron.kernels.cpu.isa import selected_variant
from heron.layers.linear import Linear, LMHead, keep_float32_weights
from heron.layers.quant import PackedWeight, Q8Weight, QuantizedWeight, quantize_model
from heron.loader import (
    LoadedModel,
    ModelSource,
    build_model,
    checkpoint_names,
    load_model,
    resolve_source,
)
from heron.loader.gguf_arch import is_fast_arch
from heron.loader.gguf_native import load_gguf_native
from heron.progress import track

logger = logging.getLogger(__name__)

PREPARED_VERSION = 1  # bump when the file layout above changes
GGUF_BLOCKS = "gguf"  # the quantization that keeps a GGUF file's blocks (never prepared)
FALLBACK_QUANTIZATION = "int8"  # where the blocks cannot be the weights
_KEEP_FILES = 4  # prepared files kept per GGUF entry (different dtypes, quantizations, heron versions)
# The code that computes the prepared tensors or names the parameters they fill (the model
# files): a change to any of these files changes the key.
_PRODUCERS = ("loader/gguf.py", "loader/gguf_arch.py", "loader/gguf_file.py", "loader/weights.py",
              "layers/quant.py", "layers/linear.py", "models/*.py")
_HERON_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class WeightRecipe:
    """Everything besides the checkpoint that decides a model's prepared tensors."""

    dtype: str  # the parameters' dtype, e.g. "bfloat16"
    quantization: str  # "none", "int8" or "int4"
    keep_float32: bool  # projections the quantized copy does not fully serve go float32
    q8_kernel: bool  # int8 copies are Q8Weights (heron's kernel loaded), else PackedWeights
    amx: bool  # decides the default row limit of a Q8Weight
    cpu_isa: str  # heron's kernel variant (``heron.kernels.cpu.isa``): avx512, avx2vnni, avx2, portable, none
    torch_isa: str  # PyTorch's CPU capability: its int4 pack layout differs per instruction set
    torch_version: str  # PyTorch's int4 pack layout may change between versions
    code: str  # hash of the source files in ``_PRODUCERS``

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(f"{PREPARED_VERSION}:{text}".encode()).hexdigest()[:24]


def weight_recipe(dtype: torch.dtype, device: torch.device, quantization: str) -> WeightRecipe:
    """The recipe ``prepare_weights`` follows on this machine."""
    code = hashlib.sha256()
    for pattern in _PRODUCERS:
        for path in sorted(_HERON_DIR.glob(pattern)):
            code.update(path.read_bytes())
    return WeightRecipe(
        dtype=str(dtype).removeprefix("torch."), quantization=quantization,
        keep_float32=device.type == "cpu" and dtype == torch.bfloat16 and not has_native_bf16(),
        q8_kernel=quantization == "int8" and q8_gemm() is not None,
        amx="amx_bf16" in cpu_flags(), cpu_isa=selected_variant(),
        torch_isa=torch.backends.cpu.get_cpu_capability(), torch_version=torch.__version__,
        code=code.hexdigest()[:16])


def prepare_weights(model: nn.Module, recipe: WeightRecipe) -> int:
    """The passes after loading: quantized copies, then float32 projections where the recipe
    says so. Returns the bytes the quantized copies add."""
    added = quantize_model(model, recipe.quantization)
    if recipe.keep_float32:
        keep_float32_weights(model)  # large batches: float32 GEMMs are the fast ones there
    return added


def load_prepared_model(model_config: ModelConfig, device: torch.device, dtype: torch.dtype,
                        quantization: str) -> tuple[LoadedModel, int]:
    """The model loaded and prepared (see ``prepare_weights``); for GGUF files on CPU through
    the prepared-weights cache. Returns it with the bytes its quantized copies take."""
    dummy = model_config.load_format == "dummy"
    source = resolve_source(model_config.model, download_weights=not dummy)
    if quantization == GGUF_BLOCKS:
        native = None if dummy else _load_native(model_config, source, device, dtype)
        if native is not None:
            return native
        quantization = FALLBACK_QUANTIZATION
    if dummy or not source.is_gguf or device.type != "cpu":
        loaded = load_model(model_config, device, dtype)
        return loaded, prepare_weights(loaded.model, weight_recipe(dtype, device, quantization))
    recipe = weight_recipe(dtype, device, quantization)
    path = prepared_path(source, recipe)
    if path.is_file():
        try:
            return _load_cached(source, path, recipe, device, dtype)
        except Exception as err:  # any unreadable or mismatched file: the slow path rebuilds it
            logger.warning("prepared weights %s not usable (%s: %s); loading from the GGUF file",
                           path, type(err).__name__, err)
    loaded = load_model(model_config, device, dtype)
    added = prepare_weights(loaded.model, recipe)
    _save(loaded.model, recipe, path)
    return loaded, added


def _load_native(model_config: ModelConfig, source: ModelSource, device: torch.device,
                 dtype: torch.dtype) -> tuple[LoadedModel, int] | None:
    """The model with the GGUF file's blocks as its weights (``gguf_native``: nothing to
    prepare, nothing cached); None where that cannot be (no kernels, not a GGUF file heron
    converts itself, not CPU), with the reason logged."""
    kernels = gguf_kernels()
    reason = ("not a GGUF file" if not source.is_gguf else "not on CPU" if device.type != "cpu"
              else "no CPU kernels (see above)" if kernels is None
              else "an architecture converted by transformers" if not is_fast_arch(source.gguf.file)
              else None)
    if reason is not None or kernels is None:
        logger.warning("GGUF blocks cannot be the weights (%s): re-quantizing to %s instead",
                       reason, FALLBACK_QUANTIZATION)
        return None
    loaded = build_model(source, device, dtype, source.gguf.light_config())
    exact = model_config.dtype == "float32"  # asked for: float32 activations, exact products
    in_memory = model_config.gguf_memory == "copy" or (
        model_config.gguf_memory == "auto" and transparent_huge_pages())
    if in_memory:
        load_engine_kernels()  # compiled before the blocks take memory (a first start's peak)
    mapped = load_gguf_native(loaded.model, source.gguf, checkpoint_names(loaded.model), dtype,
                              exact, kernels, in_memory)
    return loaded, mapped


def prepared_path(source: ModelSource, recipe: WeightRecipe) -> Path:
    """Where the prepared tensors of ``source`` under ``recipe`` live."""
    return source.gguf.cache.directory / "prepared" / f"{recipe.key()}.safetensors"


# ----------------------------------------------------------------------------- reading


def _load_cached(source: ModelSource, path: Path, recipe: WeightRecipe, device: torch.device,
                 dtype: torch.dtype) -> tuple[LoadedModel, int]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if json.loads(metadata.get("recipe", "null")) != asdict(recipe):
        raise ValueError("the file was written for another recipe")
    tensors = load_file(str(path))  # memory-mapped: pages are read as the model touches them
    loaded = build_model(source, device, dtype, source.gguf.light_config())
    _assign_parameters(loaded.model, tensors)
    added = _assign_quantized(loaded.model, json.loads(metadata["quantized"]), tensors)
    if tensors:
        raise ValueError(f"{len(tensors)} tensors the model has no place for, e.g. {next(iter(tensors))!r}")
    os.utime(path)  # recently used: kept by _remove_old
    logger.info("prepared weights loaded from %s", path)
    return loaded, added


def _assign_parameters(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Point every parameter at its tensor (tied parameters are one object: assigned once)."""
    params = list(model.named_parameters())
    for name, param in track(params, "reading prepared weights", unit="tensor"):
        tensor = tensors.pop(name, None)
        if tensor is None:
            raise ValueError(f"parameter {name!r} missing")
        if tensor.shape != param.shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(tensor.shape)}, the model "
                             f"expects {tuple(param.shape)}")
        param.data = tensor  # its dtype included: float32 where keep_float32 put it


def _assign_quantized(model: nn.Module, specs: dict[str, dict], tensors: dict[str, torch.Tensor]) -> int:
    added = 0
    for module_name, spec in specs.items():
        module = model.get_submodule(module_name)
        if not isinstance(module, (Linear, LMHead)):
            raise ValueError(f"{module_name!r} takes no quantized copy")
        prefix = f"{module_name}.quantized."
        quantized = _quantized(spec, {field: tensors.pop(prefix + field)
                                      for field in _FIELDS[spec["kind"]]})
        module.quantized = quantized
        added += quantized.nbytes
    return added


_FIELDS = {"q8": ("codes", "scales"), "packed": ("packed", "scales_and_zeros")}


def _quantized(spec: dict, fields: dict[str, torch.Tensor]) -> QuantizedWeight:
    max_rows = int(spec["max_rows"])
    if spec["kind"] == "q8":
        return Q8Weight(codes=fields["codes"], scales=fields["scales"], max_rows=max_rows)
    return PackedWeight(packed=fields["packed"], scales_and_zeros=fields["scales_and_zeros"],
                        parts=int(spec["parts"]), max_rows=max_rows)


# ----------------------------------------------------------------------------- writing


def _save(model: nn.Module, recipe: WeightRecipe, path: Path) -> None:
    """Write the prepared tensors (atomically); a failure costs only the next start's time."""
    from safetensors.torch import save_file

    tensors = {name: param.data for name, param in model.named_parameters()}
    specs: dict[str, dict] = {}
    for module_name, module in model.named_modules():
        quantized = getattr(module, "quantized", None)
        if quantized is None:
            continue
        kind = "q8" if isinstance(quantized, Q8Weight) else "packed"
        specs[module_name] = {"kind": kind, "max_rows": quantized.max_rows,
                              "parts": getattr(quantized, "parts", 1)}
        tensors.update({f"{module_name}.quantized.{field}": getattr(quantized, field)
                        for field in _FIELDS[kind]})
    metadata = {"recipe": json.dumps(asdict(recipe)), "quantized": json.dumps(specs)}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        _remove_old(path.parent)
    except (OSError, ValueError, RuntimeError) as err:
        logger.warning("prepared weights not cached (%s: %s)", type(err).__name__, err)


def _remove_old(directory: Path) -> None:
    """Keep the ``_KEEP_FILES`` most recently used prepared files of an entry."""
    files = sorted(directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[_KEEP_FILES:]:
        old.unlink(missing_ok=True)
