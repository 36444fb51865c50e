"""A model's tokenizer for the API process: HF tokenizer files or a GGUF vocabulary, the eos
ids of its generation config, and its chat template. No weights are read here.

A GGUF file's tokenizer is built once by ``gguf_vocab`` (or transformers, for vocabularies heron
does not convert) and saved into the file's cache entry (``tokenizer/``); later starts reload it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from heron.cache import atomic_write_dir
from heron.config import ModelConfig
from heron.loader import config_of, generation_config_of, model_display_name, resolve_source
from heron.progress import Progress
from heron.tokenizer.token_bytes import write_token_bytes
from heron.tokenizer.tokenizer import GEMMA_CHAT_TEMPLATE, Tokenizer, read_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    from heron.loader.gguf import GGUFModel
    from heron.loader.plain_config import AnyModelConfig

# tokenizer_config.json entries that matter once tokenizer.json holds the tokenizer itself.
_TOKENIZER_SETTINGS = frozenset((
    "bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "sep_token", "cls_token",
    "additional_special_tokens", "extra_special_tokens", "model_max_length", "padding_side",
    "clean_up_tokenization_spaces", "add_bos_token", "add_eos_token", "add_prefix_space",
    "chat_template"))


def load_tokenizer(model_config: ModelConfig) -> Tokenizer:
    """The tokenizer of ``--tokenizer`` (else of the model), with eos ids and chat template.
    For a GGUF model seen before, this imports neither torch nor transformers' models (the API
    process does it while the engine process starts: they share the CPU)."""
    return finish_tokenizer(model_config, load_hf_tokenizer(model_config))


def load_hf_tokenizer(model_config: ModelConfig) -> PreTrainedTokenizerBase:
    """The first half of ``load_tokenizer``: the tokenizer itself, without the model's config."""
    source = resolve_source(model_config.tokenizer or model_config.model, download_weights=False)
    if source.is_gguf:
        return gguf_tokenizer(source.gguf)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source.path))
    except (OSError, ValueError) as err:
        raise ValueError(f"no usable tokenizer in {source.path} ({err}); pass one with "
                         "--tokenizer") from err


def finish_tokenizer(model_config: ModelConfig, hf_tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    """The second half of ``load_tokenizer``: what the model's config adds (eos ids, context
    length, a default chat template). A GGUF file's config comes from the snapshot in its cache
    entry; on the file's first start ``heron serve`` calls this once the engine has loaded the
    model and so written that snapshot: building the config here instead would import
    transformers' configs and with them torch (~200 MiB that this process would keep)."""
    model_source = resolve_source(model_config.model, download_weights=False)
    hf_config = model_source.gguf.light_config() if model_source.is_gguf else config_of(model_source)
    generation = generation_config_of(model_source, hf_config)
    return Tokenizer(
        hf_tokenizer,
        generation_eos=generation.get("eos_token_id"),
        chat_template=_chat_template(model_config, hf_tokenizer.chat_template, hf_config),
        model_max_length=getattr(hf_config, "max_position_embeddings", None),
        name=model_display_name(model_config),
        tool_chat_template=_tool_chat_template(model_config, hf_tokenizer.chat_template),
    )


def tokenizer_json_path(model_config: ModelConfig) -> Path | None:
    """The ``tokenizer.json`` that ``load_tokenizer`` reads, where one is on disk already (a
    GGUF model's converted tokenizer is written by its first start), else None. The engine
    indexes it for structured outputs without building the tokenizer (or importing
    transformers)."""
    source = resolve_source(model_config.tokenizer or model_config.model, download_weights=False)
    directory = source.gguf.cache.tokenizer_dir if source.is_gguf else source.path
    path = directory / "tokenizer.json"
    return path if path.is_file() else None


def _chat_template(model_config: ModelConfig, own: str | dict[str, str] | None,
                   hf_config: AnyModelConfig) -> str | None:
    """``--chat-template`` first, then the model's own, then Gemma's format for Gemma models."""
    if model_config.chat_template is not None:
        return read_chat_template(model_config.chat_template)
    if isinstance(own, dict):  # named templates (older tokenizer_config.json): take the default
        own = own.get("default") or next(iter(own.values()), None)
    if own:
        return str(own)
    if str(getattr(hf_config, "model_type", "")).startswith("gemma"):
        return GEMMA_CHAT_TEMPLATE
    return None


def _tool_chat_template(model_config: ModelConfig, own: str | dict[str, str] | None) -> str | None:
    """The model's template named ``tool_use`` (Hermes 2 Pro, Command R: named templates, the
    default one renders no tools), which transformers takes for requests with tools; None
    under ``--chat-template``."""
    if model_config.chat_template is not None or not isinstance(own, dict):
        return None
    return own.get("tool_use")


def gguf_tokenizer(model: GGUFModel) -> PreTrainedTokenizerBase:
    """The fast tokenizer transformers builds from the GGUF vocabulary (cached in the entry)."""
    directory = model.cache.tokenizer_dir
    if not directory.is_dir():
        with Progress("building the tokenizer", total=1, unit="step") as progress:
            built = build_gguf_tokenizer(model)  # None: a vocabulary left to transformers
            converted = built or _transformers_tokenizer(model)
            atomic_write_dir(directory, functools.partial(save_tokenizer, converted))
            progress.update()
        if built is not None:
            return built  # what later starts reload from the cache is the same (tested)
    return load_saved_fast_tokenizer(directory)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """The tokenizer's files, and its tokens' bytes for the engine's grammar index."""
    tokenizer.save_pretrained(str(directory))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        write_token_bytes(directory, backend)


def build_gguf_tokenizer(model: GGUFModel) -> PreTrainedTokenizerFast | None:
    """``gguf_vocab.build_gguf_tokenizer``, imported on first use (it needs transformers)."""
    from heron.tokenizer.gguf_vocab import build_gguf_tokenizer as build

    return build(model.file)


def _transformers_tokenizer(model: GGUFModel) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model.path.parent), gguf_file=model.path.name)


def load_saved_fast_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """Reload a ``save_pretrained`` fast tokenizer straight from its tokenizer.json.

    ``AutoTokenizer`` would rebuild a model-specific class, which for Gemma re-parses the 33 MB
    tokenizer.json in Python (~3 s); the generic fast class over the same tokenizer.json and
    special tokens encodes and decodes identically in well under half that.
    """
    from transformers import PreTrainedTokenizerFast

    config = json.loads((directory / "tokenizer_config.json").read_text())
    kwargs = {key: value for key, value in config.items() if key in _TOKENIZER_SETTINGS}
    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
        kwargs["chat_template"] = template_file.read_text()
    return PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), **kwargs)
