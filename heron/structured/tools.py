"""Request side of tool calling: ``tools`` + ``tool_choice`` -> an output constraint and a parser.

::

    tool_choice   constraint (a Lark grammar unless noted)          parser
    -----------   ----------------------------------------------    ---------------------
    none          the response format's, if any                     none: the text is content
    auto          --tool-call-parser set, no response format:        that parser (the model's
                    none (the model writes its own format)             own format)
                  otherwise: text | calls                            the format's parser
                    (a JSON response format: document | calls)
    required      calls (a response format waits for a later turn)   the format's parser
    named         the function's parameter schema (json)            NamedParser

``allowed`` (OpenAI's ``allowed_tools`` choice, mode auto or required): the calls may name only
those functions (the chat template still shows every tool, so the prompt, and its cache, stay
the same whichever tools a turn allows); auto with a subset is constrained even under
--tool-call-parser, else the model could call a tool it may not.

``calls`` are one call, or several when ``parallel_tool_calls``, in a ``ToolCallFormat``:
hermes (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, the built-in Gemma
template's format and the default), llama3_json, mistral (``[TOOL_CALLS] [{...}]``, or
``[TOOL_CALLS]name[ARGS]{...}`` for a v11+ vocabulary, the markers as its special tokens) or
pythonic (``[name(key=value, ...)]``, each value JSON of its property's schema). A call is
constrained to a known name with arguments matching that function's ``parameters`` schema.
The free-text branch may not open with the call marker (nor with whitespace), so text and
calls never share a prefix.
"""

from __future__ import annotations

