"""The fast tokenizer of a GGUF byte-level BPE vocabulary (``tokenizer.ggml.model == "gpt2"``).

Such a file stores the vocabulary as the original ``tokenizer.json`` spells it (bytes mapped to
printable characters), its merges, the token types and a pre-tokenizer name
(``tokenizer.ggml.pre``) that stands for the original's split regex and options. For the
pre-tokenizers of the families heron serves, this module builds the original's ``tokenizers``
object back, the way llama.cpp's tokenizer reads the same names:

=================================  ==========================  =============  ===  ========
pre                                split regexes               ignore_merges  NFC  adds BOS
=================================  ==========================  =============  ===  ========
llama-bpe (llama3, llama-v3,       Llama 3 (digits 1-3)        yes            no   yes
falcon3, pixtral)
smaug-bpe, dbrx                    Llama 3                     no             no   no
qwen2, deepseek-r1-qwen            Qwen2 (single digits)       no             yes  no
mpt, olmo                          GPT-2                       no             yes  no
smollm                             digits, then GPT-2          no             no   no
tekken (Mistral Nemo, Ministral)   Tekken (case runs)          yes            no   yes
deepseek-llm                       DeepSeek LLM's six          no             no   no
deepseek-coder                     DeepSeek Coder's five       no             no   no
=================================  ==========================  =============  ===  ========

(the names as llama.cpp's converter writes them and llama.cpp reads them; "adds BOS" where the
file does not say. Several regexes split in turn: each splits the pieces of the one before,
text between matches stays a piece, as ``tokenizers``' ``Split(behavior="isolated")`` does.)
(``olmo``: llama.cpp's converter writes it for GPT-NeoX's tokenizer, MPT's, whose check hash
OLMo shares; llama.cpp reads both names alike.)

- ``ignore_merges``: a pre-token that is a whole vocabulary entry is that token, whatever the
  merges would make of it (Llama 3: "Cửa Việt" is 3 tokens, not 5);
- the vocabulary is the file's, id for id: control tokens become special added tokens,
  user-defined ones plain added tokens, and nothing else is added (transformers' GGUF path adds
  GPT-2's ``<|endoftext|>`` to a Llama 3 vocabulary, an id the model does not have);
- whether BOS is added comes from ``tokenizer.ggml.add_bos_token`` where the file says so.

Other pre-tokenizers return None: transformers builds those, with GPT-2's split for every
name, so a warning says the ids may differ from the original's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

logger = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# The split regexes of the original tokenizer.json files (tiktoken-style patterns).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|" + _TAIL
QWEN2_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" + _TAIL
# GPT-2's (byte-level ``use_regex``), which GPT-NeoX's tokenizer (MPT's) uses, NFC first
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


# SmolLM's: each digit alone (``Digits(individual_digits=True)``), then GPT-2's
SMOLLM_SPLITS = (r"\p{N}", GPT2_SPLIT)
# Mistral's Tekken: a run of capitals, then lower case (so "HelloWorld" is two pieces)
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
TEKKEN_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek's (their tokenizer.json files' sequences): newlines alone, runs of letters (DeepSeek
# LLM: the scripts it lists, cased ones) or punctuation with one optional whitespace before,
# trailing whitespace, CJK runs, digits (LLM: runs; Coder: each alone)
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
DEEPSEEK_LLM_SPLITS = (
    "[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-"
    "\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd"
    "\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d"
    "\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec"
    "\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b"
    "\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787"
    "\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    _CJK,
    r"\p{N}+",
)
DEEPSEEK_CODER_SPLITS = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")


@dataclass(frozen=True)
class PreTokenizer:
    """What a ``tokenizer.ggml.pre`` name stands for."""

    splits: tuple[str, ...]  # regexes in turn; each match is one pre-token
    ignore_merges: bool  # a pre-token found whole in the vocabulary is not merged
    nfc: bool  # NFC-normalize the text first
    add_bos: bool  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_LLAMA3 = PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True, nfc=False, add_bos=True)
_SMAUG = PreTokenizer((LLAMA3_SPLIT,), ignore_merges=False, nfc=False, add_bos=False)
_QWEN2 = PreTokenizer((QWEN2_SPLIT,), ignore_merges=False, nfc=True, add_bos=False)
_MPT = PreTokenizer((GPT2_SPLIT,), ignore_merges=False, nfc=True, add_bos=False)
_SMOLLM = PreTokenizer(SMOLLM_SPLITS, ignore_merges=False, nfc=False, add_bos=False)
_TEKKEN = PreTokenizer((TEKKEN_SPLIT,), ignore_merges=True, nfc=False, add_bos=True)
_DEEPSEEK_LLM = PreTokenizer(DEEPSEEK_LLM_SPLITS, ignore_merges=False, nfc=False, add_bos=False)
_DEEPSEEK_CODER = PreTokenizer(DEEPSEEK_CODER_SPLITS, ignore_merges=False, nfc=False,
                               add_bos=False)
PRE_TOKENIZERS = {
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "falcon3": _LLAMA3,
    "pixtral": _LLAMA3, "smaug-bpe": _SMAUG, "dbrx": _SMAUG, "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2, "mpt": _MPT, "olmo": _MPT, "smollm": _SMOLLM, "tekken": _TEKKEN,
    "deepseek-llm": _DEEPSEEK_LLM, "deepseek-coder": _DEEPSEEK_CODER}


def byte_level_pre_tokenizer(metadata: dict[str, Any]) -> PreTokenizer | None:
    """The pre-tokenizer this file's byte-level BPE vocabulary names, if heron builds it."""
    if metadata.get("tokenizer.ggml.model") != "gpt2" or "tokenizer.ggml.merges" not in metadata:
        return None
    name = str(metadata.get("tokenizer.ggml.pre"))
    pre = PRE_TOKENIZERS.get(name)
    if pre is None:
        logger.warning("this GGUF's pre-tokenizer %r is not one heron builds (%s): transformers "
                       "builds the tokenizer with GPT-2's split, and token ids may differ from "
                       "the original model's", name, ", ".join(sorted(PRE_TOKENIZERS)))
    return pre


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
    splits = [pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False)
              for split in pre.splits]
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        *splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                          use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else []
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
    return backend
