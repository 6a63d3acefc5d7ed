"""Canonical ops of the torch_gie graph, with their attribute dataclasses and a plain PyTorch
reference implementation each.

Capture turns every supported module or function into one of these, so passes match one form.
In the graph a canonical op is a ``call_function`` node whose target is one of the functions
below, whose ``args`` are its tensor inputs, and whose attributes live in ``node.meta["spec"]``.
``op(spec, *inputs)`` is the reference semantics (logical NCHW, any memory layout); the graph
therefore stays runnable after every pass (see ``torch_gie.graph.run_graph``).

Channels: for 4D (N, C, H, W) and 2D (N, C) tensors the channel dim is 1; for 3D token tensors
(N, L, D) it is the last dim (``channel_dim``). Per-channel constants (affine scale/shift, PReLU
slopes) run along that dim.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .activations import Act, ActLike, apply_activation, as_act

Pair = tuple[int, int]
Quad = tuple[int, int, int, int]  # (top, bottom, left, right)


def channel_dim(rank: int) -> int:
    """The dim per-channel constants run along: 1 for (N, C) and (N, C, H, W), -1 for (N, L, D)."""
    return -1 if rank == 3 else 1


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [C] constant shaped to broadcast along ``x``'s channel dim, in ``x``'s dtype."""
    if x.dim() == 3:
        return t.to(x.dtype)
    return t.to(x.dtype).reshape((1, -1) + (1,) * (x.dim() - 2))


def _act(value: ActLike) -> Act | None:
    return as_act(value)


@dataclass(frozen=True)
class Epilogue:
    """What a fused op applies to its accumulator before the single store:
    ``post_activation(activation(acc + bias) + residual)``; the residual is the op's last input.
    A ``prelu`` activation takes its per-channel slope from the op's spec (``act_slope``)."""

    activation: Act | None = None
    residual: bool = False
    post_activation: Act | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", _act(self.activation))
        object.__setattr__(self, "post_activation", _act(self.post_activation))

    @property
    def is_empty(self) -> bool:
        return self.activation is None and not self.residual and self.post_activation is None

    def describe(self) -> str:
        parts = ([f"+{self.activation}"] if self.activation else []) + (["+residual"] if self.residual else [])
        return "".join(parts + ([f"+{self.post_activation}"] if self.post_activation else []))


@dataclass
class ConvSpec:
    weight: torch.Tensor  # [C_out, C_in / groups, KH, KW]
    bias: torch.Tensor | None
    stride: Pair
    padding: Pair | Quad  # symmetric (h, w) or (top, bottom, left, right)
    dilation: Pair
    groups: int
    epilogue: Epilogue = field(default_factory=Epilogue)
    # Channel split of the output after horizontal merging; a merged conv yields one tensor per part.
    out_splits: tuple[int, ...] | None = None
    # A per-(image, input channel) factor applied to the input as it is loaded (a folded
    # squeeze-and-excitation multiply): the conv then takes it as its second input.
    input_gate: bool = False
    act_slope: torch.Tensor | None = None  # PReLU slope per output channel

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


def padding4(padding: Pair | Quad) -> Quad:
    """(top, bottom, left, right) of a symmetric (h, w) or already four-sided padding."""
    return tuple(padding) if len(padding) == 4 else (padding[0], padding[0], padding[1], padding[1])


def symmetric(padding: Pair | Quad) -> Pair | Quad:
    """The shortest form of a padding: (h, w) when top == bottom and left == right."""
    t, b, left, r = padding4(padding)
    return (t, left) if (t, left) == (b, r) else (t, b, left, r)


@dataclass
class LinearSpec:
    weight: torch.Tensor  # [out_features, in_features]
    bias: torch.Tensor | None
    epilogue: Epilogue = field(default_factory=Epilogue)
    act_slope: torch.Tensor | None = None


@dataclass
class AffineSpec:
    """A per-channel ``x * scale + shift`` (BatchNorm in eval mode, a layer scale, a constant
    broadcast multiply or add), then an activation."""

    scale: torch.Tensor
    shift: torch.Tensor
    activation: Act | None = None
    act_slope: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.activation = _act(self.activation)


@dataclass
class ActivationSpec:
    act: Act
    slope: torch.Tensor | None = None  # PReLU

    def __post_init__(self) -> None:
        self.act = _act(self.act) or Act("identity")

    @property
    def name(self) -> str:
        return self.act.name


@dataclass
class AddSpec:
    activation: Act | None = None

    def __post_init__(self) -> None:
        self.activation = _act(self.activation)


@dataclass
class MulSpec:
    """``act(a * b)``; b may broadcast against a (a squeeze-and-excitation gate (N, C, 1, 1),
    a constant)."""

    activation: Act | None = None

    def __post_init__(self) -> None:
        self.activation = _act(self.activation)


