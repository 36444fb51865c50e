"""Constraint specs -> llguidance grammar text; validation without a tokenizer (API side).

Both processes build grammars from the same function, ``grammar_text``: the API process
validates a spec (a bad one is a 400, before anything reaches the engine), the engine core
compiles it against the tokenizer (``heron.engine.structured``). This module does not import
torch, so the API process stays light.

JSON output has bounded whitespace (``JSON_WHITESPACE``): a model can never loop on blanks
between tokens, only write a document (or be cut by max_tokens).
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


# ==== spec -> grammar text ======================================================================


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar for a spec; ValueError when the spec is malformed."""
    from llguidance import LLMatcher

    if params.kind == "json":
        schema = load_schema(params.spec)
        text = schema if isinstance(schema, dict) else json.dumps(schema)  # true / false
        return LLMatcher.grammar_from_json_schema(text, defaults=_JSON_OPTIONS)
    if params.kind == "regex":
        return LLMatcher.grammar_from_regex(params.spec)
    if params.kind == "choice":
        choices = json.loads(params.spec)
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    return LLMatcher.grammar_from_lark(lark_of(params.spec))


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


def describe_kind(kind: str) -> str:
    """How errors name a spec of this kind."""
    return {"json": "the JSON schema", "regex": "the regex", "choice": "the choice list"}.get(
        kind, "the grammar")


def short_error(message: str) -> str:
    """llguidance errors can quote whole grammars: one line, capped."""
    text = re.sub(r"\s+", " ", message).strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS - 3] + "..."


# ==== validation without a tokenizer =============================================================


class SpecValidator:
    """Checks that specs compile (grammar built without a tokenizer, ~0.2-1 ms); remembers the
    last ``capacity`` specs that did, so repeated schemas cost a dict lookup."""

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
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - the grammar engine's own errors mean "bad spec"
            error = str(e)
        if error:
            raise ValueError(f"{describe_kind(params.kind)} does not compile: {short_error(error)}")
        self._ok[params] = None
        if len(self._ok) > self.capacity:
            self._ok.popitem(last=False)
