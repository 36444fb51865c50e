"""Activations, looked up by the names Hugging Face configs use (``hidden_act``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from heron.layers.norm import cpu_kernel_for

Activation = Callable[[torch.Tensor], torch.Tensor]

_gelu_tanh = partial(F.gelu, approximate="tanh")
_ACTIVATIONS: dict[str, Activation] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
}
_KERNEL_NAMES = {F.silu: "silu", _gelu_tanh: "gelu_tanh"}  # the ones heron's CPU kernel computes


def get_activation(name: str) -> Activation:
    """The elementwise activation called ``name`` in a Hugging Face config."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]


def kernel_name(act: Activation) -> str | None:
    """The name heron's CPU kernels know ``act`` by (``Elementwise.ACTIVATIONS``), or None."""
    return _KERNEL_NAMES.get(act)


def act_and_mul(x: torch.Tensor, act: Activation) -> torch.Tensor:
    """Gated MLP core: ``act(gate) * up`` for ``x = [gate | up]``. [..., 2 * d] -> [..., d]."""
    kernel = cpu_kernel_for(x)
    if kernel is not None and act in _KERNEL_NAMES and x.dim() == 2 and x.stride(1) == 1:
        return kernel.act_and_mul(x, _KERNEL_NAMES[act])  # one compiled call
    d = x.shape[-1] // 2
    return act(x[..., :d]) * x[..., d:]
