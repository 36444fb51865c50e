"""A sequence-classification head: a pooled hidden state to classifier logits (the ``score``
head of ``*ForSequenceClassification`` checkpoints; heron.models.score_head builds models with it)."""

from __future__ import annotations

import torch
from torch import nn


class ScoreHead(nn.Module):
    """pooled hidden state [hidden] -> classifier logits [num_labels] float32."""

    def __init__(self, num_labels: int, hidden_size: int) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"a classification head needs at least one label, got {num_labels}")
        self.weight = nn.Parameter(torch.empty(num_labels, hidden_size), requires_grad=False)

    @property
    def num_labels(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(device=pooled.device, dtype=torch.float32)
        return weight @ pooled.float()  # [num_labels]
