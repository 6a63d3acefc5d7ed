"""Canonical ops of the torch_gie graph, with their attribute dataclasses and a plain PyTorch
reference implementation each.

Capture turns every supported module or function into one of these, so passes match one form.
In the graph a canonical op is a ``call_function`` node whose target is one of the functions
below, whose ``args`` are its tensor inputs, and whose attributes live in ``node.meta["spec"]``.
``op(spec, *inputs)`` is the reference semantics (logical NCHW, any memory layout); the graph
therefore stays runnable after every pass (see ``torch_gie.graph.run_graph``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .activations import apply_activation

Pair = tuple[int, int]


@dataclass(frozen=True)
class Epilogue:
    """What a fused op applies to its accumulator before the single store:
    ``post_activation(activation(acc + bias) + residual)``; the residual is the op's last input."""

    activation: str | None = None
    residual: bool = False
    post_activation: str | None = None

    @property
    def is_empty(self) -> bool:
        return self.activation is None and not self.residual and self.post_activation is None

    def describe(self) -> str:
        parts = [self.activation or ""] + (["+residual"] if self.residual else [])
        parts += [self.post_activation] if self.post_activation else []
        return "".join(p if p.startswith("+") else ("+" + p if p else "") for p in parts)


@dataclass
class ConvSpec:
    weight: torch.Tensor  # [C_out, C_in / groups, KH, KW]
    bias: torch.Tensor | None
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int
    epilogue: Epilogue = field(default_factory=Epilogue)
    # Channel split of the output after horizontal merging; a merged conv yields one tensor per part.
    out_splits: tuple[int, ...] | None = None

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


@dataclass
class LinearSpec:
    weight: torch.Tensor  # [out_features, in_features]
    bias: torch.Tensor | None
    epilogue: Epilogue = field(default_factory=Epilogue)


@dataclass
class AffineSpec:
    """A per-channel ``x * scale + shift`` (BatchNorm in eval mode), then an activation."""

    scale: torch.Tensor
    shift: torch.Tensor
    activation: str | None = None


@dataclass
class ActivationSpec:
    name: str


@dataclass
class AddSpec:
    activation: str | None = None


@dataclass
class PoolSpec:
    kind: str  # "max" or "avg"
    kernel_size: Pair
    stride: Pair
    padding: Pair
    dilation: Pair = (1, 1)
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None


@dataclass
class AdaptiveAvgPoolSpec:
    output_size: Pair


@dataclass
class CatSpec:
    dim: int = 1


@dataclass
class FlattenSpec:
    start_dim: int = 1
    end_dim: int = -1


@dataclass
class IdentitySpec:
    """Dropout, Identity and friends: removed by the ``remove_identity`` pass."""

    what: str = "identity"


def conv2d(spec: ConvSpec, x: torch.Tensor, residual: torch.Tensor | None = None):
    y = F.conv2d(x, spec.weight.to(x.dtype), None if spec.bias is None else spec.bias.to(x.dtype),
                 spec.stride, spec.padding, spec.dilation, spec.groups)
    y = _apply_epilogue(y, spec.epilogue, residual)
    if spec.out_splits is None:
        return y
    return tuple(torch.split(y, list(spec.out_splits), dim=1))


def linear(spec: LinearSpec, x: torch.Tensor, residual: torch.Tensor | None = None):
    y = F.linear(x, spec.weight.to(x.dtype), None if spec.bias is None else spec.bias.to(x.dtype))
    return _apply_epilogue(y, spec.epilogue, residual)


def affine(spec: AffineSpec, x: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = x * spec.scale.to(x.dtype).view(shape) + spec.shift.to(x.dtype).view(shape)
    return apply_activation(y, spec.activation)


def activation(spec: ActivationSpec, x: torch.Tensor) -> torch.Tensor:
    return apply_activation(x, spec.name)


def add(spec: AddSpec, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return apply_activation(a + b, spec.activation)


def pool2d(spec: PoolSpec, x: torch.Tensor) -> torch.Tensor:
    if spec.kind == "max":
        return F.max_pool2d(x, spec.kernel_size, spec.stride, spec.padding, spec.dilation, spec.ceil_mode)
    return F.avg_pool2d(x, spec.kernel_size, spec.stride, spec.padding, spec.ceil_mode,
                        spec.count_include_pad, spec.divisor_override)


def adaptive_avg_pool2d(spec: AdaptiveAvgPoolSpec, x: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x, spec.output_size)


def cat(spec: CatSpec, *xs: torch.Tensor) -> torch.Tensor:
    return torch.cat(xs, spec.dim)


def flatten(spec: FlattenSpec, x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(x, spec.start_dim, spec.end_dim)


def identity(spec: IdentitySpec, x: torch.Tensor) -> torch.Tensor:
    return x


def _apply_epilogue(y: torch.Tensor, ep: Epilogue, residual: torch.Tensor | None) -> torch.Tensor:
    y = apply_activation(y, ep.activation)
    if ep.residual:
        y = y + residual
    return apply_activation(y, ep.post_activation)


CANONICAL_OPS = (conv2d, linear, affine, activation, add, pool2d, adaptive_avg_pool2d, cat, flatten, identity)
# Ops that compute nothing: their output is a view of their input (or of a planned buffer).
VIEW_OPS = (flatten, identity)

__all__ = [
    "Epilogue", "ConvSpec", "LinearSpec", "AffineSpec", "ActivationSpec", "AddSpec", "PoolSpec",
    "AdaptiveAvgPoolSpec", "CatSpec", "FlattenSpec", "IdentitySpec", "CANONICAL_OPS", "VIEW_OPS",
    "replace",
]
