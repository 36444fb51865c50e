"""The vocabulary llguidance indexes, read from a ``tokenizer.json`` with a small footprint.

Given the JSON text, llguidance parses it with serde, builds its own HF tokenizer and then its
token trie: for Gemma's 262,144 tokens that peaked at +445 MiB and kept 225 MiB in the engine
process. Here the ``tokenizers`` library loads the file once, the bytes of every token are
derived from it as llguidance's own HF adapter does, the tokenizer is dropped, and llguidance
gets the bytes through its ``TokenizerWrapper`` protocol: it then builds only the trie and its
slices (114 MiB kept; 232 MiB when the tokenizer stayed to encode). Masks are identical
(``tests/test_grammar_vocab.py`` compares both indexes, token by token and mask by mask): the
tokens' bytes and special flags are the same, and the text llguidance tokenizes (a grammar's
forced bytes) is encoded by the same tokenizer, with llguidance's one change (no ``Prepend``
normalizer inside a sequence), in a child process (``heron.engine.forced_text``)::

    tokenizer.json --tokenizers--> Tokenizer --id_to_token--> token bytes --+--> LLTokenizer
          |                        (dropped)                                |
          '--> EncoderProcess (started by the first compile): encode(text) <-- llguidance calls
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from heron.engine.forced_text import EncoderProcess
from heron.heap import release_free_heap

if TYPE_CHECKING:
    import llguidance
    from llguidance._tokenizer import TokenizerWrapper
    from tokenizers import Tokenizer

SPECIAL_MARKER = 0xFF  # llguidance's first byte of a special token in its trie


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
    vocabulary it encodes with (its encoder process not started yet)."""
    import llguidance
    from tokenizers import Tokenizer

    if not eos_token_ids:
        raise ValueError("the grammar index needs the model's eos token ids")
    tokens, special = token_bytes(Tokenizer.from_file(str(path)))  # the tokenizer is dropped
    release_free_heap()  # parsing tokenizer.json freed hundreds of MB: before the trie lands
    vocabulary = GrammarVocabulary(tokens, special, vocab_size, eos_token_ids[0],
                                   EncoderProcess(path))
    del tokens, special
    index = llguidance.LLTokenizer(cast("TokenizerWrapper", vocabulary), n_vocab=vocab_size,
                                   eos_token=eos_token_ids)
    vocabulary.release_tokens()
    return index, vocabulary


def token_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], list[int]]:
    """(the bytes of each token id, the ids llguidance treats as special: added tokens marked
    special, and added ones spelled ``<...>``)."""
    decode = _piece_decoder(tokenizer)
    added = tokenizer.get_added_tokens_decoder()
    tokens: list[bytes] = []
    special: list[int] = []
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        piece = tokenizer.id_to_token(token_id)
        if piece is None:  # an id the tokenizer skips: llguidance leaves it empty
            tokens.append(b"")
        elif token_id in added:
            tokens.append(piece.encode())
            if added[token_id].special or (piece.startswith("<") and piece.endswith(">")):
                special.append(token_id)
        else:
            tokens.append(decode(piece))
    return tokens, special


def _piece_decoder(tokenizer: Tokenizer) -> Any:
    """piece -> bytes for the decoder kinds llguidance reads: byte-level (GPT-2's byte-to-char
    table) or byte fallback (``<0xAB>`` pieces, a replaced space character)."""
    state = json.loads(tokenizer.decoder.__getstate__()) if tokenizer.decoder else {}
    if state.get("type") == "ByteLevel":
        table = _byte_level_chars()
        return lambda piece: _byte_level(piece, table)
    decoders = state.get("decoders", []) if state.get("type") == "Sequence" else []
    if not any(d.get("type") == "ByteFallback" for d in decoders):
        raise ValueError(f"llguidance cannot index a tokenizer with the decoder {state}")
    space = " "
    for d in decoders:
        pattern = d.get("pattern", {}).get("String")
        if d.get("type") == "Replace" and d.get("content") == " " and pattern and len(pattern) == 1:
            space = pattern
    return functools.partial(_byte_fallback, space=space)


def _byte_fallback(piece: str, space: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace(space, " ").encode()


def _byte_level(piece: str, table: dict[str, int]) -> bytes:
    try:
        return bytes(table[char] for char in piece)
    except KeyError:  # a piece outside the byte alphabet: llguidance leaves it empty
        return b""


@functools.cache
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's table: printable Latin-1 bytes stand for themselves, the others for U+0100...
    in byte order."""
    table, extra = {}, 0x100
    for byte in range(256):
        char = chr(byte)
        if "!" <= char <= "~" or "\u00a1" <= char <= "\u00ac" or "\u00ae" <= char <= "\u00ff":
            table[char] = byte
        else:
            table[chr(extra)] = byte
            extra += 1
    return table
