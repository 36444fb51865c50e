"""Text <-> token ids on the API side: tokenizers, chat templates, incremental detokenization."""

from heron.tokenizer.load import load_tokenizer
from heron.tokenizer.tokenizer import (
    GEMMA_CHAT_TEMPLATE,
    IncrementalDetokenizer,
    Tokenizer,
    read_chat_template,
)

__all__ = ["GEMMA_CHAT_TEMPLATE", "IncrementalDetokenizer", "Tokenizer", "load_tokenizer",
           "read_chat_template"]
