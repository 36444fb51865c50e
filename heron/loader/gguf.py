"""GGUF files: config, tokenizer and dequantized weights, with an on-disk cache.

Reading a GGUF the first time is slow (parsing a 262k-token vocabulary alone takes seconds,
building a fast tokenizer from it tens of seconds, dequantizing more), so every product is
prepared once and kept under ``<cache root>/<sha256 of the file>/``::

    <HERON_CACHE_DIR or ~/.cache/heron>/<sha256>/
        config.json             transformers config, ``architectures`` filled in
        generation_config.json  bos / eos / pad ids (eos includes end-of-turn tokens)
        tokenizer/              ``save_pretrained`` of the converted fast tokenizer
        model.safetensors       every tensor dequantized to float32, under HF names

Each entry is written to a temporary name and renamed into place, so a killed process
never leaves a half-written entry that a later start would trust.

The conversion itself is transformers' own (``load_gguf_checkpoint``): the same name map,
llama q/k un-permutation and Gemma ``(1 + w)`` norm correction that
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` applies, so the weights are
identical to what transformers loads from the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from heron.loader.safetensors import iter_safetensors

CACHE_ENV_VAR = "HERON_CACHE_DIR"
# Token texts that end a turn in common chat formats. llama.cpp stops on these too; a GGUF
# file names only one eos id, while the HF generation_config of such models lists them all.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>",
                      "<|endoftext|>")
_CONTROL_TOKEN_TYPE = 3  # llama.cpp's token type for control (special) tokens
_HASH_CHUNK = 1 << 20
_STALE_AFTER_S = 3600.0  # a temporary this old belongs to a process that died
# tokenizer_config.json entries that matter once tokenizer.json holds the tokenizer itself.
_TOKENIZER_SETTINGS = frozenset((
    "bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "sep_token", "cls_token",
    "additional_special_tokens", "extra_special_tokens", "model_max_length", "padding_side",
    "clean_up_tokenization_spaces", "add_bos_token", "add_eos_token", "add_prefix_space",
    "chat_template"))


def cache_root() -> Path:
    """``$HERON_CACHE_DIR``, else ``~/.cache/heron``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "heron"


