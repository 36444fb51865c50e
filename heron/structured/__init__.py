"""Structured output and tool calling: output constraints, grammar backend, tool-call formats.

``params``       StructuredOutputsParams: the (kind, spec) pair that travels to the engine
``grammar``      spec -> llguidance grammar text; validation without a tokenizer (API side)
``backend``      engine side: compilation off the hot loop, per-request matchers, bitmasks
``tools``        request side: response_format / tools / tool_choice -> constraint and parser
``tool_parsers`` tool calls out of generated text (hermes, llama3_json, mistral, pythonic,
               named), for streaming too
"""

from __future__ import annotations

from heron.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