import functools
import json
import keyword
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from heron.structured.params import StructuredOutputsParams
from heron.structured.tool_parsers import PARSERS, NamedParser, ToolParser

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call: its name and JSON-schema parameters."""

    name: str
    parameters: dict[str, Any]

    @classmethod
    def of(cls, name: str, parameters: dict[str, Any] | None) -> ToolSpec:
        if not _NAME.match(name or ""):
            raise ValueError(f"tools: function names must be 1-64 letters, digits, _ or -, "
                             f"got {name!r}")
        if parameters is not None and not isinstance(parameters, dict):
            raise ValueError(f"tools: the parameters of {name!r} must be a JSON schema object")
        return cls(name, parameters if parameters else EMPTY_PARAMETERS)

    def parameters_constraint(self) -> StructuredOutputsParams:
        return StructuredOutputsParams.json_schema(self.parameters)


@dataclass
class ToolPlan:
    """How one request uses its tools: what constrains the output, and what reads calls out of
    it (None: the output is plain content)."""

    constraint: StructuredOutputsParams | None
    parser: ToolParser | None


@dataclass(frozen=True)
class MarkerTokens:
    """Ids of Mistral's call markers where they are special tokens of the vocabulary (grammars
    must then name the token: its text spelt in ordinary tokens is another output). ``args``
    set: a tokenizer v11+ vocabulary, whose calls are ``[TOOL_CALLS]name[ARGS]{...}``."""

    tool_calls: int | None = None
    args: int | None = None


FORMATS = ("hermes", "llama3_json", "mistral", "pythonic")
# The character free text may not open with: the one every call of the format opens with.
_CALL_OPENER = {"hermes": "<", "llama3_json": "{", "mistral": "\\[", "pythonic": "\\["}


class ToolCallFormat:
    """How calls are written in text: a Lark rule ``calls`` for constraints, and its parser."""

    def __init__(self, name: str, markers: MarkerTokens | None = None) -> None:
        if name not in FORMATS:
            raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(FORMATS)}")
        self.name = name
        self.markers = markers or MarkerTokens()

    def parser(self) -> ToolParser:
        return PARSERS[self.name]()

    def call_ids(self) -> Callable[[], str]:
        """How this format's call ids are made (a named tool_choice's too)."""
        return self.parser().new_call_id

    @property
    def text_rule(self) -> str:
        """Free text that cannot be mistaken for the start of a call."""
        return f"TEXT: /[^{_CALL_OPENER[self.name]}\\s][\\s\\S]*/"

    def calls_rules(self, tools: list[ToolSpec], parallel: bool) -> str:
        if self.name == "pythonic":
            return _pythonic_rules(tools, parallel)
        if self.name == "mistral" and self.markers.args is not None:
            return self._mistral_v11_rules(tools, parallel)
        body = _call_object(tools, "parameters" if self.name == "llama3_json" else "arguments")
        if self.name == "hermes":
            # Blocks back to back: a small model then ends after a call instead of writing "\n"
            # and another call (measured on Gemma 3 270M).
            call, many = f'"<tool_call>" {body} "</tool_call>"', "call+"
        elif self.name == "mistral":
            opener = _token_or_text(self.markers.tool_calls, "[TOOL_CALLS]")
            call = body
            many = f'{opener} " [" call (", " call)* "]"' if parallel else f'{opener} " [" call "]"'
            return f"calls: {many}\ncall: {call}\n"
        else:
            call, many = body, 'call ("; " call)*'
        return f"calls: {many if parallel else 'call'}\ncall: {call}\n"

    def _mistral_v11_rules(self, tools: list[ToolSpec], parallel: bool) -> str:
        """``[TOOL_CALLS]name[ARGS]{...}`` per call, the markers as tokens where they are."""
        opener = _token_or_text(self.markers.tool_calls, "[TOOL_CALLS]")
        args = _token_or_text(self.markers.args, "[ARGS]")
        rules = [f"call: {' | '.join(f'call_{i}' for i in range(len(tools)))}"]
        for i, tool in enumerate(tools):
            rules.append(f"call_{i}: {opener} {json.dumps(tool.name)} {args} "
                         f"%json {json.dumps(_guided(tool.parameters))}")
        return f"calls: {'call+' if parallel else 'call'}\n" + "\n".join(rules) + "\n"


def _token_or_text(token: int | None, text: str) -> str:
    """A marker in a Lark rule: the special token by id (llguidance's ``<[id]>``), or its text."""
    return f"<[{token}]>" if token is not None else json.dumps(text)


def _guided(schema: dict[str, Any]) -> dict[str, Any]:
    from heron.structured.grammar import JSON_WHITESPACE, tighten_schema

    return {**tighten_schema(schema), "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}


def _call_object(tools: list[ToolSpec], args_key: str) -> str:
    """``%json`` of one call object: a known name and the arguments its parameters allow."""
    from heron.structured.grammar import JSON_WHITESPACE, rebase_refs, tighten_schema

    # Where each tool's parameters sit in the call schema (their "$ref"s move with them).
    at = [f"/properties/{args_key}"] if len(tools) == 1 else [
        f"/anyOf/{i}/properties/{args_key}" for i in range(len(tools))]
    options = [{"type": "object",
                "properties": {"name": {"const": t.name},
                               args_key: rebase_refs(tighten_schema(t.parameters), where)},
                "required": ["name", args_key], "additionalProperties": False}
               for t, where in zip(tools, at)]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
    return f"%json {json.dumps(schema)}"


# ==== pythonic calls ================================================================================


def _pythonic_rules(tools: list[ToolSpec], parallel: bool) -> str:
    """``[name(key=value, ...), ...]``: each value a JSON document of its property's schema
    (JSON strings and numbers are Python literals; the parser reads true / false / null too).
    Properties come in the schema's order, required ones always, optional ones may be left out;
    parameters that list no properties take any ``key=value`` pairs."""
    many = '"[" call (", " call)* "]"' if parallel else '"[" call "]"'
    rules = [f"calls: {many}", f"call: {' | '.join(f'call_{i}' for i in range(len(tools)))}"]
    for i, tool in enumerate(tools):
        rules += _pythonic_call_rules(f"call_{i}", tool)
    return "\n".join(rules) + "\n"


def _pythonic_call_rules(rule: str, tool: ToolSpec) -> list[str]:
    from heron.structured.grammar import rebase_refs, tighten_schema

    params = tighten_schema(tool.parameters)
    properties = params.get("properties")
    if not isinstance(properties, dict) or (not properties and params.get(
            "additionalProperties", True) is not False):
        pair = f'/[A-Za-z_][A-Za-z0-9_]*/ "=" %json {json.dumps(_guided({}))}'
        return [f'{rule}: "{tool.name}(" ({rule}_kv (", " {rule}_kv)*)? ")"', f"{rule}_kv: {pair}"]
    if not properties:
        return [f'{rule}: "{tool.name}()"']
    # With local "$ref"s, each value refers into the whole parameters schema (kept under $defs).
    root = rebase_refs(params, "/$defs/P") if '"$ref"' in json.dumps(params) else None
    required = set(params.get("required") or [])
    values, optional = [], []
    for j, (key, schema) in enumerate(properties.items()):
        value = schema if root is None else {
            "$defs": {"P": root}, "$ref": f"#/$defs/P/properties/{_pointer(key)}"}
        values.append(f'{rule}_v{j}: "{key}=" %json {json.dumps(_guided(value))}')
        optional.append(key not in required)
    return [f'{rule}: "{tool.name}(" {rule}_a0 ")"', *values,
            *_ordered_rules(rule, optional)]


def _check_pythonic_names(tools: list[ToolSpec], callable_tools: list[ToolSpec],
                          forced: bool) -> None:
    """A pythonic call is read with ``ast``: a function or parameter name that is no Python
    identifier (``get-weather``, ``class``) makes text it cannot read, left as content. Where
    such a call would be forced (tool_choice required), ValueError naming the tool (``tools[i]``);
    under auto a warning (once per name): the model may still answer in text."""
    for tool in callable_tools:
        bad = _unreadable_name(tool)
        if bad is None:
            continue
        if forced:
            index = next(i for i, t in enumerate(tools) if t is tool)
            raise ValueError(f"tools[{index}]: {bad} is not a Python identifier, which "
                             "--tool-call-parser pythonic needs to write a call "
                             "(name(key=value, ...)) for tool_choice required; rename it, or "
                             "name the function in tool_choice (its arguments are then JSON)")
        _warn_unreadable(bad)


def _unreadable_name(tool: ToolSpec) -> str | None:
    """'the function name ...' / 'the parameter ... of ...' that Python cannot read; None."""
    if not _is_identifier(tool.name):
        return f"the function name {tool.name!r}"
    properties = tool.parameters.get("properties")
    for key in properties if isinstance(properties, dict) else ():
        if not _is_identifier(str(key)):
            return f"the parameter name {key!r} of {tool.name!r}"
    return None


def _is_identifier(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


@functools.lru_cache(maxsize=256)
def _warn_unreadable(what: str) -> None:
    logger.warning("tools: %s is not a Python identifier: a call to it in the pythonic format "
                   "(--tool-call-parser pythonic) cannot be read and comes back as content", what)


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _ordered_rules(rule: str, optional: list[bool]) -> list[str]:
    """Rules ``{rule}_a{i}``: the values ``{rule}_v{i}``.. in order, joined by ", ", required
    ones always, optional ones at most once (``a{i}``: none of the earlier ones was written)."""
    n = len(optional)
    rules = []
    for i in range(n):
        tail = " ".join(f'(", " {rule}_v{j})' + ("?" if optional[j] else "")
                        for j in range(i + 1, n))
        body = f"{rule}_v{i} {tail}".strip()
        if optional[i]:
            body = f"{body} | {rule}_a{i + 1}" if i + 1 < n else f"({body})?"
        rules.append(f"{rule}_a{i}: {body}")
    return rules


def plan_tool_use(tools: list[ToolSpec], tool_choice: str | None, named: str | None,
                  parallel: bool, parser_name: str | None,
                  response: StructuredOutputsParams | None,
                  allowed: tuple[str, ...] | None = None,
                  markers: MarkerTokens | None = None) -> ToolPlan:
    """The constraint and parser for a request. ``tool_choice``: "none", "auto", "required", or
    None when unset; ``named``: the function a named tool_choice asks for; ``allowed``: the
    only functions the calls may name (None: all); ``markers``: the vocabulary's marker tokens
    (mistral). ValueError (naming the field) for choices that do not fit the tools."""
    _check_choice(tools, tool_choice, named, allowed)
    if not tools or tool_choice == "none":
        return ToolPlan(response, None)
    # A forced call is the whole output: a response format governs messages, and this turn
    # writes none (agents ask for both: the format applies on the turn after the call).
    fmt = ToolCallFormat(parser_name or "hermes", markers)
    if named is not None:
        tool = next(t for t in tools if t.name == named)
        return ToolPlan(tool.parameters_constraint(), NamedParser(tool.name, fmt.call_ids()))
    callable_tools = tools if allowed is None else [t for t in tools if t.name in allowed]
    if fmt.name == "pythonic":
        _check_pythonic_names(tools, callable_tools, forced=tool_choice == "required")
    rules = fmt.calls_rules(callable_tools, parallel)
    if tool_choice == "required":
        return ToolPlan(StructuredOutputsParams.grammar(f"start: calls\n{rules}"), fmt.parser())
    if parser_name is not None and response is None and len(callable_tools) == len(tools):
        return ToolPlan(None, fmt.parser())  # auto: the model writes calls its own way
    return ToolPlan(StructuredOutputsParams.grammar(_auto_grammar(fmt, rules, response)), fmt.parser())


def _auto_grammar(fmt: ToolCallFormat, rules: str, response: StructuredOutputsParams | None) -> str:
    if response is None:
        return f"start: TEXT | calls\n{rules}{fmt.text_rule}\n"
    if response.kind != "json":
        raise ValueError(f"tools with tool_choice auto combine only with a JSON response format, "
                         f"not with a {response.kind} constraint")
    from heron.structured.grammar import JSON_WHITESPACE, load_schema

    schema = load_schema(response.spec)
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    schema = {**schema, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
    return f"start: doc | calls\ndoc: %json {json.dumps(schema)}\n{rules}"


def _check_choice(tools: list[ToolSpec], tool_choice: str | None, named: str | None,
                  allowed: tuple[str, ...] | None) -> None:
    names = [t.name for t in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"tools: function names must be unique, {duplicates[0]!r} appears twice")
    if tool_choice is not None and tool_choice not in TOOL_CHOICES:
        raise ValueError(f"tool_choice must be none, auto, required or a named function, "
                         f"got {tool_choice!r}")
    forcing = named is not None or tool_choice in ("auto", "required")
    if forcing and not tools:
        raise ValueError("tool_choice needs tools: no tools were given")
    if named is not None and named not in names:
        raise ValueError(f"tool_choice names the function {named!r}, which is not among the "
                         f"tools ({', '.join(names)})")
    if allowed is not None:
        check_allowed(names, allowed, "tool_choice.tools")


def check_allowed(names: list[str], allowed: tuple[str, ...], field: str,
                  name_at: str = ".name") -> None:
    """ValueError naming the entry of ``field`` (a list, each entry's name at ``name_at``)
    when the allowed list is empty or names a function that is not among the tools."""
    if not allowed:
        raise ValueError(f"{field}: the allowed tools must name at least one function")
    for i, name in enumerate(allowed):
        if name not in names:
            raise ValueError(f"{field}[{i}]{name_at}: the function {name!r} is not among the "
                             f"tools ({', '.join(names) or 'none were given'})")
