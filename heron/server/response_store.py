"""The bounded in-memory store behind ``previous_response_id`` and ``GET/DELETE /v1/responses/{id}``.

A stored response keeps what it returned and the conversation it ended (the turns before it,
its input and its output, as chat messages), so a later request can continue from it. The
oldest entries go first once ``max_entries`` are held or their sizes pass ``max_bytes``; an
entry's size counts its whole conversation (the earlier turns it shares with other entries
too), so the messages kept alive never exceed ``max_bytes``. Nothing survives a restart.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_ENTRIES = 1000
DEFAULT_MAX_BYTES = 64 << 20


@dataclass
class StoredResponse:
    response: Any  # a protocol_responses.ResponseObject
    conversation: list[Any]  # protocol.ChatMessage: every turn up to and including the response
    size: int = 0  # bytes of its JSON: the response and the whole conversation


class ResponseStore:
    """Least-recently-stored first out; lookups do not refresh an entry."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"max_entries and max_bytes must be non-negative, got "
                             f"{max_entries} and {max_bytes}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, entry: StoredResponse) -> bool:
        """Keep ``entry`` (evicting the oldest as needed); False if it alone is too large."""
        if self.max_entries == 0 or entry.size > self.max_bytes:
            return False
        self.delete(response_id)
        self._entries[response_id] = entry
        self.num_bytes += entry.size
        while len(self._entries) > self.max_entries or self.num_bytes > self.max_bytes:
            _, oldest = self._entries.popitem(last=False)
            self.num_bytes -= oldest.size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self.num_bytes -= entry.size
        return True