# ----------------------------------------------------------------------------- atomic writes


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory + rename."""
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp makes it private; the cache is as readable as any download
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_dir(path: Path, fill: Callable[[Path], object]) -> None:
    """Build a directory under a temporary name, then rename it to ``path`` (first one wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(directory: Path) -> None:
    """Delete temporaries that a killed process left behind (old enough to be nobody's)."""
    if not directory.is_dir():
        return
    cutoff = time.time() - _STALE_AFTER_S
    for entry in directory.glob(".*.tmp"):
        try:
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        except OSError:  # another process cleaned it up first
            pass


# ----------------------------------------------------------------------------- cache keys


def file_sha256(path: Path, root: Path | None = None) -> str:
    """The sha256 of ``path``, remembered on disk per (path, size, mtime) to skip rehashing."""
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    memo = (root or cache_root()) / "digests" / f"{key}.json"
    if memo.is_file():
        remembered = json.loads(memo.read_text())
        if {k: remembered.get(k) for k in stamp} == stamp:
            return str(remembered["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            digest.update(block)
    atomic_write_text(memo, json.dumps({**stamp, "sha256": digest.hexdigest()}))
    return digest.hexdigest()


@dataclass(frozen=True)
class GGUFCache:
    """The prepared files of one GGUF file (see the module docstring for the layout)."""

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
    def weights_file(self) -> Path:
        return self.directory / "model.safetensors"


# ----------------------------------------------------------------------------- the file


class GGUFModel:
    """One GGUF file and its cache: config, generation defaults, tokenizer, weights.

    Every getter serves the cache when the entry exists, else converts with transformers
    and fills the cache. ``sha256`` may be given when known (the default model's is).
    """

    def __init__(self, path: Path, sha256: str | None = None, root: Path | None = None) -> None:
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {path}")
        self.path = path
        root = root or cache_root()
        self.cache = GGUFCache(root / (sha256 or file_sha256(path, root)))
        _remove_stale_temporaries(self.cache.directory)

    def config(self) -> PretrainedConfig:
        """The transformers config transformers derives from the GGUF metadata."""
        if not self.cache.config_file.is_file():
            self._prepare_metadata()
        return AutoConfig.from_pretrained(str(self.cache.directory))

    def generation_config(self) -> dict[str, Any]:
        """bos / eos / pad ids; eos lists the file's eos plus any end-of-turn control token."""
        if not self.cache.generation_config_file.is_file():
            self._prepare_metadata()
        return json.loads(self.cache.generation_config_file.read_text())

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The fast tokenizer transformers builds from the GGUF vocabulary (cached)."""
        if not self.cache.tokenizer_dir.is_dir():
            converted = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            _atomic_write_dir(self.cache.tokenizer_dir, converted.save_pretrained)
        return load_saved_fast_tokenizer(self.cache.tokenizer_dir)

    def weights(self, hf_config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """``(hf_name, float32 tensor)`` pairs, read from the cache (filled on first use)."""
        yield from iter_safetensors([self.prepare_weights(hf_config)])

    def prepare_weights(self, hf_config: PretrainedConfig) -> Path:
        """Dequantize every tensor into the cache's model.safetensors unless already there."""
        if not self.cache.weights_file.is_file():
            tensors = self._dequantize(hf_config)
            _atomic_write(self.cache.weights_file, lambda tmp: _save_safetensors(tensors, tmp))
        return self.cache.weights_file

    def _prepare_metadata(self) -> None:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)
        config = _config_from_gguf_dict(parsed["config"])
        generation = _generation_config(config, parsed.get("tokenizer", {}))
        atomic_write_text(self.cache.generation_config_file, json.dumps(generation, indent=2))
        atomic_write_text(self.cache.config_file, config.to_json_string())

    def _dequantize(self, hf_config: PretrainedConfig) -> dict[str, torch.Tensor]:
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        with torch.device("meta"):  # only its parameter names are needed for the name map
            skeleton = AutoModelForCausalLM.from_config(hf_config)
        parsed = load_gguf_checkpoint(str(self.path), return_tensors=True, model_to_load=skeleton,
                                      torch_dtype=torch.float32)
        return {name: tensor.contiguous() for name, tensor in parsed["tensors"].items()}


def load_saved_fast_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """Reload a ``save_pretrained`` fast tokenizer straight from its tokenizer.json.

    ``AutoTokenizer`` would rebuild a model-specific class, which for Gemma re-parses the 33 MB
    tokenizer.json in Python (~3 s); the generic fast class over the same tokenizer.json and
    special tokens encodes and decodes identically in well under half that.
    """
    config = json.loads((directory / "tokenizer_config.json").read_text())
    kwargs = {key: value for key, value in config.items() if key in _TOKENIZER_SETTINGS}
    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
        kwargs["chat_template"] = template_file.read_text()
    return PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), **kwargs)


def _config_from_gguf_dict(config_dict: dict[str, Any]) -> PretrainedConfig:
    """What ``AutoConfig.from_pretrained(dir, gguf_file=...)`` builds, plus ``architectures``."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config_dict["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"GGUF architecture {model_type!r} is not known to transformers")
    config = CONFIG_MAPPING[model_type].from_dict(dict(config_dict))
    if not getattr(config, "architectures", None):
        architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if architecture is None:
            raise ValueError(f"GGUF architecture {model_type!r} has no causal-LM class in transformers")
        config.architectures = [architecture]
    return config


def _generation_config(config: PretrainedConfig, tokenizer: dict[str, Any]) -> dict[str, Any]:
    """Token-id defaults: the file's bos / pad, and eos widened with end-of-turn tokens."""
    generation: dict[str, Any] = {}
    for key in ("bos_token_id", "pad_token_id"):
        if getattr(config, key, None) is not None:
            generation[key] = getattr(config, key)
    eos = getattr(config, "eos_token_id", None)
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    for token_id in _end_of_turn_ids(tokenizer):
        if token_id not in eos_ids:
            eos_ids.append(token_id)
    if eos_ids:
        generation["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    return generation


def _end_of_turn_ids(tokenizer: dict[str, Any]) -> list[int]:
    tokens: list[str] = list(tokenizer.get("tokens") or [])
    types: list[int] = list(tokenizer.get("token_type") or [])
    wanted = set(END_OF_TURN_TOKENS)
    return [index for index, token in enumerate(tokens)
            if token in wanted and (not types or types[index] == _CONTROL_TOKEN_TYPE)]


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
