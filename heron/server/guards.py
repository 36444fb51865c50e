"""Input guards of the HTTP layer: text that is not Unicode, and field names in errors and logs.

Both run on whatever a client sends, before any serving code, so both are bounded: the
surrogate scan walks the parsed body once; ``printable`` escapes and cuts a name before an
error quotes it (a 1 MiB field name, or one holding a newline, is an error of 64 characters),
and ``FieldNameLog`` remembers and logs a capped number of ignored field names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

logger = logging.getLogger("heron.server.serving")

MAX_FIELD_NAME_CHARS = 64  # a longer unknown field name is logged cut to this
MAX_REMEMBERED_FIELDS = 256  # distinct unknown names logged once each; then no more


def printable(text: str, limit: int = MAX_FIELD_NAME_CHARS) -> str:
    """``text`` safe for one log line or a JSON error: control characters and lone surrogates
    escaped (``\\n``, ``\\x00``, ``\\ud800``), cut to ``limit`` characters."""
    head = text[: limit + 1]  # never escape more than is shown
    escaped = "".join(c if c.isprintable() else _escape_char(c) for c in head)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def _escape_char(char: str) -> str:
    return char.encode("unicode_escape", "backslashreplace").decode("ascii")


# ==== lone surrogates =============================================================================


def lone_surrogate_path(body: object) -> str | None:
    """The path ("messages[0].content") of the first string, or key, in ``body`` that is
    not valid Unicode (a lone UTF-16 surrogate such as ``"\\ud800"``, which JSON can spell but
    UTF-8 cannot encode); None when there is none."""
    stack: list[tuple[object, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                name = str(key)
                where = f"{path}.{printable(name)}" if path else printable(name)
                if _has_surrogate(name):
                    return where
                stack.append((item, where))
        elif isinstance(value, list):  # numbers hold no text: no path for them (700,000 ids)
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value)
                         if isinstance(item, str | dict | list))
    return None


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ==== unknown field names =========================================================================


class FieldNameLog:
    """Logs each ignored request field name once, escaped and cut; remembers at most
    ``capacity`` names, then says once that it stops logging them. (The names come from the
    routes' fixed IGNORED lists, and on the Ollama routes from the client: unknown names are
    ignored there, as Ollama ignores them; elsewhere they are refused, never logged.)"""

    def __init__(self, capacity: int = MAX_REMEMBERED_FIELDS) -> None:
        self.capacity = capacity
        self._seen: set[str] = set()
        self._full_logged = False

    def note(self, names: Iterable[str]) -> None:
        fresh: list[str] = []
        for name in names:
            shown = printable(name)
            if shown in self._seen or shown in fresh:
                continue
            if len(self._seen) + len(fresh) >= self.capacity:
                self._log_full()
                break
            fresh.append(shown)
        if fresh:
            self._seen.update(fresh)
            logger.info("ignoring request fields that have no meaning here: %s", ", ".join(fresh))

    def _log_full(self) -> None:
        if not self._full_logged:
            self._full_logged = True
            logger.info("%d unknown field names logged; further ones are ignored silently",
                        self.capacity)

    def __len__(self) -> int:
        return len(self._seen)