@dataclass
class PoolSpec:
    kind: str  # "max" or "avg"
    kernel_size: Pair
    stride: Pair
    padding: Pair | Quad
    dilation: Pair = (1, 1)
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: int | None = None
    # The padding was folded from an explicit zero pad (``fold_padding``): it reads as real zeros
    # (a max sees 0, not -inf; an average counts them in its divisor), and may be asymmetric.
    pad_is_zeros: bool = False


@dataclass
class AdaptivePoolSpec:
    kind: str  # "avg" or "max"
    output_size: Pair
    keepdim: bool = True  # False: a global pool's (N, C) result, as x.mean((2, 3)) gives


@dataclass
class LayerNormSpec:
    """LayerNorm over one dim: the last (token features) or dim 1 of a 4D tensor (channels)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    dim: int = -1


@dataclass
class SqueezeExcitationSpec:
    """``gate = act2(W2 @ act1(W1 @ mean_hw(x) + b1) + b2)``, shaped (N, C, 1, 1)."""

    w1: torch.Tensor  # [C_r, C]
    b1: torch.Tensor | None
    act1: Act | None
    w2: torch.Tensor  # [C, C_r]
    b2: torch.Tensor | None
    act2: Act | None

    def __post_init__(self) -> None:
        self.act1, self.act2 = _act(self.act1), _act(self.act2)


@dataclass
class AttentionSpec:
    """Multi-head self-attention core on a fused (N, L, 3 * D) projection: q, k, v are its three
    thirds, split into ``heads`` heads; the result is (N, L, D) before the output projection."""

    heads: int


@dataclass
class PadSpec:
    pads: tuple[int, ...]  # F.pad order: (left, right, top, bottom, ...)
    value: float = 0.0


@dataclass
class CatSpec:
    dim: int = 1
    # > 1: the channels of the inputs are interleaved (a channel shuffle of the concat with this
    # many groups): input i's channel j lands at j * interleave + i. Inputs then have equal size.
    interleave: int = 1


@dataclass
class ChannelShuffleSpec:
    groups: int


@dataclass
class FlattenSpec:
    start_dim: int = 1
    end_dim: int = -1


@dataclass
class SliceSpec:
    """Channels ``start, start + step, ...`` (``length`` of them) of dim 1: a view."""

    start: int
    length: int
    step: int = 1


@dataclass
class PermuteSpec:
    dims: tuple[int, ...]


@dataclass
class ReshapeSpec:
    shape: tuple[int, ...]  # the traced result's shape (sizes the model's code computed are concrete)
    # The model's code gave the leading size as a literal (``x.view(3, -1)``), not computed or
    # inferred (``x.view(x.size(0), -1)``, ``x.view(-1, 512)``): it does not follow the batch.
    literal_leading: bool = False


@dataclass
class IdentitySpec:
    """Dropout, Identity, ``contiguous`` and friends: removed by the ``remove_identity`` pass."""

    what: str = "identity"


def _conv_extra(spec: ConvSpec, extra: tuple) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(gate, residual) from a conv's inputs after x."""
    extra = list(extra)
    gate = extra.pop(0) if spec.input_gate else None
    residual = extra.pop(0) if spec.epilogue.residual else None
    return gate, residual


def conv2d(spec: ConvSpec, x: torch.Tensor, *extra: torch.Tensor):
    gate, residual = _conv_extra(spec, extra)
    if gate is not None:
        x = x * gate.reshape(x.shape[0], x.shape[1], 1, 1).to(x.dtype)
    padding = spec.padding
    if len(padding) == 4:
        t, b, left, r = padding
        x, padding = F.pad(x, (left, r, t, b)), (0, 0)
    y = F.conv2d(x, spec.weight.to(x.dtype), None if spec.bias is None else spec.bias.to(x.dtype),
                 spec.stride, padding, spec.dilation, spec.groups)
    y = _apply_epilogue(y, spec.epilogue, residual, spec.act_slope)
    if spec.out_splits is None:
        return y
    return tuple(torch.split(y, list(spec.out_splits), dim=1))


def linear(spec: LinearSpec, x: torch.Tensor, residual: torch.Tensor | None = None):
    y = F.linear(x, spec.weight.to(x.dtype), None if spec.bias is None else spec.bias.to(x.dtype))
    return _apply_epilogue(y, spec.epilogue, residual, spec.act_slope)


def affine(spec: AffineSpec, x: torch.Tensor) -> torch.Tensor:
    y = x * _per_channel(spec.scale, x) + _per_channel(spec.shift, x)
    return _activate(y, spec.activation, spec.act_slope)


def activation(spec: ActivationSpec, x: torch.Tensor) -> torch.Tensor:
    return _activate(x, spec.act, spec.slope)


