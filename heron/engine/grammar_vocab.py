"""The vocabulary llguidance indexes, read from a ``tokenizer.json`` with a small footprint.

Given the JSON text, llguidance parses it with serde, builds its own HF tokenizer and then its
token trie: for Gemma's 262,144 tokens that peaked at +445 MiB and kept 225 MiB in the engine
process. Here the ``tokenizers`` library loads the file once, the bytes of every token are
derived from it as llguidance's own HF adapter does (``heron.tokenizer.token_bytes``, which
the API process also writes beside a tokenizer.json it builds: then they are read from there),
the tokenizer is dropped, and llguidance gets the bytes through its ``TokenizerWrapper``
protocol: it then builds only the trie and its slices (114 MiB kept; 232 MiB when the
tokenizer stayed to encode). Masks are identical
(``tests/test_grammar_vocab.py`` compares both indexes, token by token and mask by mask): the
tokens' bytes and special flags are the same, and the text llguidance tokenizes (a grammar's
forced bytes) is encoded by the same tokenizer, with llguidance's one change (no ``Prepend``
normalizer inside a sequence), in a child process (``heron.engine.forced_text``)::

    tokenizer.json --tokenizers--> Tokenizer --id_to_token--> token bytes --+--> LLTokenizer
          |                        (dropped)                                |
          '--> EncoderProcess (started by the first compile): encode(text) <-- llguidance calls
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

from heron.engine.forced_text import EncoderProcess
from heron.heap import release_free_heap
from heron.tokenizer.token_bytes import read_token_bytes, token_bytes

if TYPE_CHECKING:
    import llguidance
    from llguidance._tokenizer import TokenizerWrapper


class GrammarVocabulary:
    """What llguidance's ``TokenizerWrapper`` protocol reads: ``tokens`` (bytes per id),
    ``special_token_ids``, ``eos_token_id``, ``bos_token_id``, and a call that encodes text
    (a ``str``: the valid UTF-8 prefix of the bytes llguidance tokenizes) to token ids, which
    ``encoder`` does."""

    is_tokenizer_wrapper = True
    bos_token_id = None

    def __init__(self, tokens: list[bytes], special: list[int], vocab_size: int,
                 eos_token_id: int, encoder: EncoderProcess) -> None:
        if len(tokens) > vocab_size:
            raise ValueError(f"the tokenizer has {len(tokens)} tokens, more than the model's "
                             f"{vocab_size}")
        padding = range(len(tokens), vocab_size)  # ids the model has past the tokenizer's
        self.tokens = tokens + [f"<[{i}]>".encode() for i in padding]  # as llguidance pads
        self.special_token_ids = special + list(padding)
        self.eos_token_id = eos_token_id
        self.encoder = encoder

    def release_tokens(self) -> None:
        """Drop the token lists once llguidance has copied them into its trie (it keeps this
        object to encode with): 262k small objects would otherwise stay resident."""
        self.tokens, self.special_token_ids = [], []

    def __call__(self, text: str) -> list[int]:
        return self.encoder(text)


def index_tokenizer_file(path: Path, vocab_size: int, eos_token_ids: list[int]
                         ) -> tuple[llguidance.LLTokenizer, GrammarVocabulary]:
    """llguidance's index of the tokenizer in ``path`` (a ``tokenizer.json``), the same index
    as ``LLTokenizer(path.read_text(), n_vocab=vocab_size, eos_token=eos_token_ids)``, and the
    vocabulary it encodes with (its encoder process not started yet). The tokens' bytes come
    from the ``token_bytes.msgpack`` beside it where there is one (``heron.tokenizer.
    token_bytes``: no parse of the JSON here, ~1.6 s and ~350 MiB of transient heap less)."""
    import llguidance
    from tokenizers import Tokenizer

    if not eos_token_ids:
        raise ValueError("the grammar index needs the model's eos token ids")
    saved = read_token_bytes(path.parent)  # written beside it by the API process (GGUF)
    if saved is None:
        saved = token_bytes(Tokenizer.from_file(str(path)))  # the tokenizer is dropped
        release_free_heap()  # parsing tokenizer.json freed hundreds of MB: before the trie
    tokens, special = saved
    del saved
    vocabulary = GrammarVocabulary(tokens, special, vocab_size, eos_token_ids[0],
                                   EncoderProcess(path))
    del tokens, special
    index = llguidance.LLTokenizer(cast("TokenizerWrapper", vocabulary), n_vocab=vocab_size,
                                   eos_token=eos_token_ids)
    vocabulary.release_tokens()
    return index, vocabulary
