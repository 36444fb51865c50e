"""The fast tokenizer of a GGUF vocabulary, built straight from the metadata.

Two kinds of vocabulary are built here (others go to transformers):

- byte-level BPE (``tokenizer.ggml.model == "gpt2"``: Llama 3, Qwen2/2.5/3): see ``gguf_bpe``;
- SentencePiece BPE (``"llama"``: Llama 2, Mistral, Gemma), described below; and Gemma's
  tokenizer.json BPE (``"gemma4"``: a Gemma 3 / 4 converted without tokenizer.model), the
  same tokenizer with the file's own merges.

A SentencePiece vocabulary (tokens, scores, token types) usually comes without merges.
transformers (5.x) turns it into a BPE tokenizer with byte fallback whose merges it derives from
the vocabulary; this module builds the same vocabulary and merges (the tests compare them with
transformers') in ~2 s instead of ~30 s:

- merges: every split ``left + right`` of a token where both halves are tokens, ordered best
  first by (token score, len(left), len(right)), ties kept in vocabulary order. That is the
  order of transformers' ``generate_merges``; its per-token pre-sort never decides anything,
  since two splits of one token always differ in ``len(left)``;
- Gemma files: tokens made only of whitespace with a space in them are spelled with "▁", and
  the score is the token's position (Gemma's stored scores do not follow its merge order);
- Llama / Mistral files: a space is put before the text and before the text after each
  special token, as sentencepiece's ``add_dummy_prefix``, llama.cpp and the original
  ``tokenizer.json`` files do (``" ("`` is ``["▁", "▁("]``); unless the file says
  ``tokenizer.ggml.add_space_prefix = false``. (transformers' GGUF path prepends only when the
  text does not start with a space, and only at its start.)

Only tokens of the file are added: a vocabulary never grows past the model's embedding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from heron.loader.gguf_file import GGUFFile
from heron.tokenizer.gguf_bpe import byte_level_backend, byte_level_pre_tokenizer

logger = logging.getLogger(__name__)

_SPACE = "\u2581"  # SentencePiece's visible space
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
# llama.cpp's converter writes a Gemma vocabulary read from tokenizer.json alone (no
# tokenizer.model) as this type: the same tokens, with tokenizer.json's merges
_GEMMA_BPE = "gemma4"
# GGUF key -> tokenizer setting naming that token
_SPECIAL_TOKEN_IDS = {"bos_token": "tokenizer.ggml.bos_token_id",
                      "eos_token": "tokenizer.ggml.eos_token_id",
                      "unk_token": "tokenizer.ggml.unknown_token_id",
                      "pad_token": "tokenizer.ggml.padding_token_id"}


@dataclass(frozen=True)
class _Family:
    """How transformers' tokenizer class for these files shapes the BPE tokenizer."""

    gemma: bool  # GemmaTokenizer (else LlamaTokenizer)
    default_specials: tuple[str, ...]  # the class's own unk/bos/eos/... defaults, added first
    extra_settings: tuple[tuple[str, str], ...]  # defaults of the outer class not in the file


_GEMMA = _Family(True, ("<unk>", "<bos>", "<eos>", "<pad>", "<mask>"), (("mask_token", "<mask>"),))
_LLAMA = _Family(False, ("<unk>", "<s>", "</s>"), ())


class _PrebuiltTokenizerFast(PreTrainedTokenizerFast):
    """``PreTrainedTokenizerFast`` over a backend built here.

    Passing ``tokenizer_object=`` would deep-copy it, which for a 262k vocabulary means a
    JSON round trip of ~1.5 s; the transformers tokenizer classes set ``_tokenizer`` first,
    as done here.
    """

    def __init__(self, backend: Tokenizer, **kwargs: Any) -> None:
        self._tokenizer = backend
        super().__init__(**kwargs)


def build_gguf_tokenizer(gguf_file: GGUFFile) -> PreTrainedTokenizerFast | None:
    """The file's tokenizer, or None if this is not a vocabulary heron builds itself (then use
    transformers)."""
    metadata = gguf_file.metadata
    pre = byte_level_pre_tokenizer(metadata)
    if pre is not None:
        return _wrap(byte_level_backend(metadata, pre), _settings(metadata, (), pre.add_bos))
    if metadata.get("tokenizer.ggml.model") == _GEMMA_BPE and "tokenizer.ggml.merges" in metadata:
        return _wrap(_backend(metadata, _GEMMA), _settings(metadata, _GEMMA.extra_settings, True))
    if metadata.get("tokenizer.ggml.model") != "llama" or "tokenizer.ggml.merges" in metadata:
        return None
    arch = gguf_file.architecture
    if arch == "phi3":  # transformers gives phi3 a normalizer of its own
        return None
    family = _GEMMA if arch in _GEMMA_ARCHS else _LLAMA
    return _wrap(_backend(metadata, family), _settings(metadata, family.extra_settings, True))


