r"""Constraint specs -> llguidance grammar text; validation without a tokenizer (API side).

Both processes build grammars from the same function, ``grammar_text``: the API process
validates a spec (a bad one is a 400, before anything reaches the engine), the engine core
compiles it against the tokenizer (``heron.engine.structured``). This module does not import
torch, so the API process stays light.

JSON output has bounded whitespace (``JSON_WHITESPACE``): a model can never loop on blanks
between tokens, only write a document (or be cut by max_tokens).

A choice list is one regex lexeme, not a grammar rule per choice: the lexer's automaton takes
20,000 choices in a quarter second, where 2,000 alternatives already overflow the parser's
row limit. ``SpecValidator`` also walks each new grammar a few dozen bytes with a byte-level
tokenizer, so that an empty language (``[^\s\S]``, ``{"$ref": "#"}``) or a grammar past the
parser's limits (``start: "a" start``, 20,000 alternatives) is a 400 before any generation.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from heron.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Between JSON tokens: nothing, one space, or a newline and up to 16 spaces of indentation.
JSON_WHITESPACE = r"(?:\n {0,16}| )?"
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_pattern": JSON_WHITESPACE}
_MAX_ERROR_CHARS = 500
_MAX_RUN_CHARS = 60  # a longer quote without blanks is cut in the middle


# ==== spec -> grammar text ======================================================================


def grammar_text(params: StructuredOutputsParams, think_tokens: bool = False) -> str:
    """The llguidance grammar for a spec; ValueError when the spec is malformed. With
    ``params.think``, the spec's grammar follows a reasoning block (``think_first``), whose
    tags are the vocabulary's ``<think>`` / ``</think>`` tokens when ``think_tokens`` (and then
    ``params.think_budget`` bounds it)."""
    body = None if params.kind == "text" else _spec_grammar(params)
    if not params.think:
        return _FREE_TEXT_GRAMMAR if body is None else body
    budget = params.think_budget if think_tokens else None
    return think_first(body, params.think, think_tokens, budget)


def _spec_grammar(params: StructuredOutputsParams) -> str:
    from llguidance import LLMatcher

    if params.kind == "json":
        schema = load_schema(params.spec)
        text = schema if isinstance(schema, dict) else json.dumps(schema)  # true / false
        return LLMatcher.grammar_from_json_schema(text, defaults=_JSON_OPTIONS)
    if params.kind == "regex":
        return LLMatcher.grammar_from_regex(params.spec)
    if params.kind == "choice":
        return LLMatcher.grammar_from_regex(choice_regex(json.loads(params.spec)))
    return LLMatcher.grammar_from_lark(lark_of(params.spec))


# The reasoning's text: anything but the closing tag spelled out (the reasoning parser ends the
# reasoning at the first "</think>" in the text, token or not, so the grammar must agree).
_THINK_TEXT = r"THINK_TEXT: /(?s:.*)/ & ~/(?s:.*)<\/think>(?s:.*)/"
# Between "</think>" and the answer: Qwen3 writes "\n\n"; bounded, so no loop on blanks.
_THINK_GAP = r"THINK_GAP: /[ \t\r\n]{1,4}/"


# The answer after a reasoning with nothing to constrain it: any text. A mask of it costs about
# what no constraint does (llguidance allows every token at once: ~2 us for Qwen's 151k tokens).
_ANSWER = r"ANSWER: /(?s:.*)/"
_FREE_TEXT_GRAMMAR = f"start: ANSWER\n{_ANSWER}\n"


def think_first(body: str | None, mode: str, tokens: bool, budget: int | None = None) -> str:
    """A grammar that allows a reasoning block, then ``body`` (llguidance grammar text; None:
    any text).

    ``mode`` "may_open": ``<think>...</think>`` may come first; "opened": the output starts
    inside the reasoning, closes it (a leading ``<think>`` repeated is allowed, as the parsers
    drop one), then ``body``. ``tokens``: the tags are special tokens of the vocabulary
    (``<think>`` in llguidance's Lark; Qwen3's, DeepSeek-R1's); otherwise they are text, and the
    reasoning is one lazy lexeme that ends at the first ``</think>``. ``budget`` (tag tokens
    only): at most that many tokens of reasoning, then ``</think>`` is forced (llguidance's
    ``max_tokens`` on the reasoning's rule). ``body`` becomes the second grammar of a
    multi-grammar, referenced as ``@body``."""
    head, rules = _think_head(mode, tokens, budget)
    if body is None:
        start = f"{head} ANSWER" if mode == "opened" else f"({head})? ANSWER"
        return f"start: {start}\n{rules}{_ANSWER}\n"
    start = f"{head} THINK_GAP? @body" if mode == "opened" else f"({head} THINK_GAP?)? @body"
    lark = f"start: {start}\n{rules}{_THINK_GAP}\n"
    return json.dumps({"grammars": [{"name": "reasoning", "lark_grammar": lark},
                                    {**_single_grammar(body), "name": "body"}]})


def _think_head(mode: str, tokens: bool, budget: int | None) -> tuple[str, str]:
    """The reasoning block's expression and the rules it needs."""
    if not tokens:
        pattern = r"(<think>)?(?s:.*)<\/think>" if mode == "opened" else r"<think>(?s:.*)<\/think>"
        return "think", f"think[lazy]: /{pattern}/\n"
    opening = "<think>?" if mode == "opened" else "<think>"
    if budget is None:
        return f"{opening} THINK_TEXT </think>", f"{_THINK_TEXT}\n"
    if budget == 0:
        return f"{opening} </think>", ""
    return (f"{opening} think_text </think>",
            f"think_text[max_tokens={budget}]: THINK_TEXT\n{_THINK_TEXT}\n")


def _single_grammar(text: str) -> dict[str, Any]:
    """One grammar entry of llguidance's multi-grammar form, from grammar text (Lark, or the
    JSON form that holds one grammar)."""
    if text.lstrip().startswith("{"):
        (grammar,) = json.loads(text)["grammars"]
        return dict(grammar)
    return {"lark_grammar": text}


def choice_regex(choices: list[str]) -> str:
    """A regex matching exactly the given strings: ASCII letters and digits as themselves,
    other ASCII as ``\\x{..}`` escapes, other characters literal (none is a regex operator)."""
    return "(" + "|".join("".join(map(_regex_char, c)) for c in dict.fromkeys(choices)) + ")"


def _regex_char(char: str) -> str:
    if char.isascii() and not char.isalnum():
        return f"\\x{{{ord(char):02x}}}"
    return char


def lark_of(grammar: str) -> str:
    """A Lark grammar from GBNF/EBNF (llama.cpp style) or Lark text."""
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return any_to_lark(grammar)
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds; all mean "bad grammar"
        raise ValueError(f"the grammar could not be read: {e}") from e


def load_schema(spec: str) -> dict[str, Any] | bool:
    """The schema of a json spec, tightened (see ``tighten_schema``); ValueError if malformed."""
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"the JSON schema is not valid JSON: {e}") from e
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return tighten_schema(schema) if isinstance(schema, dict) else schema


_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMA_ONES = ("items", "additionalItems", "contains", "not", "if", "then", "else",
                   "additionalProperties", "propertyNames")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "$ref")