def add(spec: AddSpec, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return apply_activation(a + b.to(a.dtype), spec.activation)


def mul(spec: MulSpec, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return apply_activation(a * b.to(a.dtype), spec.activation)


def pool2d(spec: PoolSpec, x: torch.Tensor) -> torch.Tensor:
    padding = spec.padding
    if spec.pad_is_zeros:
        t, b, left, r = padding4(padding)
        x, padding = F.pad(x, (left, r, t, b)), (0, 0)
    if spec.kind == "max":
        return F.max_pool2d(x, spec.kernel_size, spec.stride, padding, spec.dilation, spec.ceil_mode)
    return F.avg_pool2d(x, spec.kernel_size, spec.stride, padding, spec.ceil_mode,
                        spec.count_include_pad, spec.divisor_override)


def adaptive_pool2d(spec: AdaptivePoolSpec, x: torch.Tensor) -> torch.Tensor:
    pool = F.adaptive_max_pool2d if spec.kind == "max" else F.adaptive_avg_pool2d
    y = pool(x, spec.output_size)
    return y if spec.keepdim else y.flatten(1)


def layer_norm(spec: LayerNormSpec, x: torch.Tensor) -> torch.Tensor:
    w = None if spec.weight is None else spec.weight.to(x.dtype)
    b = None if spec.bias is None else spec.bias.to(x.dtype)
    if spec.dim == -1:
        return F.layer_norm(x, (x.shape[-1],), w, b, spec.eps)
    y = F.layer_norm(x.movedim(spec.dim, -1), (x.shape[spec.dim],), w, b, spec.eps)
    return y.movedim(-1, spec.dim)


def squeeze_excitation(spec: SqueezeExcitationSpec, x: torch.Tensor) -> torch.Tensor:
    s = x.mean((2, 3))
    h = apply_activation(F.linear(s, spec.w1.to(x.dtype), None if spec.b1 is None else spec.b1.to(x.dtype)),
                         spec.act1)
    g = apply_activation(F.linear(h, spec.w2.to(x.dtype), None if spec.b2 is None else spec.b2.to(x.dtype)),
                         spec.act2)
    return g[:, :, None, None]


def attention_heads(spec: AttentionSpec, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(q, k, v) views of a fused projection, each (N, heads, L, head_dim)."""
    return tuple(t.unflatten(-1, (spec.heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))


def attention(spec: AttentionSpec, qkv: torch.Tensor) -> torch.Tensor:
    o = F.scaled_dot_product_attention(*attention_heads(spec, qkv))
    return o.transpose(1, 2).flatten(2)


def pad(spec: PadSpec, x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, spec.pads, value=spec.value)


def cat(spec: CatSpec, *xs: torch.Tensor) -> torch.Tensor:
    y = torch.cat(xs, spec.dim)
    return y if spec.interleave == 1 else _shuffle(y, spec.interleave)


def channel_shuffle(spec: ChannelShuffleSpec, x: torch.Tensor) -> torch.Tensor:
    return _shuffle(x, spec.groups)


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c = x.shape[:2]
    return x.reshape(n, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def flatten(spec: FlattenSpec, x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(x, spec.start_dim, spec.end_dim)


def channel_slice(spec: SliceSpec, x: torch.Tensor) -> torch.Tensor:
    return x[:, spec.start: spec.start + spec.step * (spec.length - 1) + 1: spec.step]


def permute(spec: PermuteSpec, x: torch.Tensor) -> torch.Tensor:
    return x.permute(spec.dims)


def reshape(spec: ReshapeSpec, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(spec.shape)


def identity(spec: IdentitySpec, x: torch.Tensor) -> torch.Tensor:
    return x


def _activate(y: torch.Tensor, act: Act | None, slope: torch.Tensor | None) -> torch.Tensor:
    if act is not None and act.name == "prelu" and y.dim() == 3:
        return torch.where(y > 0, y, y * slope.to(y.dtype))  # channels last for tokens
    return apply_activation(y, act, slope)


def _apply_epilogue(y: torch.Tensor, ep: Epilogue, residual: torch.Tensor | None,
                    slope: torch.Tensor | None = None) -> torch.Tensor:
    y = _activate(y, ep.activation, slope)
    if ep.residual:
        y = y + residual.to(y.dtype)
    return _activate(y, ep.post_activation, slope)


CANONICAL_OPS = (conv2d, linear, affine, activation, add, mul, pool2d, adaptive_pool2d, layer_norm,
                 squeeze_excitation, attention, pad, cat, channel_shuffle, flatten, channel_slice, permute, reshape,
                 identity)
# Ops that compute nothing: their output is a view of their input (``reshape`` copies only when
# no view exists, as torch.reshape does).
VIEW_OPS = (flatten, channel_slice, permute, reshape, identity)

__all__ = [
    "Epilogue", "ConvSpec", "LinearSpec", "AffineSpec", "ActivationSpec", "AddSpec", "MulSpec", "PoolSpec",
    "AdaptivePoolSpec", "LayerNormSpec", "SqueezeExcitationSpec", "AttentionSpec", "PadSpec", "CatSpec",
    "ChannelShuffleSpec",
    "FlattenSpec", "SliceSpec", "PermuteSpec", "ReshapeSpec", "IdentitySpec", "CANONICAL_OPS", "VIEW_OPS",
    "channel_dim", "padding4", "symmetric", "replace",
]
