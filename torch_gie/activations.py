"""The activations torch_gie can fuse into an epilogue, by name and parameters.

One table serves capture (which module/function is which activation), the reference
executor (a PyTorch implementation per name) and the kernels (a small integer code per name
plus two float constants, see ``kernels/epilogue.py``), so the three can never disagree about
what "hardswish" or "leaky_relu(0.1)" means.

An activation is an ``Act``: a name and up to two float parameters (``alpha``, ``beta``):
``leaky_relu`` (alpha = negative slope), ``elu`` (alpha), ``clamp`` (alpha = min, beta = max;
``relu6`` is clamp(0, 6) under its own name). ``prelu`` has a per-channel slope tensor, which the
op's spec carries (``act_slope``); a single-parameter PReLU is captured as ``leaky_relu``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
    "leaky_relu",
    "elu",
    "mish",
    "tanh",
    "clamp",
    "selu",
    "softplus",
    "prelu",
)
# Activations whose kernel code needs a per-channel slope vector beside the accumulator.
CHANNEL_PARAM_ACTIVATIONS = ("prelu",)


@dataclass(frozen=True)
class Act:
    """An activation function: ``name`` from ACTIVATION_NAMES and its float parameters."""

    name: str
    alpha: float = 0.0
    beta: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in ACTIVATION_NAMES:
            raise ValueError(f"unknown activation {self.name!r}; expected one of {ACTIVATION_NAMES}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "beta", float(self.beta))

    def __eq__(self, other) -> bool:
        # A bare name compares equal to the parameterless activation of that name, so passes and
        # tests can write ``ep.activation == "relu"``.
        if isinstance(other, str):
            return self.alpha == 0.0 and self.beta == 0.0 and self.name == other
        if isinstance(other, Act):
            return (self.name, self.alpha, self.beta) == (other.name, other.alpha, other.beta)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name) if self.alpha == 0.0 and self.beta == 0.0 else hash((self.name, self.alpha, self.beta))

    def __str__(self) -> str:
        if self.name == "clamp":
            return f"clamp({self.alpha:g}, {self.beta:g})"
        if self.name in ("leaky_relu", "elu"):
            return f"{self.name}({self.alpha:g})"
        return self.name


ActLike = Act | str | None


def as_act(act: ActLike) -> Act | None:
    """An ``Act`` from an Act, a bare name (no parameters) or None (identity: returns None)."""
    if act is None or isinstance(act, Act):
        return None if act is not None and act.name == "identity" else act
    if isinstance(act, str):
        return None if act == "identity" else Act(act)
    raise TypeError(f"an activation must be an Act, a name or None, got {type(act).__name__}")


def activation_code(act: ActLike) -> int:
    """The integer a kernel specializes on for ``act`` (None means identity)."""
    act = as_act(act)
    return 0 if act is None else ACTIVATION_NAMES.index(act.name)


def act_constexprs(act: ActLike, prefix: str = "ACT") -> dict:
    """Kernel keyword arguments for ``act``: ``{prefix: code, prefix_ALPHA: a, prefix_BETA: b}``."""
    act = as_act(act)
    alpha, beta = (0.0, 0.0) if act is None else (act.alpha, act.beta)
    return {prefix: activation_code(act), f"{prefix}_ALPHA": alpha, f"{prefix}_BETA": beta}


def _prelu(x: torch.Tensor, slope: torch.Tensor | None) -> torch.Tensor:
    if slope is None:
        raise ValueError("prelu needs its per-channel slope tensor")
    shape = (1, -1) + (1,) * (x.dim() - 2) if x.dim() > 1 else (-1,)
    return torch.where(x > 0, x, x * slope.to(x.dtype).reshape(shape))


_TORCH_IMPL: dict[str, Callable[[torch.Tensor, Act], torch.Tensor]] = {
    "identity": lambda x, a: x,
    "relu": lambda x, a: F.relu(x),
    "relu6": lambda x, a: F.relu6(x),
    "silu": lambda x, a: F.silu(x),
    "hardswish": lambda x, a: F.hardswish(x),
    "hardsigmoid": lambda x, a: F.hardsigmoid(x),
    "gelu": lambda x, a: F.gelu(x),
    "gelu_tanh": lambda x, a: F.gelu(x, approximate="tanh"),
    "sigmoid": lambda x, a: torch.sigmoid(x),
    "leaky_relu": lambda x, a: F.leaky_relu(x, a.alpha),
    "elu": lambda x, a: F.elu(x, a.alpha),
    "mish": lambda x, a: F.mish(x),
    "tanh": lambda x, a: torch.tanh(x),
    "clamp": lambda x, a: torch.clamp(x, a.alpha, a.beta),
    "selu": lambda x, a: F.selu(x),
    "softplus": lambda x, a: F.softplus(x),
}


def apply_activation(x: torch.Tensor, act: ActLike, slope: torch.Tensor | None = None) -> torch.Tensor:
    """Reference (PyTorch) implementation of ``act`` (None means identity); ``slope`` is the
    per-channel (dim 1) slope of ``prelu``."""
    act = as_act(act)
    if act is None:
        return x
    if act.name == "prelu":
        return _prelu(x, slope)
    return _TORCH_IMPL[act.name](x, act)
