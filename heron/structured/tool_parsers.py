"""Tool calls out of generated text, whole or while it streams.

A parser reads the text generated so far and returns the content and the calls it holds::

    parse(text, final) -> ParsedOutput(content, [ParsedCall(name, arguments), ...])

``arguments`` is the raw JSON text of the call's arguments exactly as generated (clients
``json.loads`` it). Parsers are monotone: for a text that only grows, each call's arguments
and the content only grow, so ``ToolCallStream`` can turn successive parses into OpenAI's
streaming deltas (a call's first delta carries its id, type and name, later ones argument
pieces), and the streamed pieces joined equal the final parse of the full text.

Formats::

    hermes       <tool_call>{"name": "f", "arguments": {...}}</tool_call>   (content may precede)
    llama3_json  {"name": "f", "parameters": {...}}; {"name": "g", ...}     (the whole output)
    mistral      [TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]      (tokenizer v3 / v7)
                 [TOOL_CALLS]f[ARGS]{...}[TOOL_CALLS]g[CALL_ID]id[ARGS]{...}  (v11+; content
                 may precede either)
    pythonic     [f(a="x", b=[1, None]), g()]   (Python literals only; <|python_start|> may
                 open it, Llama 4's; the list must be the output's start)
    named        the whole output is the arguments of one known function

Call ids: ``call_`` and 24 hex digits; the mistral parser's are 9 letters and digits (Mistral's
chat templates refuse others), or the id the model wrote after ``[CALL_ID]``.
"""

from __future__ import annotations

import ast
import json
import math
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

_WS = " \t\n\r"
_SCALAR_END = ",}] \t\n\r"
_PYTHON_TAG = "<|python_tag|>"


@dataclass
class ParsedCall:
    """One call: the function's name and its arguments' raw JSON text (partial while streaming)."""

    name: str
    arguments: str
    id: str | None = None  # the id the model wrote (Mistral's [CALL_ID]); None: heron makes one


@dataclass
class ParsedOutput:
    """The text that is not a call, and the calls, in order."""

    content: str
    calls: list[ParsedCall] = field(default_factory=list)


class ToolParser(Protocol):
    def parse(self, text: str, final: bool) -> ParsedOutput:
        """Content and calls of ``text``; ``final``: no more text will come."""
        ...

    def new_call_id(self) -> str:
        """An id for a call the model wrote none for."""
        ...


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


_ALPHANUMERIC = string.ascii_letters + string.digits


