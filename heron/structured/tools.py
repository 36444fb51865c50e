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
template's format and the default) or llama3_json. A call's JSON is constrained to a known
name with arguments matching that function's ``parameters`` schema. The free-text branch may
not open with the call marker (nor with whitespace), so text and calls never share a prefix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from heron.structured.params import StructuredOutputsParams
from heron.structured.tool_parsers import (
    HermesParser,
    Llama3JsonParser,
    NamedParser,
    ToolParser,
)

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


class ToolCallFormat:
    """How calls are written in text: a Lark rule ``calls`` for constraints, and its parser."""

    def __init__(self, name: str) -> None:
        if name not in ("hermes", "llama3_json"):
            raise ValueError(f"unknown tool call parser {name!r}; known: hermes, llama3_json")
        self.name = name

    def parser(self) -> ToolParser:
        return HermesParser() if self.name == "hermes" else Llama3JsonParser()

    @property
    def text_rule(self) -> str:
        """Free text that cannot be mistaken for the start of a call."""
        first = "<" if self.name == "hermes" else "{"
        return f"TEXT: /[^{first}\\s][\\s\\S]*/"

    def calls_rules(self, tools: list[ToolSpec], parallel: bool) -> str:
        from heron.structured.grammar import JSON_WHITESPACE, rebase_refs, tighten_schema

        args_key = "arguments" if self.name == "hermes" else "parameters"
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
        body = f"%json {json.dumps(schema)}"
        if self.name == "hermes":
            # Blocks back to back: a small model then ends after a call instead of writing "\n"
            # and another call (measured on Gemma 3 270M).
            call, many = f'"<tool_call>" {body} "</tool_call>"', "call+"
        else:
            call, many = body, 'call ("; " call)*'
        return f"calls: {many if parallel else 'call'}\ncall: {call}\n"


def plan_tool_use(tools: list[ToolSpec], tool_choice: str | None, named: str | None,
                  parallel: bool, parser_name: str | None,
                  response: StructuredOutputsParams | None,
                  allowed: tuple[str, ...] | None = None) -> ToolPlan:
    """The constraint and parser for a request. ``tool_choice``: "none", "auto", "required", or
    None when unset; ``named``: the function a named tool_choice asks for; ``allowed``: the
    only functions the calls may name (None: all). ValueError (naming the field) for choices
    that do not fit the tools."""
    _check_choice(tools, tool_choice, named, allowed)
    if not tools or tool_choice == "none":
        return ToolPlan(response, None)
    # A forced call is the whole output: a response format governs messages, and this turn
    # writes none (agents ask for both: the format applies on the turn after the call).
    if named is not None:
        tool = next(t for t in tools if t.name == named)
        return ToolPlan(tool.parameters_constraint(), NamedParser(tool.name))
    fmt = ToolCallFormat(parser_name or "hermes")
    callable_tools = tools if allowed is None else [t for t in tools if t.name in allowed]
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
