"""A tiny random-weight Llama, built from a transformers config and saved where heron loads it."""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

VOCAB = 512
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """Build a random float32 Llama (2 layers, GQA) with save_pretrained; returns the path."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init gives near-flat logits; widen them, away from ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return path


def save_char_tokenizer(path: Path) -> None:
    """``char_tokenizer`` saved where heron loads a model's tokenizer."""
    char_tokenizer().save_pretrained(path)


THINK_TAGS = ("<think>", "</think>")  # ids 104 and 105 in char_tokenizer(think_tags=True)


def char_tokenizer(think_tags: bool = False,
                   special_tags: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """One token per printable character (ids 4..103; 0-3 are <pad> <s> </s> <unk>), filler
    tokens "[i]" up to the model's vocabulary; encoding adds <s>. Its decoder (byte fallback,
    then fuse: the same text as fuse alone here) is one llguidance reads, so structured output
    can force an exact answer. ``think_tags``: ``<think>`` and ``</think>`` are tokens 104 and
    105, added tokens that are not special (as in Qwen3's vocabulary). ``special_tags``: added
    special tokens after those (Mistral's ``[TOOL_CALLS]``, ``[ARGS]``)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: len(vocab) + i for i, c in enumerate(string.printable)})
    if think_tags:
        vocab.update({tag: len(vocab) + i for i, tag in enumerate(THINK_TAGS)})
    vocab.update({tag: len(vocab) + i for i, tag in enumerate(special_tags)})
    vocab.update({f"[{i}]": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if think_tags:
        tok.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in THINK_TAGS])
    tok.add_special_tokens([AddedToken(tag, special=True, normalized=False) for tag in special_tags])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def save_tiny_server_model(path: Path, think_tags: bool = False) -> Path:
    """The tiny Llama with its character tokenizer: a directory `heron serve` can serve."""
    save_tiny_model(path)
    char_tokenizer(think_tags).save_pretrained(path)
    return path


def save_tiny_chat_model(path: Path) -> Path:
    """``save_tiny_server_model`` whose greedy answers never end by themselves (the LM head row
    of EOS is zero, never the argmax): they run to ``max_tokens``, long enough to stop them
    halfway. EOS stays reachable where a grammar forces it."""
    from safetensors.torch import load_file, save_file

    save_tiny_server_model(path)
    weights_file = path / "model.safetensors"
    weights = load_file(str(weights_file))
    weights["lm_head.weight"][2].zero_()  # eos_token_id=2
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    return path


def _tiny_config(family: str, **extra: object) -> transformers.PretrainedConfig:
    """A 2-layer GQA config of ``family`` ("llama" or "qwen3") over ``VOCAB`` tokens."""
    common: dict[str, object] = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **common)
    return transformers.LlamaConfig(**common)


def _widen(model: torch.nn.Module, head_std: float = 0.08) -> None:
    """Random weights away from near-flat outputs; ``score.weight`` at ``head_std``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, head_std if name.startswith("score.") else 0.08)


def save_tiny_classifier(path: Path, family: str, num_labels: int, seed: int = 0) -> Path:
    """A random ``*ForSequenceClassification`` (``family``: "llama" or "qwen3") with
    ``num_labels`` labels and the character tokenizer, whose pairs read ``<s> A </s> B``."""
    from tokenizers import processors

    torch.manual_seed(seed)
    config = _tiny_config(family, num_labels=num_labels)
    model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    _widen(model, head_std=0.15)
    model.save_pretrained(path)
    tokenizer = char_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B:1", special_tokens=[("<s>", 1), ("</s>", 2)])
    tokenizer.save_pretrained(path)
    return path


def save_tiny_qwen3(path: Path, seed: int = 0) -> Path:
    """A random Qwen3ForCausalLM (tied head, as Qwen3-Reranker-0.6B) with the character
    tokenizer (pairs: the two texts back to back, as Qwen's tokenizer joins them)."""
    torch.manual_seed(seed)
    config = _tiny_config("qwen3", tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _widen(model)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