def new_mistral_call_id() -> str:
    """9 letters and digits: the only ids Mistral's chat templates and tokenizers accept."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


def is_mistral_call_id(call_id: str) -> bool:
    return len(call_id) == 9 and call_id.isascii() and call_id.isalnum()


# ==== a small scanner for JSON objects that may still be growing =================================


@dataclass
class _Member:
    key: str
    start: int  # where the value starts
    end: int | None  # one past its end; None while it may still grow


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _string_end(s: str, i: int) -> int | None:
    """One past the closing quote of the JSON string opening at ``s[i]``, or None if open."""
    j = i + 1
    while j < len(s):
        if s[j] == "\\":
            j += 2
        elif s[j] == '"':
            return j + 1
        else:
            j += 1
    return None


def _value_end(s: str, i: int) -> int | None:
    """One past the end of the JSON value starting at ``s[i]``, or None while it is open."""
    if i >= len(s):
        return None
    if s[i] == '"':
        return _string_end(s, i)
    if s[i] in "{[":
        depth, j = 0, i
        while j < len(s):
            c = s[j]
            if c == '"':
                end = _string_end(s, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(s) and s[j] not in _SCALAR_END:
        j += 1
    return j if j < len(s) else None  # a number at the very end may still grow


def scan_object(s: str, i: int) -> tuple[list[_Member], int | None]:
    """The top-level members of the JSON object opening at ``s[i]`` (``{``) and one past its
    closing brace (None while open or malformed)."""
    members: list[_Member] = []
    pos = i + 1
    while True:
        pos = _skip_ws(s, pos)
        if pos >= len(s):
            return members, None
        if s[pos] == "}":
            return members, pos + 1
        if s[pos] == ",":
            pos += 1
            continue
        key_end = _string_end(s, pos) if s[pos] == '"' else None
        if key_end is None:
            return members, None
        try:
            key = json.loads(s[pos:key_end])
        except json.JSONDecodeError:
            return members, None
        pos = _skip_ws(s, key_end)
        if pos >= len(s) or s[pos] != ":":
            return members, None
        start = _skip_ws(s, pos + 1)
        end = _value_end(s, start)
        members.append(_Member(key, start, end))
        if end is None:
            return members, None
        pos = end


def call_of(s: str, members: list[_Member], args_keys: tuple[str, ...]) -> ParsedCall | None:
    """A call from an object's members once its name is complete; arguments as far as written
    ("{}" when the object ended without any)."""
    name = None
    arguments: str | None = None
    for m in members:
        if m.key == "name" and m.end is not None and name is None:
            try:
                value = json.loads(s[m.start:m.end])
            except json.JSONDecodeError:
                return None
            name = value if isinstance(value, str) else None
        elif m.key in args_keys and arguments is None:
            arguments = s[m.start:m.end if m.end is not None else len(s)]
    if not name:
        return None
    return ParsedCall(name, arguments if arguments is not None else "")


def _hold_back(text: str, marker: str) -> str:
    """``text`` less a tail that could grow into ``marker``, less trailing whitespace."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return text[:-size].rstrip()
    return text.rstrip()


# ==== parsers ======================================================================================


class HermesParser:
    """``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks; text before the first
    block is the content. A block whose name cannot be read is not a call; if no block is,
    the whole text is content."""

    open_tag = "<tool_call>"
    close_tag = "</tool_call>"
    args_keys = ("arguments", "parameters")
    new_call_id = staticmethod(new_call_id)

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(self.open_tag)
        if first < 0:
            return ParsedOutput(text if final else _hold_back(text, self.open_tag))
        calls = []
        pos = first
        while pos >= 0:
            body_start = pos + len(self.open_tag)
            close = text.find(self.close_tag, body_start)
            body = text[body_start:close if close >= 0 else len(text)]
            call = self._call(body)
            if call is not None:
                calls.append(call)
            if close < 0:
                break
            pos = text.find(self.open_tag, close + len(self.close_tag))
        if not calls and final:
            return ParsedOutput(text)
        return ParsedOutput(text[:first].rstrip(), calls)

    def _call(self, body: str) -> ParsedCall | None:
        start = _skip_ws(body, 0)
        if start >= len(body) or body[start] != "{":
            return None
        members, _ = scan_object(body, start)
        return call_of(body, members, self.args_keys)


def _opening(text: str, tag: str, opener: str, final: bool) -> int | ParsedOutput:
    """Where calls start: after blanks and an optional ``tag``, at ``opener``. Otherwise the
    output as content (nothing yet while it may still become the tag or the opener)."""
    start = _skip_ws(text, 0)
    if text.startswith(tag, start):
        start = _skip_ws(text, start + len(tag))
    if start < len(text) and text[start] == opener:
        return start
    undecided = not final and (start >= len(text) or tag.startswith(text[start:]))
    return ParsedOutput("" if undecided else (text if final else text.rstrip()))


class Llama3JsonParser:
    """Llama 3.x JSON calls: the output is ``{"name": ..., "parameters": ...}`` objects joined by
    ``;`` (an optional ``<|python_tag|>`` first). Output not opening with ``{`` is content."""

    args_keys = ("parameters", "arguments")
    new_call_id = staticmethod(new_call_id)

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = _opening(text, _PYTHON_TAG, "{", final)
        if isinstance(start, ParsedOutput):
            return start
        calls = []
        pos: int | None = start
        while pos is not None:
            members, end = scan_object(text, pos)
            call = call_of(text, members, self.args_keys)
            if call is None:
                break
            calls.append(call)
            pos = self._next_object(text, end)
        if not calls:
            return ParsedOutput(text if final else "")
        return ParsedOutput("", calls)

    @staticmethod
    def _next_object(text: str, end: int | None) -> int | None:
        if end is None:
            return None
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ";":
            pos = _skip_ws(text, pos + 1)
        return pos if pos < len(text) and text[pos] == "{" else None


class NamedParser:
    """``tool_choice`` named one function: the whole output is its arguments. ``call_ids``
    makes the call's id (the server's format's kind of id)."""

    def __init__(self, name: str, call_ids: Callable[[], str] = new_call_id) -> None:
        self.name = name
        self.new_call_id = call_ids

    def parse(self, text: str, final: bool) -> ParsedOutput:
        return ParsedOutput("", [ParsedCall(self.name, text.strip())])


class MistralParser:
    """Mistral's calls after ``[TOOL_CALLS]`` (a special token of v3+ vocabularies, kept in the
    text for this parser; else plain text); the text before it is the content.

    Tokenizer v3 / v7 (Mistral 7B v0.3, Nemo): a JSON list of ``{"name", "arguments"}`` objects.
    v11+ (Mistral Small 3.2, Magistral): ``name[ARGS]{...}`` after each ``[TOOL_CALLS]``, with
    ``[CALL_ID]id`` before ``[ARGS]`` in v11. A call's name is complete at ``[ARGS]`` (or
    at the ``{`` of its arguments when ``[ARGS]`` is missing); its arguments are the JSON
    object as far as written, or the raw text when they are no object."""

    marker = "[TOOL_CALLS]"
    args_marker = "[ARGS]"
    id_marker = "[CALL_ID]"
    new_call_id = staticmethod(new_mistral_call_id)

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(self.marker)
        if first < 0:
            return ParsedOutput(text if final else _hold_back(text, self.marker))
        body = _skip_ws(text, first + len(self.marker))
        if body < len(text) and text[body] in "[{":
            calls = self._json_calls(text, body)
        else:
            calls = self._named_calls(text, first, final)
        if not calls and final:
            return ParsedOutput(text)
        return ParsedOutput(text[:first].rstrip(), calls)

    @staticmethod
    def _json_calls(text: str, pos: int) -> list[ParsedCall]:
        """``[{...}, {...}]`` (or objects without the list) from ``pos``."""
        if text[pos] == "[":
            pos = _skip_ws(text, pos + 1)
        calls = []
        while pos < len(text) and text[pos] == "{":
            members, end = scan_object(text, pos)
            call = call_of(text, members, ("arguments", "parameters"))
            if call is None:
                break
            calls.append(call)
            if end is None:
                break
            pos = _skip_ws(text, end)
            pos = _skip_ws(text, pos + 1) if pos < len(text) and text[pos] == "," else len(text)
        return calls

    def _named_calls(self, text: str, first: int, final: bool) -> list[ParsedCall]:
        """``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`` groups from ``first`` (a marker inside the
        arguments' JSON strings starts no call)."""
        calls = []
        pos = first
        while pos >= 0:
            call, end = self._named_call(text, pos + len(self.marker), final)
            if call is None:
                break
            calls.append(call)
            pos = text.find(self.marker, end) if end is not None else -1
        return calls

    def _named_call(self, text: str, start: int, final: bool) -> tuple[ParsedCall | None, int | None]:
        """The call whose name starts at ``start`` and where its arguments end (None: open)."""
        next_marker = text.find(self.marker, start)
        head_end, args_start = _mistral_head(text, start, self.args_marker)
        if head_end is None or (0 <= next_marker < head_end):
            return None, None
        name, _, call_id = text[start:head_end].partition(self.id_marker)
        name, call_id = name.strip(), call_id.strip()
        if not name or not _is_name(name):
            return None, None
        begin = _skip_ws(text, args_start)
        if begin < len(text) and text[begin] == "{":
            end = _value_end(text, begin)
            arguments = text[begin:end if end is not None else len(text)]
        else:
            end = next_marker if next_marker >= 0 else None
            arguments = text[begin:end if end is not None else len(text)]
            if end is None and not final:
                arguments = _hold_back(arguments, self.marker)
            arguments = arguments.rstrip()
        return ParsedCall(name, arguments, call_id if is_mistral_call_id(call_id) else None), end


def _mistral_head(text: str, start: int, args_marker: str) -> tuple[int | None, int]:
    """Where a v11 call's name (and id) from ``start`` ends, and where its arguments start: at
    ``[ARGS]``, or at the first ``{`` when there is none before it; (None, 0) while neither
    is written."""
    at = text.find(args_marker, start)
    brace = text.find("{", start)
    if at >= 0 and (brace < 0 or at < brace):
        return at, at + len(args_marker)
    return (brace, brace) if brace >= 0 else (None, 0)


def _is_name(name: str) -> bool:
    return len(name) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)


