"""LoRA beside a projection: the base output stays the base kernel's, the adapter's low-rank
product is added to the rows of the requests that use it.

For a row x of a request with adapter a, and a projection with base weight W::

    y = base(x)  +  scale_a * (x @ A_a^T) @ B_a^T        A_a: [r, in]   B_a: [out, r]

``base(x)`` is whatever the projection computes on its own (float, int8 copy, GGUF blocks):
the adapter is never merged into W. A fused projection (q/k/v, gate/up) takes one pair per
shard it stands for; a shard the adapter does not target adds nothing::

    qkv_proj out: [ q shard | k shard | v shard ]
                    A_q,B_q   (none)    A_v,B_v

A step's rows are grouped by adapter (``LoRABatch``, built by the engine's runner); each group
is one pair of float32 matmuls per targeted shard. The batch reaches every projection through
the model's ``LoRASlot`` (set for the duration of one forward by ``LoRASlot.active``, which
refuses nesting); rows of requests without an adapter belong to no group.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from heron.layers.linear import Linear


@dataclass(frozen=True)
class LoRAPair:
    """One adapter's low-rank pair for one projection (or one shard of a fused one)."""

    a: torch.Tensor  # [r, in] float32
    b: torch.Tensor  # [out, r] float32, the adapter's scale folded in

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


# One adapter's pairs: module name -> one entry per shard (None: that shard is not targeted).
AdapterWeights = Mapping[str, tuple[LoRAPair | None, ...]]


@dataclass(frozen=True)
class LoRAGroup:
    """The rows of one step that use one adapter."""

    rows: torch.Tensor | None  # [m] int64 indices into the flat batch; None: every row
    weights: AdapterWeights


@dataclass(frozen=True)
class LoRABatch:
    """A step's rows grouped by adapter (rows without one are in no group)."""

    groups: tuple[LoRAGroup, ...]


class LoRASlot:
    """Where a model's LoRA layers read the current step's ``LoRABatch`` (one per model)."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None

    @contextmanager
    def active(self, batch: LoRABatch | None) -> Iterator[None]:
        """``batch`` applies to the projections run inside the block (None: no adapter rows)."""
        if self.batch is not None:
            raise RuntimeError("a LoRA batch is already active: forwards do not nest")
        self.batch = batch
        try:
            yield
        finally:
            self.batch = None


class LoRALayer:
    """Adds the active batch's adapter products to one projection's output."""

    def __init__(self, name: str, slot: LoRASlot, output_sizes: Sequence[int]) -> None:
        self.name = name  # the projection's module name, as adapters key their pairs
        self.slot = slot
        self.output_sizes = tuple(output_sizes)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x: [T, in], out: [T, out] (the base output, updated in place and returned)."""
        batch = self.slot.batch
        if batch is None:
            return out
        for group in batch.groups:
            pairs = group.weights.get(self.name)
            if pairs is not None:
                self._add(x, out, group.rows, pairs)
        return out

    def _add(self, x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None,
             pairs: tuple[LoRAPair | None, ...]) -> None:
        xs = (x if rows is None else x.index_select(0, rows)).float()  # [m, in]
        start = 0
        for size, pair in zip(self.output_sizes, pairs, strict=True):
            if pair is not None:
                delta = (xs @ pair.a.T) @ pair.b.T  # [m, size]
                _add_rows(out[:, start:start + size], rows, delta)
            start += size


def _add_rows(view: torch.Tensor, rows: torch.Tensor | None, delta: torch.Tensor) -> None:
    """view[rows] += delta, summed in float32 and rounded once to the view's dtype."""
    if rows is None:
        view.copy_(view.float() + delta)
    else:
        view.index_copy_(0, rows, (view.index_select(0, rows).float() + delta).to(view.dtype))


def lora_targets(model: nn.Module) -> dict[str, Linear]:
    """The projections an adapter may target: every ``Linear`` of the model (the LM head and
    the embedding are not ``Linear``s), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def attach_lora(model: nn.Module) -> LoRASlot:
    """Give every target projection of ``model`` a ``LoRALayer`` reading one shared slot."""
    slot = LoRASlot()
    for name, module in lora_targets(model).items():
        sizes = getattr(module, "output_sizes", (module.out_features,))
        module.lora = LoRALayer(name, slot, sizes)
    return slot
