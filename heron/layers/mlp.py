"""The gated MLP of Llama-family and Gemma decoders: ``down(act(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
from torch import nn

from heron.layers.activation import act_and_mul, get_activation
from heron.layers.linear import Linear, MergedLinear


class GatedMLP(nn.Module):
    """Gate and up fused into one matmul (``gate_up_proj``), then ``down_proj``; ``activation``
    is the config's name for it (``hidden_act`` / ``hidden_activation``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str,
                 bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.act))  # [T, hidden]
