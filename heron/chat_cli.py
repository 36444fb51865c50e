"""``heron chat``: talk to a model from the terminal, loaded here or behind a running server.

::

    heron chat                                  # the default model, in this process
    heron chat ./my-model                       # a model directory or GGUF file, in this process
    heron chat --url http://127.0.0.1:8000      # a running heron (or any OpenAI-compatible) server

At the prompt: ``/system TEXT`` sets the system prompt, ``/clear`` forgets the conversation,
``/exit`` (or Ctrl-D) leaves. A message spans several lines between two ``\"\"\"`` lines, or
with a ``\\`` at the end of each line but the last. Ctrl-C while an answer streams stops that
answer (the engine or server drops the request); at the prompt it clears the line. When the
conversation outgrows the model's context, its oldest exchanges are forgotten, with a notice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    import httpx

    from heron.config import EngineConfig
    from heron.llm import LLM

Messages = list[dict[str, str]]
HELP = """commands:
  /system TEXT   set the system prompt (/system alone clears it)
  /clear         forget the conversation (the system prompt stays)
  /set NAME VALUE  temperature, top_p or max_tokens ("none": up to the context)
  /exit          leave (also Ctrl-D)
multi-line input: a line with \"\"\" starts and ends a block; a line ending in \\ continues.
Ctrl-C stops the answer being written."""


class ChatError(RuntimeError):
    """The model or server could not answer (shown to the user; the chat goes on)."""


class ContextTooLong(ChatError):
    """The conversation and the answer's max_tokens do not fit the model's context."""


def _context_error(message: str) -> ChatError:
    too_long = "maximum context length" in message
    return ContextTooLong(message) if too_long else ChatError(message)


@dataclass(frozen=True)
class ChatSettings:
    """The sampling settings of every answer."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int | None = None  # None: up to the context length

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body


@dataclass(frozen=True)
class Piece:
    """Text an answer adds; ``tokens``: the answer's token count so far, where known;
    ``reasoning``: a thinking model's reasoning it adds (the server's reasoning parser)."""

    text: str
    tokens: int | None = None
    finish_reason: str | None = None
    reasoning: str = ""


class Backend(Protocol):
    name: str
    # True: a KeyboardInterrupt may stop ``stream`` anywhere (an HTTP read); False: only
    # between two pieces (the engine runs in this process and must finish its step).
    interrupt_anywhere: bool

    def stream(self, messages: Messages, settings: ChatSettings) -> Iterator[Piece]: ...


# ==== backends ====================================================================================


class LocalChat:
    """A model in this process (``heron.LLM``); closing a stream aborts its request."""

    interrupt_anywhere = False

    def __init__(self, llm: LLM, name: str) -> None:
        self.llm = llm
        self.name = name

    @classmethod
    def load(cls, config: EngineConfig) -> LocalChat:
        from heron.llm import LLM
        from heron.loader import model_display_name

        return cls(LLM.from_engine_config(config), model_display_name(config.model))

    def stream(self, messages: Messages, settings: ChatSettings) -> Iterator[Piece]:
        from heron.sampling_params import SamplingParams

        tokens = 0
        try:
            params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                                    max_tokens=settings.max_tokens)
            for out in self.llm.stream_chat(messages, params):
                tokens += len(out.token_ids)
                yield Piece(out.text, tokens, out.finish_reason)
        except ValueError as err:  # a prompt longer than the context, a template error
            raise _context_error(str(err)) from err


