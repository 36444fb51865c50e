"""Linear layers that fuse several projections of the same input into one matmul.

A fused weight is the row-wise concatenation of its shards::

    qkv_proj.weight: [q_size + kv_size + kv_size, hidden]
                      |-- shard 0 --|-- 1 --|-- 2 --|

The weight loader fills one shard at a time from the checkpoint's separate tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """One ``nn.Linear`` standing for several (q/k/v, or gate/up) that share an input."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = tuple(output_sizes)

    @property
    def num_shards(self) -> int:
        return len(self.output_sizes)

    def shard_view(self, param_name: str, shard: int) -> torch.Tensor:
        """The rows of ``weight`` or ``bias`` that shard ``shard`` occupies (a view)."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of range for {self.num_shards} shards")
        start = sum(self.output_sizes[:shard])
        return getattr(self, param_name).data.narrow(0, start, self.output_sizes[shard])

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split this layer's output ``[..., sum(sizes)]`` back into per-shard views."""
        return out.split(self.output_sizes, dim=-1)
