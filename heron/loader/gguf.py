"""GGUF files: config, generation defaults, tokenizer and float32 weights.

Everything comes from the file itself, converted the way transformers converts it
(``AutoConfig`` / ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained(dir,
gguf_file=...)``; the tests hold heron to equality), but without transformers' slow paths:

- metadata: read once by ``gguf_file`` (0.1 s for a 262k-token vocabulary);
- config: ``gguf_arch`` renames the metadata keys the way transformers does;
- tokenizer: built by ``heron.tokenizer`` into this entry's ``tokenizer/`` (~2 s instead of ~30 s);
- weights: dequantized tensor by tensor from the memory-mapped file (~1 s for 270M) under
  the checkpoint names the model asks for, q/k rows un-permuted and Gemma norms corrected.

Architectures and vocabularies heron does not convert itself go to transformers, as before.
The small products are cached (see ``cache`` for the root and the format version)::

    <cache root>/v<CACHE_FORMAT>/<sha256 of the file>/
        config.json             transformers config, ``architectures`` filled in
        plain_config.json       every attribute of that config (``plain_config``: no transformers)
        generation_config.json  bos / eos / pad ids (eos includes end-of-turn tokens)
        tokenizer/              ``save_pretrained`` of the fast tokenizer
        model.safetensors       float32 weights, written only for ``hf_reference_path``
        prepared/               the model's final tensors per recipe (``prepared``)

By default a GGUF model is served from the file's own blocks (``gguf_native``: mapped, never
copied or cached); only where the user asks for other weights (``--quantization none / int8 /
int4``) are they dequantized here, and the result is cached by ``prepared``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from heron.cache import (
    atomic_write,
    atomic_write_text,
    entry_dir,
    file_sha256,
    remove_stale_temporaries,
)
from heron.loader.gguf_arch import (
    fix_config,
    fix_tensor,
    fixes_values,
    gguf_to_hf_names,
    hf_config_dict,
    is_fast_arch,
    rank_head_name,
)
from heron.loader.gguf_file import GGUFFile, TensorInfo, split_parts
from heron.loader.plain_config import PlainConfig, snapshot

logger = logging.getLogger(__name__)

# Tensors a file holds for the config, not as weights (gguf_rope reads llama3's RoPE factors).
_CONFIG_TENSORS = frozenset({"rope_freqs.weight"})

if TYPE_CHECKING:  # transformers is imported where it is used: an engine serving prepared
    # weights (``heron.loader.prepared``) never imports it (~1-2 s)
    import torch
    from transformers import PretrainedConfig

# Token texts that end a turn or a text in common formats. llama.cpp stops on these too; a GGUF
# file names one eos id, while the HF generation_config of such models lists them all (Llama
# 3.x Instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>",
                      "<|endoftext|>", "<|end_of_text|>")
# Keys naming more ids that end generation (llama.cpp's EOT / EOM tokens).
_END_ID_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
_CONTROL_TOKEN_TYPE = 3  # llama.cpp's token type for control (special) tokens
_PROJECTOR_ARCH = "clip"  # llama.cpp's mmproj files (the vision part of a vision-language model)


@dataclass(frozen=True)
class GGUFCache:
    """The cached products of one GGUF file (see the module docstring for the layout)."""

    directory: Path

    @property
    def config_file(self) -> Path:
        return self.directory / "config.json"

    @property
    def generation_config_file(self) -> Path:
        return self.directory / "generation_config.json"

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / "tokenizer"

    @property
    def plain_config_file(self) -> Path:
        return self.directory / "plain_config.json"

    @property
    def weights_file(self) -> Path:
        return self.directory / "model.safetensors"


class GGUFModel:
    """One GGUF file and its cache: config, generation defaults, tokenizer, weights.

    Getters serve the cache when the entry exists, else build it from the file and fill the
    cache. ``sha256`` may be given when known (the default model's is).
    """

    def __init__(self, path: Path, sha256: str | None = None, root: Path | None = None) -> None:
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {path}")
        self.path = path
        self.cache = GGUFCache(entry_dir(sha256 or gguf_digest(path, root), root))
        remove_stale_temporaries(self.cache.directory)

    @cached_property
    def file(self) -> GGUFFile:
        """The file's metadata and tensor table (read on first use)."""
        return GGUFFile.read(self.path)

    def config(self) -> PretrainedConfig:
        """The transformers config of the file, ``architectures`` filled in (cached)."""
        from transformers import AutoConfig

        if not self.cache.config_file.is_file():
            self._prepare_metadata()
        config = AutoConfig.from_pretrained(str(self.cache.directory))
        if not self.cache.plain_config_file.is_file():
            values = snapshot(config)
            if values is not None:
                atomic_write_text(self.cache.plain_config_file, json.dumps(values))
        return config

    def light_config(self) -> PretrainedConfig | PlainConfig:
        """The config as plain attributes when the entry has their snapshot (no transformers
        import), else ``config()``, which writes the snapshot."""
        if self.cache.plain_config_file.is_file():
            try:
                return PlainConfig.from_snapshot(
                    json.loads(self.cache.plain_config_file.read_text()))
            except (OSError, ValueError, TypeError):  # unreadable: use the full config
                pass
        return self.config()

    def generation_config(self) -> dict[str, Any]:
        """bos / eos / pad ids; eos lists the file's eos plus any end-of-turn control token."""
        if not self.cache.generation_config_file.is_file():
            self._prepare_metadata()
        return json.loads(self.cache.generation_config_file.read_text())

    def report_unused(self, hf_names: Iterable[str], model_name: str,
                      mapping: dict[str, str] | None = None) -> list[str]:
        """The file's tensors that none of ``hf_names`` (a model's whole checkpoint) takes, named
        in a warning: a variant the model code has no place for (an MoE router in a dense
        model, biases of a flag it lacks) would otherwise run without them, silently.
        ``mapping``: ``gguf_to_hf_names`` of those names, where the caller has it."""
        if not is_fast_arch(self.file):
            return []
        if mapping is None:
            layers = int(fix_config(self.file)["num_hidden_layers"])
            mapping = gguf_to_hf_names(self.file, hf_names, layers)
        head = rank_head_name(self.file)  # the engine reads it (``rank_head``)
        unused = [info.name for info in self.file.tensors if info.name not in mapping
                  and info.name not in _CONFIG_TENSORS and info.name != head]
        if unused:
            logger.warning("%d tensors of the file are no weight of %s and are not used: %s%s",
                           len(unused), model_name, ", ".join(unused[:6]),
                           ", ..." if len(unused) > 6 else "")
        return unused

    def weights(self, hf_names: Iterable[str] | None = None,
                dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(checkpoint name, tensor)`` for each tensor of the file that maps to one of
        ``hf_names`` (default: every parameter of the transformers model), one at a time.

        The values are transformers' float32 ones cast to ``dtype``; a model in bfloat16
        gets them without a float32 copy of each whole tensor. torch runs single-threaded
        meanwhile (see ``_one_thread``). ``dtype`` defaults to float32."""
        import torch

        dtype = dtype or torch.float32
        if not is_fast_arch(self.file):
            yield from ((n, t.to(dtype)) for n, t in self._transformers_weights().items())
            return
        config = fix_config(self.file)
        names = self._transformers_names() if hf_names is None else hf_names
        mapping = gguf_to_hf_names(self.file, names, int(config["num_hidden_layers"]))
        with _one_thread():
            for info in self.file.tensors:
                if info.name in mapping:
                    yield mapping[info.name], self._tensor(info, config, dtype)

    def _tensor(self, info: TensorInfo, config: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        exact = fixes_values(self.file, info.name)  # such fixes compute in float32
        tensor = self.file.dequantized(info, None if exact else dtype)
        return fix_tensor(self.file, info.name, tensor, config).to(dtype).contiguous()

    def prepare_weights(self) -> Path:
        """A float32 model.safetensors of every tensor, for transformers to load (cached)."""
        if not self.cache.weights_file.is_file():
            tensors = dict(self.weights())
            atomic_write(self.cache.weights_file, lambda tmp: _save_safetensors(tensors, tmp))
        return self.cache.weights_file

    def _prepare_metadata(self) -> None:
        config = self._build_config()
        generation = _generation_config(config, self.file.metadata)
        atomic_write_text(self.cache.generation_config_file, json.dumps(generation, indent=2))
        atomic_write_text(self.cache.config_file, config.to_json_string())

    def _build_config(self) -> PretrainedConfig:
        from transformers import AutoConfig

        if self.file.architecture == _PROJECTOR_ARCH:
            raise ValueError(f"{self.path} is a vision encoder and projector (an mmproj file, "
                             f"general.architecture {_PROJECTOR_ARCH!r}), not a language model: "
                             "pass the model's own GGUF file (heron serves text only)")
        if is_fast_arch(self.file):
            return _with_architectures(_config_from_dict(hf_config_dict(self.file)))
        config = AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        return _with_architectures(config)

    def _transformers_names(self) -> list[str]:
        return list(_transformers_skeleton(self.config()).state_dict())

    def _transformers_weights(self) -> dict[str, torch.Tensor]:
        import torch
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        parsed = load_gguf_checkpoint(str(self.path), return_tensors=True,
                                      model_to_load=_transformers_skeleton(self.config()),
                                      torch_dtype=torch.float32)
        return {name: tensor.contiguous() for name, tensor in parsed["tensors"].items()}


def rank_head(file: GGUFFile) -> torch.Tensor | None:
    """A reranker file's classification head (``gguf_arch.rank_head_name``), float32
    [num_labels, hidden]; None for any other file."""
    import torch

    name = rank_head_name(file)
    if name is None:
        return None
    info = next(info for info in file.tensors if info.name == name)
    return file.dequantized(info, torch.float32)


def gguf_digest(path: Path, root: Path | None = None) -> str:
    """The file's sha256; for a split file, the sha256 of its parts' (the first part of a split
    file may hold the metadata alone, the same for every quantization)."""
    parts = split_parts(path)
    if len(parts) == 1:
        return file_sha256(path, root)
    digests = "".join(file_sha256(part, root) for part in parts)
    return hashlib.sha256(digests.encode()).hexdigest()


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch single-threaded for a while (restored after).

    Dequantizing and casting are memory bound; on 2 cores with the other one busy (the API
    process builds the tokenizer while the engine loads), two intra-op threads made these
    ops 3-10x slower than one (0.6 s vs 2-7 s for the 270M model's weights).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _transformers_skeleton(config: PretrainedConfig) -> torch.nn.Module:
    """transformers' model for ``config`` on the meta device: parameter names, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _config_from_dict(config_dict: dict[str, Any]) -> PretrainedConfig:
    """What ``AutoConfig.from_pretrained(dir, gguf_file=...)`` builds from this dict."""
    from transformers import CONFIG_MAPPING

    model_type = config_dict["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"GGUF architecture {model_type!r} is not known to transformers")
    return CONFIG_MAPPING[model_type].from_dict(dict(config_dict))


def _with_architectures(config: PretrainedConfig) -> PretrainedConfig:
    """Fill ``architectures`` (a GGUF names none) with the causal-LM class of the model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not getattr(config, "architectures", None):
        architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if architecture is None:
            raise ValueError(f"GGUF architecture {config.model_type!r} has no causal-LM class "
                             "in transformers")
        config.architectures = [architecture]
    return config


def _generation_config(config: PretrainedConfig, metadata: dict[str, Any]) -> dict[str, Any]:
    """Token-id defaults: the file's bos / pad, and eos widened with end-of-turn tokens."""
    generation: dict[str, Any] = {}
    for key in ("bos_token_id", "pad_token_id"):
        if getattr(config, key, None) is not None:
            generation[key] = getattr(config, key)
    eos = getattr(config, "eos_token_id", None)
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    for token_id in _end_of_turn_ids(metadata):
        if token_id not in eos_ids:
            eos_ids.append(token_id)
    if eos_ids:
        generation["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    return generation


def _end_of_turn_ids(metadata: dict[str, Any]) -> list[int]:
    """The EOT / EOM ids the file names, then every control token of ``END_OF_TURN_TOKENS``."""
    tokens: list[str] = metadata.get("tokenizer.ggml.tokens") or []
    types = metadata.get("tokenizer.ggml.token_type")
    types = [] if types is None else types.tolist()
    wanted = set(END_OF_TURN_TOKENS)
    named = [int(metadata[key]) for key in _END_ID_KEYS if key in metadata]
    return named + [index for index, token in enumerate(tokens)
                    if token in wanted and (not types or types[index] == _CONTROL_TOKEN_TYPE)]


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