_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# Integers without bounds get I-JSON's interoperable range (at most 16 digits): a small model
# that would rather write a string cannot pad a number with zeros until max_tokens.
MAX_SAFE_INTEGER = 2**53 - 1


def tighten_schema(schema: dict[str, Any], closable: bool = True) -> dict[str, Any]:
    """A copy where objects that list ``properties`` and say nothing about others take no others,
    and integers without bounds stay within +-(2**53 - 1).

    Every document the tightened schema accepts, the original accepts too, so outputs stay
    valid; a small model just cannot wander into invented keys or endless digits. Objects under
    ``allOf`` (whose siblings may add properties) and objects with their own ``allOf``/``$ref``
    are left open.
    """
    out = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: _tighten_any(v) for k, v in out[key].items()}
    for key in _SUBSCHEMA_ONES:
        if isinstance(out.get(key), dict):
            out[key] = tighten_schema(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_tighten_any(s) for s in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [tighten_schema(s, closable=False) if isinstance(s, dict) else s
                        for s in out["allOf"]]
    if closable and isinstance(out.get("properties"), dict) and not any(k in out for k in _OPEN_KEYS):
        out["additionalProperties"] = False
    if out.get("type") == "integer" and not any(k in out for k in _BOUND_KEYS):
        out["minimum"], out["maximum"] = -MAX_SAFE_INTEGER, MAX_SAFE_INTEGER
    return out


def _tighten_any(value: Any) -> Any:
    return tighten_schema(value) if isinstance(value, dict) else value


_DATA_KEYS = ("const", "enum", "default", "examples")  # their values are JSON data, not schemas


def rebase_refs(schema: Any, pointer: str) -> Any:
    """A copy of ``schema`` whose local ``$ref``s (``#``, ``#/$defs/X``) still find their
    targets once it sits at JSON pointer ``pointer`` (``/properties/arguments``) inside a larger
    schema: a tool's parameters, embedded in the schema of a whole call, name their own root."""
    if isinstance(schema, list):
        return [rebase_refs(item, pointer) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            out[key] = "#" + pointer + value[1:]
        elif key in _DATA_KEYS:
            out[key] = value
        elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):  # keys are names, not keywords
            out[key] = {name: rebase_refs(item, pointer) for name, item in value.items()}
        else:
            out[key] = rebase_refs(value, pointer)
    return out


def describe_kind(kind: str) -> str:
    """How errors name a spec of this kind."""
    return {"json": "the JSON schema", "regex": "the regex", "choice": "the choice list"}.get(
        kind, "the grammar")


_SOURCE_LINE = re.compile(r"\s*\d+ \| ")  # "   1 | start: /(abc/": the grammar quoted again
_MARKER_LINE = re.compile(r"\s*[\^~]+\s*")  # the caret under the quoted line
_LONG_RUN = re.compile(rf"\S{{{_MAX_RUN_CHARS + 1},}}")


def short_error(message: str) -> str:
    """llguidance errors can quote whole grammars and dump the parser state: one line without
    the state dump, the re-quoted source lines and their carets, each long quote cut in the
    middle (so that the reason after it, 'error: unclosed group', stays), capped."""
    lines = message.split("<state>", 1)[0].splitlines()
    kept = [line for line in lines
            if not _SOURCE_LINE.match(line) and not _MARKER_LINE.fullmatch(line)]
    return cut_quotes(re.sub(r"\s+", " ", " ".join(kept)).strip())


def cut_quotes(text: str) -> str:
    """``text`` with each long quote cut in the middle, capped."""
    text = _LONG_RUN.sub(lambda m: _cut_middle(m.group(0)), text)
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS - 3] + "..."


