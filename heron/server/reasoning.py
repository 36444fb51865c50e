"""Reasoning out of generated text: models that think in ``<think>...</think>`` before answering.

``--reasoning-parser`` picks how the start of the output is read (the end is always the first
``</think>``)::

    qwen3        the output opens the reasoning with <think> (Qwen3's template leaves it to the
                 model), or the rendered prompt ends with <think> (templates that open it for
                 the model: Qwen3 thinking-2507, recent DeepSeek-R1 distills)
    deepseek_r1  the output starts inside the reasoning, <think> written or not (DeepSeek-R1's
                 templates put it in the prompt; a leading <think> is dropped)
    auto         qwen3 when the chat template holds "<think>", else none (the default)
    none         no parsing: the thinking stays in the content

A prompt that ends with ``</think>`` closed an empty reasoning (Qwen3's template with
``enable_thinking`` false, DeepSeek-V3.1's non-thinking mode): thinking is off, and the output
does not start inside the reasoning, whatever the parser (a ``<think>`` it writes still opens
one). With thinking on, a structured output's grammar (``response_format``, tools) lets the
reasoning come first and applies after ``</think>`` (``ReasoningParser.grammar_mode``), so the
output splits as free text does.

The reasoning is the text between the tags, whitespace around it dropped; the content is what
follows ``</think>``, leading whitespace dropped (Qwen3's template strips both the same way when
it renders the turn again). A finish inside the reasoning leaves the content empty. Stop
strings and tool calls apply to the content only (``ThinkScanner.advance`` tells the
detokenizer where the content starts).

``ThinkScanner`` follows a growing text in O(new text) per step; ``ReasoningStream`` turns one
choice's deltas into reasoning and content pieces (the pieces joined equal the final split)
and counts the tokens generated inside the reasoning, closing tag included.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
REASONING_PARSERS = ("auto", "none", "qwen3", "deepseek_r1")
_WS = " \t\n\r"


def resolve_reasoning_parser(name: str, chat_template: str | None) -> str | None:
    """The parser a server runs (None: none) for its ``--reasoning-parser`` and the model's
    chat template; ValueError for an unknown name."""
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(REASONING_PARSERS)}")
    if name == "auto":
        return "qwen3" if chat_template is not None and THINK_OPEN in chat_template else None
    return None if name == "none" else name


@dataclass(frozen=True)
class ReasoningParser:
    """How one request's output is read: ``opened`` when it starts inside the reasoning;
    ``thinking`` false when the prompt closed the reasoning (thinking off)."""

    opened: bool
    thinking: bool = True

    @classmethod
    def of(cls, name: str, prompt_text: str) -> ReasoningParser:
        """The parser ``name`` for a prompt."""
        prompt = prompt_text.rstrip(_WS)
        if prompt.endswith(THINK_CLOSE):
            return cls(False, thinking=False)
        return cls(name == "deepseek_r1" or prompt.endswith(THINK_OPEN))

    @property
    def grammar_mode(self) -> str:
        """How a structured output's grammar lets the reasoning come first (``think`` of
        ``StructuredOutputsParams``): "" with thinking off."""
        if not self.thinking:
            return ""
        return "opened" if self.opened else "may_open"

    def scanner(self) -> ThinkScanner:
        return ThinkScanner(self.opened)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class ThinkScanner:
    """Where the reasoning and the content lie in a text that only grows.

    ``start``: where the reasoning text begins (after ``<think>``), -1 when the output has no
    reasoning, None while undecided (a prefix of ``<think>`` so far). ``end``: where
    ``</think>`` begins, None while open. ``content_start``: where the content begins."""

    def __init__(self, opened: bool) -> None:
        self.opened = opened
        self.start: int | None = None
        self.end: int | None = None
        self.content_start: int | None = None
        self._scan = 0  # where to look for </think> next

    @property
    def has_reasoning(self) -> bool:
        return self.start is not None and self.start >= 0

    def advance(self, text: str, final: bool = False) -> int | None:
        """Follow ``text`` (the last one given, grown); the content's start once known."""
        if self.content_start is not None:
            return self.content_start
        if self.start is None:
            self.start = self._decide(text, final)
            if self.start is None:
                return None
        if self.start < 0:
            self.content_start = 0
            return 0
        close = text.find(THINK_CLOSE, max(self.start, self._scan))
        if close < 0:
            self._scan = max(self.start, len(text) - len(THINK_CLOSE) + 1)
            return None
        self.end, self.content_start = close, close + len(THINK_CLOSE)
        return self.content_start

    def _decide(self, text: str, final: bool) -> int | None:
        i = len(text) - len(text.lstrip(_WS))
        if text.startswith(THINK_OPEN, i):
            return i + len(THINK_OPEN)
        if not final and THINK_OPEN.startswith(text[i:]):
            return None
        return 0 if self.opened else -1


class ReasoningStream:
    """One choice's text split as it grows: ``feed`` returns the new reasoning and content."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.scanner = parser.scanner()
        self.text = ""
        self.reasoning = ""  # sent so far
        self._reasoning_at = -1  # text offset sent up to (-1: nothing yet)
        self._content_at = -1
        self._marks: list[tuple[int, int]] = []  # (text offset a delta began at, its tokens)

    def feed(self, text: str, num_tokens: int = 0, final: bool = False) -> tuple[str, str]:
        self._marks.append((len(self.text), num_tokens))
        self.text += text
        content_start = self.scanner.advance(self.text, final)
        reasoning = self._reasoning_piece(final) if self.scanner.has_reasoning else ""
        self.reasoning += reasoning
        content = self._content_piece(content_start) if content_start is not None else ""
        return reasoning, content

    @property
    def reasoning_tokens(self) -> int:
        """Tokens generated inside the reasoning (its tags included)."""
        if not self.scanner.has_reasoning:
            return 0
        end = self.scanner.content_start
        end = len(self.text) if end is None else end
        return sum(n for at, n in self._marks if at < end)

    def _reasoning_piece(self, final: bool) -> str:
        scanner, text = self.scanner, self.text
        assert scanner.start is not None
        if self._reasoning_at < 0:  # leading whitespace is dropped
            at = scanner.start
            while at < len(text) and text[at] in _WS:
                at += 1
            if at == len(text) and scanner.end is None:
                return ""
            self._reasoning_at = at
        if scanner.end is not None:
            limit = scanner.end
        elif final:
            limit = len(text)
        else:
            limit = len(text) - _partial_suffix(text, THINK_CLOSE)
        # Trailing whitespace waits for more text: the reasoning's last whitespace is dropped.
        piece = text[self._reasoning_at:max(limit, self._reasoning_at)].rstrip(_WS)
        self._reasoning_at += len(piece)
        return piece

    def _content_piece(self, content_start: int) -> str:
        text = self.text
        if self._content_at < 0:
            at = content_start
            if self.scanner.has_reasoning:  # after </think>, leading whitespace is dropped
                while at < len(text) and text[at] in _WS:
                    at += 1
                if at == len(text):
                    return ""
            self._content_at = at
        piece = text[self._content_at:]
        self._content_at = len(text)
        return piece
