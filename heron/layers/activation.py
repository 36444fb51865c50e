"""Activations, looked up by the names Hugging Face configs use (``hidden_act``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]

_ACTIVATIONS: dict[str, Activation] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu_new": partial(F.gelu, approximate="tanh"),
}


def get_activation(name: str) -> Activation:
    """The elementwise activation called ``name`` in a Hugging Face config."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]


def act_and_mul(x: torch.Tensor, act: Activation) -> torch.Tensor:
    """Gated MLP core: ``act(gate) * up`` for ``x = [gate | up]``. [..., 2 * d] -> [..., d]."""
    d = x.shape[-1] // 2
    return act(x[..., :d]) * x[..., d:]