def mistral_template_id(call_id: str) -> str:
    """The id a Mistral chat template sees for ``call_id``: itself when it is 9 letters and
    digits; else its last 9 characters when those are (``call_`` + hex, Anthropic's
    ``toolu_...``); else 9 characters derived from it. The same id always maps the same way,
    so a call and its result still pair up."""
    if is_mistral_call_id(call_id):
        return call_id
    if is_mistral_call_id(call_id[-9:]):
        return call_id[-9:]
    import hashlib

    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    digits = []
    for _ in range(9):
        number, digit = divmod(number, len(_ALPHANUMERIC))
        digits.append(_ALPHANUMERIC[digit])
    return "".join(digits)


# ==== pythonic ======================================================================================

_PYTHON_START = "<|python_start|>"
_PYTHON_END = "<|python_end|>"
_JSON_NAMES = {"true": True, "false": False, "null": None}


class _NotLiteral(ValueError):
    """A call's text is not ``name(key=literal, ...)``."""


class PythonicParser:
    """``[f(a=1, b="x"), g()]``: a Python list of calls with keyword arguments whose values are
    literals (strings, numbers, True / False / None, lists, tuples, dicts; JSON's true / false /
    null too), read with ``ast`` (nothing is evaluated). The list must open the output
    (``<|python_start|>`` may come first); text after it is content.

    A call is reported once its closing parenthesis is read and it checks out, its arguments
    then whole (a JSON object); a call that does not check out ends the list. Output whose first
    call does not check out, or that is no list of calls, is content."""

    new_call_id = staticmethod(new_call_id)

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = _opening(text, _PYTHON_START, "[", final)
        if isinstance(start, ParsedOutput):
            return start
        calls, rest, broken = self._calls(text, start + 1)
        if not calls:
            return ParsedOutput(text if final or broken else "")
        if rest is None:
            return ParsedOutput("", calls)
        return ParsedOutput(self._after_list(text[rest:], final), calls)

    @staticmethod
    def _calls(text: str, pos: int) -> tuple[list[ParsedCall], int | None, bool]:
        """The calls of the list opened before ``pos``, where the text after its ``]`` starts
        (None while it is open or after a call that does not check out), and whether one
        did not."""
        calls: list[ParsedCall] = []
        while True:
            pos = _skip_ws(text, pos)
            open_paren = text.find("(", pos)
            if open_paren < 0:
                return calls, None, not _could_be_name(text[pos:])
            end = _python_value_end(text, open_paren)
            if end is None:
                return calls, None, not text[pos:open_paren].strip().isidentifier()
            try:
                calls.append(_python_call(text[pos:end]))
            except _NotLiteral:
                return calls, None, True
            pos = _skip_ws(text, end)
            if pos < len(text) and text[pos] == "]":
                return calls, pos + 1, False
            if pos >= len(text) or text[pos] != ",":
                return calls, None, pos < len(text)
            pos += 1

    @staticmethod
    def _after_list(rest: str, final: bool) -> str:
        rest = rest.strip()
        if rest.startswith(_PYTHON_END):
            rest = rest[len(_PYTHON_END):].lstrip()
        elif not final and _PYTHON_END.startswith(rest):
            return ""
        return rest if final else rest.rstrip()


