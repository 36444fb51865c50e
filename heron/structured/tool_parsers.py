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
    named        the whole output is the arguments of one known function
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Protocol

_WS = " \t\n\r"
_SCALAR_END = ",}] \t\n\r"
_PYTHON_TAG = "<|python_tag|>"


@dataclass
class ParsedCall:
    """One call: the function's name and its arguments' raw JSON text (partial while streaming)."""

    name: str
    arguments: str


@dataclass
class ParsedOutput:
    """The text that is not a call, and the calls, in order."""

    content: str
    calls: list[ParsedCall] = field(default_factory=list)


class ToolParser(Protocol):
    def parse(self, text: str, final: bool) -> ParsedOutput:
        """Content and calls of ``text``; ``final``: no more text will come."""
        ...


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


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


class Llama3JsonParser:
    """Llama 3.x JSON calls: the output is ``{"name": ..., "parameters": ...}`` objects joined by
    ``;`` (an optional ``<|python_tag|>`` first). Output not opening with ``{`` is content."""

    args_keys = ("parameters", "arguments")

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = _skip_ws(text, 0)
        if text.startswith(_PYTHON_TAG, start):
            start = _skip_ws(text, start + len(_PYTHON_TAG))
        if start >= len(text) or text[start] != "{":
            undecided = not final and (start >= len(text) or _PYTHON_TAG.startswith(text[start:]))
            return ParsedOutput("" if undecided else (text if final else text.rstrip()))
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
    """``tool_choice`` named one function: the whole output is its arguments."""

    def __init__(self, name: str) -> None:
        self.name = name

    def parse(self, text: str, final: bool) -> ParsedOutput:
        return ParsedOutput("", [ParsedCall(self.name, text.strip())])


PARSERS: dict[str, type[HermesParser] | type[Llama3JsonParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
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
                self.call_ids.append(new_call_id())
                self._args_sent.append(len(call.arguments))
                deltas.append(ToolCallDelta(index, call.arguments, self.call_ids[index], call.name))
            elif len(call.arguments) > self._args_sent[index]:
                deltas.append(ToolCallDelta(index, call.arguments[self._args_sent[index]:]))
                self._args_sent[index] = len(call.arguments)
        return content, deltas
