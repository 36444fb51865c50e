"""The adapters an engine holds, and each step's rows grouped by adapter.

An adapter is read (``heron.loader.lora``) when the first request naming it arrives, and stays
while requests use it; afterwards at most ``max_loras`` unused ones stay loaded, the least
recently used dropped first (read again when named again). One ``lora_int_id`` is one adapter:
a request naming a loaded id with another name or path is refused.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping

import torch

from heron.config import LoRAConfig
from heron.layers.lora import LoRABatch, LoRAGroup
from heron.loader.lora import LoRAAdapter, load_adapter
from heron.lora import LoRARequest
from heron.models.base import CausalLM

logger = logging.getLogger(__name__)


class LoRAManager:
    """Loaded adapters by ``lora_int_id`` (least recently used first) and their users."""

    def __init__(self, model: CausalLM, config: LoRAConfig, device: torch.device) -> None:
        self.model = model
        self.config = config
        self.device = device
        model.enable_lora()
        self._adapters: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self._users: dict[int, int] = {}  # lora_int_id -> requests in flight using it
        for request in config.preload:
            self.load(request)

    @property
    def loaded(self) -> list[LoRARequest]:
        return [a.request for a in self._adapters.values()]

    def load(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter of ``request``, read from disk unless loaded; ValueError if it cannot be
        served (bad files, rank above the limit, shapes that do not fit the model)."""
        adapter = self._adapters.get(request.lora_int_id)
        if adapter is not None:
            _check_same(adapter.request, request)
            self._adapters.move_to_end(request.lora_int_id)
            return adapter
        adapter = load_adapter(request, self.model, self.config.max_lora_rank, self.device)
        self._adapters[request.lora_int_id] = adapter
        logger.info("LoRA adapter %r (id %d) loaded from %s: rank %d, %d modules, %.1f MiB",
                    request.lora_name, request.lora_int_id, request.lora_path, adapter.rank,
                    len(adapter.weights), adapter.nbytes / 2**20)
        self._evict()
        return adapter

    def acquire(self, request: LoRARequest) -> None:
        """A request in flight uses this adapter: load it, keep it loaded until ``release``."""
        self.load(request)
        self._users[request.lora_int_id] = self._users.get(request.lora_int_id, 0) + 1

    def release(self, lora_int_id: int) -> None:
        left = self._users.get(lora_int_id, 0) - 1
        if left > 0:
            self._users[lora_int_id] = left
        else:
            self._users.pop(lora_int_id, None)
        self._evict()

    def remove(self, lora_name: str) -> bool:
        """Drop an adapter no request uses (by name); False if unknown. ValueError while in use."""
        found = next((i for i, a in self._adapters.items() if a.request.lora_name == lora_name),
                     None)
        if found is None:
            return False
        if found in self._users:
            raise ValueError(f"LoRA adapter {lora_name!r} is in use by running requests")
        del self._adapters[found]
        return True

    def batch(self, rows: Mapping[int, list[int]], num_rows: int) -> LoRABatch | None:
        """The step's rows grouped by adapter (``rows``: lora_int_id -> flat batch indices of
        ``num_rows``); None when no row uses an adapter."""
        groups = []
        for lora_int_id, indices in rows.items():
            weights = self._adapters[lora_int_id].weights  # loaded: a request in flight uses it
            every = len(indices) == num_rows
            index = None if every else torch.tensor(indices, dtype=torch.long, device=self.device)
            groups.append(LoRAGroup(index, weights))
        return LoRABatch(tuple(groups)) if groups else None

    def _evict(self) -> None:
        """Drop unused adapters, oldest first, while more than ``max_loras`` unused are loaded."""
        unused = [i for i in self._adapters if i not in self._users]
        for lora_int_id in unused[:max(0, len(unused) - self.config.max_loras)]:
            del self._adapters[lora_int_id]


def _check_same(loaded: LoRARequest, request: LoRARequest) -> None:
    if (loaded.lora_name, loaded.lora_path) != (request.lora_name, request.lora_path):
        raise ValueError(f"lora_int_id {request.lora_int_id} is LoRA adapter "
                         f"{loaded.lora_name!r} ({loaded.lora_path}); request names "
                         f"{request.lora_name!r} ({request.lora_path}): one id, one adapter")