def _could_be_name(text: str) -> bool:
    stripped = text.strip()
    return not stripped or stripped.isidentifier()


def _python_value_end(s: str, i: int) -> int | None:
    """One past the bracket closing the one at ``s[i]``, skipping Python strings; None if open."""
    depth, j = 0, i
    while j < len(s):
        c = s[j]
        if c in "'\"":
            j = _python_string_end(s, j)
            if j < 0:
                return None
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


def _python_string_end(s: str, i: int) -> int:
    """One past the end of the string literal opening at ``s[i]`` (triple quotes too); -1 if open."""
    quote = s[i] * 3 if s.startswith(s[i] * 3, i) else s[i]
    j = i + len(quote)
    while j < len(s):
        if s[j] == "\\":
            j += 2
        elif s.startswith(quote, j):
            return j + len(quote)
        else:
            j += 1
    return -1


def _python_call(source: str) -> ParsedCall:
    """``name(key=literal, ...)`` as a call with JSON arguments; _NotLiteral otherwise."""
    try:
        node = ast.parse(source.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise _NotLiteral(str(e)) from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        raise _NotLiteral("not a call with keyword arguments")
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None or keyword.arg in arguments:  # **spread, or a key twice
            raise _NotLiteral("keyword arguments must be named once each")
        arguments[keyword.arg] = _literal(keyword.value)
    return ParsedCall(node.func.id, json.dumps(arguments, ensure_ascii=False))


def _literal(node: ast.expr) -> Any:
    """The JSON value of a literal node; _NotLiteral for anything else."""
    if isinstance(node, ast.Constant) and _is_json_scalar(node.value):
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant) and _is_number(node.operand.value)):
        number: float = node.operand.value  # type: ignore[assignment]  # int or float
        return -number if isinstance(node.op, ast.USub) else number
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for key, value in zip(node.keys, node.values):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                raise _NotLiteral("dict keys must be strings")
            out[key.value] = _literal(value)
        return out
    raise _NotLiteral(f"not a literal: {type(node).__name__}")


