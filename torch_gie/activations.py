"""The activations torch_gie can fuse into an epilogue, by name.

One table serves capture (which module/function is which activation), the reference
executor (a PyTorch implementation per name) and the kernels (a small integer code per name,
see ``kernels/epilogue.py``), so the three can never disagree about what "hardswish" means.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# Order fixes the integer code the Triton kernels specialize on: append, never reorder.
ACTIVATION_NAMES: tuple[str, ...] = (
    "identity",
    "relu",
    "relu6",
    "silu",
    "hardswish",
    "hardsigmoid",
    "gelu",
    "gelu_tanh",
    "sigmoid",
)

_TORCH_IMPL: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "sigmoid": torch.sigmoid,
}


def activation_code(name: str | None) -> int:
    """The integer a kernel specializes on for activation ``name`` (None means identity)."""
    name = name or "identity"
    if name not in ACTIVATION_NAMES:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATION_NAMES}")
    return ACTIVATION_NAMES.index(name)


def apply_activation(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """Reference (PyTorch) implementation of activation ``name`` (None means identity)."""
    return _TORCH_IMPL[name or "identity"](x)
