"""The bounded in-memory store behind ``previous_response_id`` and ``GET/DELETE /v1/responses/{id}``.

A stored response keeps what it returned and the conversation it ended (the turns before it,
its input and its output, as chat messages), so a later request can continue from it. The
oldest entries go first once ``max_entries`` are held; nothing survives a restart.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_ENTRIES = 1000


@dataclass
class StoredResponse:
    response: Any  # a protocol_responses.ResponseObject
    conversation: list[Any]  # protocol.ChatMessage: every turn up to and including the response


class ResponseStore:
    """Least-recently-stored first out; lookups do not refresh an entry."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be non-negative, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, entry: StoredResponse) -> None:
        if self.max_entries == 0:
            return
        self._entries[response_id] = entry
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None
