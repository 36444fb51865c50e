"""The fast tokenizer of a GGUF byte-level BPE vocabulary (``tokenizer.ggml.model == "gpt2"``).

Such a file stores the vocabulary as the original ``tokenizer.json`` spells it (bytes mapped to
printable characters), its merges, the token types and a pre-tokenizer name
(``tokenizer.ggml.pre``) that stands for the original's split regex and options. For the
pre-tokenizers of the families heron serves, this module builds the original's ``tokenizers``
object back, the way llama.cpp's tokenizer reads the same names:

============  =====================  ==============  ========  ============
pre           split regex            ignore_merges   NFC       adds BOS
============  =====================  ==============  ========  ============
llama-bpe     Llama 3 (digits 1-3)   yes             no        yes
qwen2         Qwen2 (single digits)  no              yes       no
mpt, olmo     GPT-2                  no              yes       no
============  =====================  ==============  ========  ============

(``olmo``: llama.cpp's converter writes it for GPT-NeoX's tokenizer, MPT's, whose check hash
OLMo shares; llama.cpp reads both names alike.)

- ``ignore_merges``: a pre-token that is a whole vocabulary entry is that token, whatever the
  merges would make of it (Llama 3: "Cửa Việt" is 3 tokens, not 5);
- the vocabulary is the file's, id for id: control tokens become special added tokens,
  user-defined ones plain added tokens, and nothing else is added (transformers' GGUF path adds
  GPT-2's ``<|endoftext|>`` to a Llama 3 vocabulary, an id the model does not have);
- whether BOS is added comes from ``tokenizer.ggml.add_bos_token`` where the file says so.

Other pre-tokenizers return None (transformers builds those).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# The split regexes of the original tokenizer.json files (tiktoken-style patterns).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|" + _TAIL
QWEN2_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" + _TAIL
# GPT-2's (byte-level ``use_regex``), which GPT-NeoX's tokenizer (MPT's) uses, NFC first
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class PreTokenizer:
    """What a ``tokenizer.ggml.pre`` name stands for."""

    split: str  # regex; each match is one pre-token
    ignore_merges: bool  # a pre-token found whole in the vocabulary is not merged
    nfc: bool  # NFC-normalize the text first
    add_bos: bool  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_LLAMA3 = PreTokenizer(LLAMA3_SPLIT, ignore_merges=True, nfc=False, add_bos=True)
_QWEN2 = PreTokenizer(QWEN2_SPLIT, ignore_merges=False, nfc=True, add_bos=False)
_MPT = PreTokenizer(GPT2_SPLIT, ignore_merges=False, nfc=True, add_bos=False)
PRE_TOKENIZERS = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "qwen2": _QWEN2,
                  "mpt": _MPT, "olmo": _MPT}


def byte_level_pre_tokenizer(metadata: dict[str, Any]) -> PreTokenizer | None:
    """The pre-tokenizer this file's byte-level BPE vocabulary names, if heron builds it."""
    if metadata.get("tokenizer.ggml.model") != "gpt2" or "tokenizer.ggml.merges" not in metadata:
        return None
    return PRE_TOKENIZERS.get(str(metadata.get("tokenizer.ggml.pre")))


def byte_level_backend(metadata: dict[str, Any], pre: PreTokenizer) -> Tokenizer:
    """The ``tokenizers`` object of the vocabulary: BPE, split + byte-level pre-tokenizer,
    byte-level decoder, the file's control and user-defined tokens (no post-processor: the
    wrapper adds BOS / EOS)."""
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                   fuse_unk=False, byte_fallback=False,
                                   ignore_merges=pre.ignore_merges))
    if pre.nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pre.split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else []
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
    return backend