class RemoteChat:
    """An OpenAI-compatible server: streams ``/v1/chat/completions`` (closing it hangs up,
    and the server aborts the request)."""

    interrupt_anywhere = True

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None,
                 wait_s: float = 600.0) -> None:
        import httpx

        base = url.rstrip("/")
        self.api = base if base.endswith("/v1") else f"{base}/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(None, connect=10.0))
        self.name = model or self._first_model(wait_s)

    def _first_model(self, wait_s: float) -> str:
        """The server's first model, waiting while it answers 503 (still loading)."""
        import httpx

        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                response = self.client.get(f"{self.api}/models")
            except httpx.HTTPError as err:
                raise ChatError(f"cannot reach {self.api} ({type(err).__name__}: {err})") from err
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            if not told:
                print("waiting for the server to load its model...", file=sys.stderr)
                told = True
            time.sleep(1.0)
        if response.status_code != 200:
            raise ChatError(f"{self.api}/models: {_error_text(response)}")
        models = response.json().get("data") or []
        if not models:
            raise ChatError(f"{self.api}/models lists no model")
        return str(models[0]["id"])

    def stream(self, messages: Messages, settings: ChatSettings) -> Iterator[Piece]:
        import httpx

        body = {"model": self.name, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}, **settings.body()}
        try:
            with self.client.stream("POST", f"{self.api}/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise _context_error(_error_text(response))
                yield from _sse_pieces(response)
        except httpx.HTTPError as err:
            raise ChatError(f"the connection failed ({type(err).__name__}: {err})") from err


def _sse_pieces(response: httpx.Response) -> Iterator[Piece]:
    for line in sse_lines(response.iter_text()):
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise ChatError(str(chunk["error"].get("message", chunk["error"])))
        usage = chunk.get("usage") or {}
        if "completion_tokens" in usage:
            yield Piece("", int(usage["completion_tokens"]))
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            yield Piece(delta.get("content") or "", None, choice.get("finish_reason"), reasoning)


_SSE_LINE_END = re.compile(r"\r\n|\n|\r")


def split_sse_lines(text: str) -> tuple[list[str], str]:
    """The complete lines of ``text`` and what is left, split at CR LF, LF or CR only, as the
    SSE format says: httpx's ``iter_lines`` also splits at NEL, U+2028 and the other
    ``str.splitlines`` breaks, which a server may send raw inside a JSON string (llama.cpp's
    server does), cutting an event in two. A CR at the end waits: it may be half of a CR LF."""
    held = text.endswith("\r")
    *lines, rest = _SSE_LINE_END.split(text[:-1] if held else text)
    return lines, rest + "\r" if held else rest


def sse_lines(chunks: Iterable[str]) -> Iterator[str]:
    """The lines of an event stream arriving in ``chunks`` (see ``split_sse_lines``)."""
    rest = ""
    for chunk in chunks:
        lines, rest = split_sse_lines(rest + chunk)
        yield from lines
    if rest:
        yield rest.removesuffix("\r")


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


# ==== the conversation ============================================================================


class _StopOnInterrupt:
    """While an answer streams, Ctrl-C sets ``stopped`` (and, where allowed, raises
    KeyboardInterrupt at once) instead of ending the program."""

    def __init__(self, raise_too: bool) -> None:
        self.raise_too = raise_too
        self.stopped = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.stopped = True
        if self.raise_too:
            raise KeyboardInterrupt


@dataclass
class _Stats:
    start: float
    first: float | None = None
    tokens: int | None = None
    chunks: int = 0
    finish_reason: str | None = None

    def line(self, stopped: bool) -> str:
        now = time.monotonic()
        parts = ["stopped"] if stopped else []
        tokens = self.tokens if self.tokens is not None else self.chunks
        approx = "" if self.tokens is not None else "~"
        parts.append(f"{approx}{tokens} tokens")
        if self.first is not None and tokens > 1 and now > self.first:
            parts.append(f"{(tokens - 1) / (now - self.first):.1f} tok/s")
        if self.first is not None:
            parts.append(f"first token {1000 * (self.first - self.start):.0f} ms")
        if self.finish_reason == "length":
            parts.append("cut at max tokens")
        return "[" + ", ".join(parts) + "]"


class ChatSession:
    """The read-answer loop over one backend."""

    def __init__(self, backend: Backend, settings: ChatSettings, system: str | None = None,
                 out: TextIO | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.system = system
        self.history: Messages = []
        self.out = out or sys.stdout

    def run(self) -> int:
        self._say(f"heron chat with {self.backend.name}. /help for commands, /exit or Ctrl-D "
                  "to leave, Ctrl-C stops an answer.")
        while True:
            try:
                text = read_message()
            except EOFError:
                self._say("")
                return 0
            except KeyboardInterrupt:
                self._say("")
                continue
            if text is None:
                continue
            if text.startswith("/") and self._command(text):
                return 0
            if not text.startswith("/"):
                self.answer(text)

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _command(self, text: str) -> bool:
        """Run a /command; True for /exit."""
        name, _, arg = text.partition(" ")
        if name in ("/exit", "/quit", "/bye"):
            return True
        if name == "/clear":
            self.history.clear()
            self._say("(conversation cleared)")
        elif name == "/system":
            self.system = arg.strip() or None
            self._say(f"(system prompt {'set' if self.system else 'cleared'})")
        elif name == "/set":
            self._set(arg)
        elif name in ("/help", "/?"):
            self._say(HELP)
        else:
            self._say(f"unknown command {name}; /help lists them")
        return False

    def _set(self, arg: str) -> None:
        field, _, value = arg.strip().partition(" ")
        kinds = {"temperature": float, "top_p": float, "max_tokens": int}
        if field not in kinds:
            self._say(f"/set takes one of {', '.join(kinds)}; now {self.settings}")
            return
        try:
            parsed = kinds[field](value)
        except ValueError:
            if field == "max_tokens" and value.strip().lower() == "none":
                parsed = None
            else:
                self._say(f"not a number: {value!r}")
                return
        self.settings = dataclasses.replace(self.settings, **{field: parsed})
        self._say(f"({field} = {parsed})")

    def answer(self, text: str) -> None:
        """Stream the model's answer to ``text``; a stopped answer stays in the conversation.
        Where the conversation outgrew the context, its oldest exchanges are dropped (and the
        user told) until the new message fits, as a chat page would scroll them away."""
        stats = _Stats(start=time.monotonic())
        pieces: list[str] = []
        with _StopOnInterrupt(self.backend.interrupt_anywhere) as stop:
            while True:
                messages = [{"role": "system", "content": self.system}] if self.system else []
                messages += [*self.history, {"role": "user", "content": text}]
                try:
                    self._stream(messages, stats, pieces, stop)
                except KeyboardInterrupt:
                    stop.stopped = True
                except ContextTooLong as err:
                    if pieces or not self.history:
                        self._say(f"\nerror: {err}")
                        return
                    dropped = self._drop_oldest_exchange()
                    self._say(f"(the conversation outgrew the context: forgot the oldest "
                              f"{dropped} messages)")
                    continue
                except ChatError as err:
                    self._say(f"\nerror: {err}")
                    return
                break
        self._say(("\n" if pieces and not "".join(pieces).endswith("\n") else "")
                  + stats.line(stop.stopped))
        self.history += [{"role": "user", "content": text},
                         {"role": "assistant", "content": "".join(pieces)}]

    def _drop_oldest_exchange(self) -> int:
        """Forget the first user message and the answers up to the next one; how many."""
        end = next((i for i, m in enumerate(self.history) if i and m["role"] == "user"),
                   len(self.history))
        del self.history[:end]
        return end

    def _stream(self, messages: Messages, stats: _Stats, pieces: list[str],
                stop: _StopOnInterrupt) -> None:
        stream = self.backend.stream(messages, self.settings)
        thinking = False
        try:
            for piece in stream:
                if piece.reasoning:  # shown, dimmed on a terminal; not kept in the history
                    stats.first = stats.first or time.monotonic()
                    self.out.write(self._dim(piece.reasoning if thinking
                                             else "thinking: " + piece.reasoning))
                    self.out.flush()
                    thinking = True
                if piece.text:
                    if thinking:
                        self.out.write("\n\n")
                        thinking = False
                    stats.first = stats.first or time.monotonic()
                    stats.chunks += 1
                    pieces.append(piece.text)
                    self.out.write(piece.text)
                    self.out.flush()
                stats.tokens = piece.tokens if piece.tokens is not None else stats.tokens
                stats.finish_reason = piece.finish_reason or stats.finish_reason
                if stop.stopped:
                    break
        finally:
            if thinking:  # no answer after the reasoning (a finish or a stop inside it)
                self.out.write("\n")
            with contextlib.suppress(Exception):
                stream.close()  # type: ignore[attr-defined]

    def _dim(self, text: str) -> str:
        isatty = getattr(self.out, "isatty", None)
        return f"\x1b[2m{text}\x1b[0m" if isatty is not None and isatty() else text


def read_message(prompt: str = ">>> ", more: str = "... ") -> str | None:
    """One message from the terminal (None for a blank line); EOFError at Ctrl-D."""
    line = input(prompt)
    stripped = line.strip()
    if stripped.startswith('"""'):
        body = stripped[3:]
        if len(body) >= 3 and body.endswith('"""'):
            return body[:-3]
        lines = [body] if body else []
        while True:
            line = input(more)
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip("\n") or None
            lines.append(line)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input(more)
    lines.append(line)
    text = "\n".join(lines)
    return text if text.strip() else None


def run_chat(backend: Backend, settings: ChatSettings, system: str | None = None) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    return ChatSession(backend, settings, system).run()
