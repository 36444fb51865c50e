"""The bytes of every token of a ``tokenizers.Tokenizer``, as llguidance's HF adapter derives
them, and a compact file of them beside a saved tokenizer.json.

The engine indexes the model's vocabulary for structured outputs (``heron.engine.
grammar_vocab``) from these bytes. Deriving them means loading the tokenizer.json: for Gemma's
262,144 tokens ~1.6 s and ~350 MiB of transient heap in the engine, at the moment its model
loads. Where the API process builds a tokenizer (a GGUF vocabulary, on the file's first start)
it writes them once, beside the tokenizer.json it saves, in ``token_bytes.msgpack`` (~2.5 MB):
the engine then reads that instead, on that start and every later one.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKEN_BYTES_FILE = "token_bytes.msgpack"


class _TokenBytes(msgspec.Struct):
    tokens: list[bytes]
    special: list[int]


def write_token_bytes(directory: Path, tokenizer: Tokenizer) -> bool:
    """Write ``token_bytes(tokenizer)`` into ``directory`` (beside its tokenizer.json); False,
    and nothing written, for a tokenizer llguidance cannot index."""
    try:
        tokens, special = token_bytes(tokenizer)
    except ValueError:
        return False
    (directory / TOKEN_BYTES_FILE).write_bytes(msgspec.msgpack.encode(_TokenBytes(tokens, special)))
    return True


def read_token_bytes(directory: Path) -> tuple[list[bytes], list[int]] | None:
    """What ``write_token_bytes`` wrote into ``directory``, or None where it wrote nothing."""
    path = directory / TOKEN_BYTES_FILE
    if not path.is_file():
        return None
    saved = msgspec.msgpack.decode(path.read_bytes(), type=_TokenBytes)
    return saved.tokens, saved.special


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