def _cut_middle(run: str) -> str:
    head = _MAX_RUN_CHARS * 2 // 3
    return f"{run[:head]}...{run[-(_MAX_RUN_CHARS - head - 3):]}"


# ==== validation without a tokenizer =============================================================


class SpecValidator:
    """Checks that specs compile (grammar built without a tokenizer, ~0.2-1 ms) and can be
    enforced (``probe``); remembers the last ``capacity`` specs that passed, so repeated
    schemas cost a dict lookup."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._ok: OrderedDict[StructuredOutputsParams, None] = OrderedDict()

    def is_known(self, params: StructuredOutputsParams) -> bool:
        if params in self._ok:
            self._ok.move_to_end(params)
            return True
        return False

    def check(self, params: StructuredOutputsParams) -> None:
        """ValueError naming the problem when ``params`` does not compile."""
        if self.is_known(params):
            return
        from llguidance import LLMatcher

        try:
            error = LLMatcher.validate_grammar(grammar_text(params))
        except ValueError as e:  # heron's, or llguidance's quoting a value (a 4000-digit bound)
            raise ValueError(cut_quotes(str(e))) from None
        except Exception as e:  # noqa: BLE001 - the grammar engine's own errors mean "bad spec"
            error = str(e)
        if error:
            raise ValueError(f"{describe_kind(params.kind)} does not compile: {short_error(error)}")
        problem = probe(grammar_text(params))
        if problem is not None:
            raise ValueError(f"{describe_kind(params.kind)} {problem}")
        self._ok[params] = None
        if len(self._ok) > self.capacity:
            self._ok.popitem(last=False)


# ==== enforceability, with a byte-level tokenizer =================================================

PROBE_STEPS = 64  # bytes a new grammar is walked before it is accepted
_BYTE_EOS = 256


def probe(grammar: str, steps: int = PROBE_STEPS) -> str | None:
    """Walk ``grammar`` with a tokenizer whose tokens are the 256 bytes, always taking the first
    byte it allows; the problem found ("accepts no output...", "cannot be enforced: ..."), or
    None. An error here is the one a model would meet at that point of its output."""
    from llguidance import LLMatcher

    matcher = LLMatcher(_byte_tokenizer(), grammar)
    if matcher.is_error():
        return None  # tokens this vocabulary lacks (special tokens): the engine decides
    mask = bytearray(((_BYTE_EOS + 1) + 31) // 32 * 4)
    for step in range(steps):
        allowed = _allowed_bytes(matcher, mask)
        if matcher.is_error() or (not allowed and not matcher.is_accepting()):
            if step == 0:
                return "accepts no output at all (its language is empty)"
            return f"cannot be enforced: {short_error(matcher.get_error() or 'a dead end')}"
        if not allowed:
            return None  # a complete output
        if not matcher.consume_token(allowed[0]):
            return f"cannot be enforced: {short_error(matcher.get_error())}"
    return None


def _allowed_bytes(matcher: Any, mask: bytearray) -> list[int]:
    import ctypes

    buffer = (ctypes.c_char * len(mask)).from_buffer(mask)
    matcher.unsafe_compute_mask_ptr(ctypes.addressof(buffer), len(mask))
    return [b for b in range(_BYTE_EOS) if mask[b // 8] >> (b % 8) & 1]


_BYTE_TOKENIZER: Any = None


def _byte_tokenizer() -> Any:
    """An llguidance tokenizer of 256 one-byte tokens and an end token (built once, ~3 ms)."""
    global _BYTE_TOKENIZER
    if _BYTE_TOKENIZER is None:
        from llguidance import LLTokenizer
        from llguidance._tokenizer import TokenizerWrapper

        _BYTE_TOKENIZER = LLTokenizer(TokenizerWrapper(_ByteVocabulary()), n_vocab=_BYTE_EOS + 1,
                                      eos_token=_BYTE_EOS)
    return _BYTE_TOKENIZER


class _ByteVocabulary:
    """What llguidance's ``TokenizerWrapper`` reads: token bytes, the end token, an encoder."""

    eos_token_id = _BYTE_EOS
    bos_token_id = None
    tokens = [bytes([b]) for b in range(256)] + [b"</s>"]
    special_token_ids = [_BYTE_EOS]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)