def _is_number(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and math.isfinite(value))


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool)) or _is_number(value)


PARSERS: dict[str, Callable[[], ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
}


def make_parser(name: str) -> ToolParser:
    """A parser by its ``--tool-call-parser`` name; ValueError naming the known ones."""
    if name not in PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(PARSERS)}")
    return PARSERS[name]()


# ==== streaming ====================================================================================


@dataclass
class ToolCallDelta:
    """One streamed piece of call ``index``: the first carries ``id`` and ``name``."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


class ToolCallStream:
    """Turns the growing text of one choice into content pieces and tool-call deltas."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.parsed = ParsedOutput("")
        self.call_ids: list[str] = []
        self._content_sent = 0
        self._args_sent: list[int] = []

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """Add generated text; returns the new content and the new call pieces."""
        self.text += text
        self.parsed = self.parser.parse(self.text, final)
        content = self.parsed.content[self._content_sent:]
        self._content_sent = max(self._content_sent, len(self.parsed.content))
        deltas = []
        for index, call in enumerate(self.parsed.calls):
            if index == len(self.call_ids):
                self.call_ids.append(call.id or self.parser.new_call_id())
                self._args_sent.append(len(call.arguments))
                deltas.append(ToolCallDelta(index, call.arguments, self.call_ids[index], call.name))
            elif len(call.arguments) > self._args_sent[index]:
                deltas.append(ToolCallDelta(index, call.arguments[self._args_sent[index]:]))
                self._args_sent[index] = len(call.arguments)
        return content, deltas
