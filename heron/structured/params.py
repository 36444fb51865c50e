"""The constraint a request puts on its output: a kind and the spec text, nothing more.

This is what crosses from the API process into the engine core (inside
``SamplingParams.structured_outputs``, msgspec-encoded): the engine never sees the
HTTP request, only one of these. Kinds (vLLM's names)::

    json     a JSON schema, as JSON text        {"type": "object", ...}
    regex    a regular expression (Rust regex syntax, whole output)
    choice   a JSON list of strings; the output is exactly one of them
    grammar  a context-free grammar: GBNF/EBNF (llama.cpp style) or Lark (llguidance style)
    text     any text (no spec): only the reasoning before it is bounded (``think_budget``)

``json_object`` mode is ``json`` with the schema ``{"type": "object"}``.

``think``: a thinking model (a reasoning parser runs, thinking is on) reasons before the
constraint applies, as vLLM starts the grammar after ``</think>``::

    ""          the constraint governs the output from its first token
    "may_open"  a reasoning block ``<think>...</think>`` may come first (the output opens it)
    "opened"    the output starts inside the reasoning (the prompt opened it): it closes with
                ``</think>`` (a repeated leading ``<think>`` allowed), then the constraint

``think_budget``: at most this many tokens between ``<think>`` and ``</think>`` (the tags' own
tokens not counted, as vLLM's ``thinking_token_budget``), then ``</think>`` is forced; None: no
bound. Enforced where the tags are tokens of the vocabulary (llguidance's ``max_tokens`` on the
reasoning rule); with text tags the engine compiles the reasoning unbounded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "text")
THINK_MODES = ("", "may_open", "opened")
JSON_OBJECT_SCHEMA = '{"type": "object"}'


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One output constraint: ``kind`` (see ``KINDS``) and its ``spec`` text, and whether a
    reasoning block comes first (``think``, see ``THINK_MODES``). Hashable: the grammar caches
    key on it."""

    kind: str
    spec: str
    think: str = ""
    think_budget: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured_outputs kind must be one of {', '.join(KINDS)}, "
                             f"got {self.kind!r}")
        if self.kind != "text" and (not isinstance(self.spec, str) or not self.spec.strip()):
            raise ValueError(f"a {self.kind} constraint needs a non-empty spec, got {self.spec!r}")
        if self.think not in THINK_MODES:
            raise ValueError(f"think must be one of {THINK_MODES}, got {self.think!r}")
        if self.think_budget is not None and (self.think_budget < 0 or not self.think):
            raise ValueError(f"think_budget must be a non-negative number of tokens with think "
                             f"set, got {self.think_budget!r} (think {self.think!r})")

    @classmethod
    def free_text(cls, think: str, budget: int) -> StructuredOutputsParams:
        """Any output, but a reasoning first of at most ``budget`` tokens."""
        return cls("text", "", think=think, think_budget=budget)

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str) -> StructuredOutputsParams:
        """From a schema (a dict, ``true``, or its JSON text)."""
        if isinstance(schema, str):
            return cls("json", schema)
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls("json", json.dumps(schema))

    @classmethod
    def json_object(cls) -> StructuredOutputsParams:
        return cls("json", JSON_OBJECT_SCHEMA)

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutputsParams:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredOutputsParams:
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"choice needs a non-empty list of non-empty strings, got {choices!r}")
        return cls("choice", json.dumps(list(choices)))

    @classmethod
    def grammar(cls, text: str) -> StructuredOutputsParams:
        return cls("grammar", text)

    def describe(self) -> str:
        """A short label for logs and errors: the kind and the spec's first characters."""
        spec = self.spec if len(self.spec) <= 60 else self.spec[:57] + "..."
        label = f"{self.kind} {spec!r}" + (f" after reasoning ({self.think})" if self.think else "")
        return label + (f", at most {self.think_budget} tokens" if self.think_budget is not None
                        else "")