def _wrap(backend: Tokenizer, settings: dict[str, Any]) -> PreTrainedTokenizerFast:
    try:
        return _PrebuiltTokenizerFast(backend, **settings)
    except ValueError:  # transformers 4 cannot take a backend as is: it copies it (~1.5 s)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **settings)


def _backend(metadata: dict[str, Any], family: _Family) -> Tokenizer:
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    if family.gemma:
        tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = {token: -float(index) for index, token in enumerate(tokens)}
    else:
        scores = dict(zip(tokens, metadata["tokenizer.ggml.scores"].tolist()))
    vocab = {token: index for index, token in enumerate(tokens)}
    stored = metadata.get("tokenizer.ggml.merges")  # "gemma4" files: tokenizer.json's merges
    merges = (derive_merges(vocab, scores) if stored is None
              else [tuple(merge.split(" ", 1)) for merge in stored])
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=True,
                     byte_fallback=True, dropout=None,
                     unk_token="<unk>" if family.gemma else None)
    backend = Tokenizer(bpe)
    _shape(backend, family, bool(metadata.get("tokenizer.ggml.add_space_prefix", True)))
    _add_tokens(backend, metadata, family, vocab)
    return backend


def derive_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary, best first (see the module docstring)."""
    lefts: list[str] = []
    rights: list[str] = []
    keys: list[float] = []
    for token, score in scores.items():
        for split in range(1, len(token)):
            left = token[:split]
            if left in vocab:
                right = token[split:]
                if right in vocab:
                    lefts.append(left)
                    rights.append(right)
                    keys.append(score)
    left_len = np.fromiter(map(len, lefts), dtype=np.int64, count=len(lefts))
    right_len = np.fromiter(map(len, rights), dtype=np.int64, count=len(rights))
    # lexsort is stable and sorts by its last key first: descending (score, left, right)
    order = np.lexsort((-right_len, -left_len, -np.asarray(keys, dtype=np.float64)))
    return [(lefts[i], rights[i]) for i in order.tolist()]


def _shape(backend: Tokenizer, family: _Family, space_prefix: bool) -> None:
    """Normalizer, pre-tokenizer and decoder (see the module docstring)."""
    pieces = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if family.gemma:
        backend.normalizer = normalizers.Replace(" ", _SPACE)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif space_prefix:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE),
                                                   normalizers.Replace(" ", _SPACE)])
        pieces.append(decoders.Strip(" ", 1, 0))
    else:
        backend.normalizer = normalizers.Replace(" ", _SPACE)
    backend.decoder = decoders.Sequence(pieces)


def _add_tokens(backend: Tokenizer, metadata: dict[str, Any], family: _Family,
                vocab: dict[str, int]) -> None:
    """The class's default specials, then control tokens (special), then user-defined tokens
    (not special) that the vocabulary, as spelled in the model, holds."""
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else []
    control = [t for t, kind in zip(tokens, types) if kind == _CONTROL]
    defaults = [t for t in family.default_specials if t in vocab]
    backend.add_special_tokens([_added(t, special=True) for t in defaults])
    backend.add_special_tokens([_added(t, special=True) for t in control])
    known = vocab.keys()  # every added token is one of the file's
    user = [t for t, kind in zip(tokens, types) if kind == _USER_DEFINED and t in known]
    backend.add_tokens([_added(t, special=False) for t in user])


def _added(content: str, special: bool) -> AddedToken:
    return AddedToken(content, normalized=False, special=special)


def _settings(metadata: dict[str, Any], extra: tuple[tuple[str, str], ...],
              add_bos: bool) -> dict[str, Any]:
    """Keyword arguments of the tokenizer wrapper: the special tokens the file names, whether
    BOS / EOS are added (``add_bos`` unless the file says), the chat template."""
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    settings: dict[str, Any] = dict(extra)
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(key)
        if token_id is not None and not 0 <= int(token_id) < len(tokens):
            # as llama.cpp ("bad special token"): e.g. a pad token added after the vocabulary
            logger.warning("%s = %d is not a token of the vocabulary (%d tokens): ignored",
                           key, int(token_id), len(tokens))
            token_id = None
        settings[name] = tokens[int(token_id)] if token_id is not None else None
    settings["add_bos_token"] = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos))
    if "tokenizer.ggml.add_eos_token" in metadata:
        settings["add_eos_token"] = bool(metadata["tokenizer.ggml.add_eos_token"])
    if "tokenizer.chat_template" in metadata:
        settings["chat_template"] = metadata["tokenizer.chat_template"]
    return settings
