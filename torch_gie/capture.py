"""Capture: trace an ``nn.Module`` with torch.fx, propagate shapes on the example inputs, and
normalize every supported module, function and method into one canonical op (``torch_gie.ops``).

Whatever is not recognised is kept as the original fx node (a *fallback*); it runs the user's
own PyTorch code, so any traceable model compiles, and the report lists what fell back and why
(``meta["fallback_reason"]``).

Modules, functions and methods are matched through one table per kind of op (activations,
elementwise arithmetic, views, reductions), so ``nn.ReLU()``, ``F.relu`` and ``x.relu()`` all
become the same canonical node.
"""
from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx
from torch.fx.operator_schemas import normalize_function
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from . import ops
from .activations import Act
from .errors import CompileError, out_of_memory_in

log = logging.getLogger(__name__)

Canonical = tuple[Callable, list, Any]  # (op function, input nodes, spec)


class _NotCanonical(Exception):
    """Raised inside a normalizer: this node stays a fallback (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Activations: module type / function / method name -> how to read its Act (and PReLU slope).

def _fixed(name: str) -> Callable[..., Act]:
    return lambda *args, **kwargs: Act(name)


def _gelu(approximate: str = "none") -> Act:
    return Act("gelu" if approximate == "none" else "gelu_tanh")


def _hardtanh(min_val: float = -1.0, max_val: float = 1.0) -> Act:
    return Act("relu6") if (min_val, max_val) == (0.0, 6.0) else Act("clamp", min_val, max_val)


def _softplus(beta: float = 1.0, threshold: float = 20.0) -> Act:
    if (beta, threshold) != (1.0, 20.0):
        raise _NotCanonical(f"softplus with beta={beta}, threshold={threshold} (only 1, 20 fuse)")
    return Act("softplus")


def _clamp(lo, hi) -> Act:
    if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)) or (lo is None and hi is None):
        raise _NotCanonical("clamp bounds that are not numbers")
    if lo == 0 and hi is None:
        return Act("relu")
    if (lo, hi) == (0, 6):
        return Act("relu6")
    return Act("clamp", -math.inf if lo is None else lo, math.inf if hi is None else hi)


_ACT_MODULES: dict[type, Callable[[nn.Module], Act]] = {
    nn.ReLU: _fixed("relu"), nn.ReLU6: _fixed("relu6"), nn.SiLU: _fixed("silu"),
    nn.Hardswish: _fixed("hardswish"), nn.Hardsigmoid: _fixed("hardsigmoid"), nn.Sigmoid: _fixed("sigmoid"),
    nn.Mish: _fixed("mish"), nn.Tanh: _fixed("tanh"), nn.SELU: _fixed("selu"),
    nn.GELU: lambda m: _gelu(m.approximate),
    nn.LeakyReLU: lambda m: Act("leaky_relu", m.negative_slope),
    nn.ELU: lambda m: Act("elu", m.alpha),
    nn.Hardtanh: lambda m: _hardtanh(m.min_val, m.max_val),
    nn.Softplus: lambda m: _softplus(m.beta, m.threshold),
}
_ACT_FUNCTIONS: dict[Callable, Callable[..., Act]] = {
    F.relu: _fixed("relu"), torch.relu: _fixed("relu"), torch.relu_: _fixed("relu"), F.relu_: _fixed("relu"),
    F.relu6: _fixed("relu6"), F.silu: _fixed("silu"), F.hardswish: _fixed("hardswish"),
    F.hardsigmoid: _fixed("hardsigmoid"), torch.sigmoid: _fixed("sigmoid"), F.sigmoid: _fixed("sigmoid"),
    F.mish: _fixed("mish"), torch.tanh: _fixed("tanh"), F.tanh: _fixed("tanh"), F.selu: _fixed("selu"),
    F.gelu: lambda x, approximate="none": _gelu(approximate),
    F.leaky_relu: lambda x, negative_slope=0.01, inplace=False: Act("leaky_relu", negative_slope),
    F.elu: lambda x, alpha=1.0, inplace=False: Act("elu", alpha),
    F.hardtanh: lambda x, min_val=-1.0, max_val=1.0, inplace=False: _hardtanh(min_val, max_val),
    F.softplus: lambda x, beta=1.0, threshold=20.0: _softplus(beta, threshold),
    torch.clamp: lambda x, min=None, max=None: _clamp(min, max),
    torch.clip: lambda x, min=None, max=None: _clamp(min, max),
}
_ACT_METHODS: dict[str, Callable[..., Act]] = {
    "relu": _fixed("relu"), "relu_": _fixed("relu"), "sigmoid": _fixed("sigmoid"), "tanh": _fixed("tanh"),
    "clamp": lambda x, min=None, max=None: _clamp(min, max), "clamp_": lambda x, min=None, max=None: _clamp(min, max),
    "clip": lambda x, min=None, max=None: _clamp(min, max),
}
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
_CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)
# Elementwise arithmetic: (function or method name) -> operator kind.
_ARITH_FUNCTIONS = {operator.add: "add", operator.iadd: "add", torch.add: "add", operator.mul: "mul",
                    operator.imul: "mul", torch.mul: "mul", operator.sub: "sub", operator.isub: "sub",
                    torch.sub: "sub", operator.truediv: "div", operator.itruediv: "div", torch.div: "div"}
_ARITH_METHODS = {"add": "add", "add_": "add", "mul": "mul", "mul_": "mul", "sub": "sub", "sub_": "sub",
                  "div": "div", "div_": "div"}


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The constant tensor behind a get_attr node (None for None; raises for anything else)."""
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return operator.attrgetter(node.target)(gm).detach()
    raise _NotCanonical("a weight that is computed at run time, not a module constant")


def _shape(node) -> tuple[int, ...] | None:
    return tuple(node.meta["shape"]) if isinstance(node, fx.Node) and "shape" in node.meta else None


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# ---------------------------------------------------------------------------------------------
# Convolution, normalization, pooling.

def _conv_padding(padding, weight: torch.Tensor, dilation, stride) -> ops.Pair | ops.Quad:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same" and tuple(stride) == (1, 1):
            # PyTorch puts the odd pixel of an even total on the bottom/right side.
            (th, tw) = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            return ops.symmetric((th // 2, th - th // 2, tw // 2, tw - tw // 2))
        raise _NotCanonical(f"conv padding={padding!r} with stride {tuple(stride)}")
    return _pair(padding)


def _conv(x, weight, bias, stride, padding, dilation, groups) -> Canonical:
    if weight is None or weight.dim() != 4:
        raise _NotCanonical("not a 2D convolution")
    stride, dilation = _pair(stride), _pair(dilation)
    spec = ops.ConvSpec(weight, bias, stride, _conv_padding(padding, weight, dilation, stride), dilation, groups)
    return ops.conv2d, [x], spec


def _batch_norm(x, mean, var, weight, bias, eps) -> Canonical:
    if mean is None or var is None:
        raise _NotCanonical("batch norm without running statistics")
    scale = torch.rsqrt(var.float() + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean.float() * scale
    if bias is not None:
        shift = shift + bias.float()
    return ops.affine, [x], ops.AffineSpec(scale, shift)


def _layer_norm(node: fx.Node, x, normalized_shape, weight, bias, eps) -> Canonical:
    shape = _shape(x)
    if shape is None or tuple(normalized_shape) != shape[-1:]:
        raise _NotCanonical(f"layer norm over {tuple(normalized_shape)} (only the last dim is lowered)")
    return ops.layer_norm, [x], ops.LayerNormSpec(weight, bias, float(eps), -1)


def _pool(kind, x, kernel_size, stride, padding, dilation=1, ceil_mode=False,
          count_include_pad=True, divisor_override=None) -> Canonical:
    kernel_size = _pair(kernel_size)
    stride = _pair(stride) if stride not in (None, []) else kernel_size
    spec = ops.PoolSpec(kind, kernel_size, stride, _pair(padding), _pair(dilation), bool(ceil_mode),
                        bool(count_include_pad), divisor_override)
    return ops.pool2d, [x], spec


def _adaptive_pool(node: fx.Node, kind: str, x) -> Canonical:
    out_shape = _shape(node)
    if out_shape is None or len(out_shape) != 4:
        raise _NotCanonical("adaptive pooling of a tensor that is not 4D")
    return ops.adaptive_pool2d, [x], ops.AdaptivePoolSpec(kind, tuple(out_shape[2:]))


def _spatial_reduction(node: fx.Node, kind: str, x, dims, keepdim=False, dtype=None) -> Canonical:
    """``x.mean((2, 3))`` / ``x.amax((-2, -1), keepdim=True)``: a global pool."""
    shape = _shape(x)
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    if shape is None or len(shape) != 4 or dtype is not None or \
            sorted(_dim(d, 4) for d in dims) != [2, 3]:
        raise _NotCanonical(f"{kind} over dims {dims} (only the spatial dims (2, 3) of a 4D tensor)")
    return ops.adaptive_pool2d, [x], ops.AdaptivePoolSpec(kind, (1, 1), keepdim=bool(keepdim))


def _pad(x, pads, mode="constant", value=None) -> Canonical:
    shape = _shape(x)
    pads = tuple(pads)
    if mode != "constant" or shape is None or len(shape) != 4 or len(pads) not in (2, 4) or min(pads) < 0:
        raise _NotCanonical(f"pad mode={mode!r} pads={pads} (constant non-negative spatial pads of a 4D tensor)")
    return ops.pad, [x], ops.PadSpec(pads + (0,) * (4 - len(pads)), float(value or 0.0))


def _require_channel_dim_1(x, what: str) -> None:
    """Per-channel ops of PyTorch run along dim 1; torch_gie's per-channel constants run along dim
    1 for (N, C) and (N, C, H, W) but along the last dim of 3D tensors (tokens)."""
    shape = _shape(x)
    if shape is None or len(shape) not in (2, 4):
        raise _NotCanonical(f"{what} on a rank-{len(shape or ())} tensor (lowered for (N, C) and (N, C, H, W))")


def _prelu(x, weight: torch.Tensor) -> Canonical:
    weight = weight.detach().float().reshape(-1)
    if weight.numel() == 1:
        return ops.activation, [x], ops.ActivationSpec(Act("leaky_relu", weight.item()))
    _require_channel_dim_1(x, "PReLU with per-channel slopes")
    if _shape(x)[1] != weight.numel():
        raise _NotCanonical("PReLU whose slopes do not match the channels")
    return ops.activation, [x], ops.ActivationSpec(Act("prelu"), weight)


def _normalize_module(gm: fx.GraphModule, node: fx.Node) -> Canonical:
    mod = gm.get_submodule(node.target)
    x = node.args[0] if node.args else None
    if len(node.args) != 1 or node.kwargs:
        raise _NotCanonical(f"{type(mod).__name__} called with {len(node.args)} args / keywords")
    kind = type(mod)
    if kind is nn.Conv2d and mod.padding_mode == "zeros":
        return _conv(x, mod.weight.detach(), None if mod.bias is None else mod.bias.detach(),
                     mod.stride, mod.padding, mod.dilation, mod.groups)
    if kind is nn.Linear:
        return ops.linear, [x], ops.LinearSpec(mod.weight.detach(), None if mod.bias is None else mod.bias.detach())
    if kind in (nn.BatchNorm2d, nn.BatchNorm1d) and mod.track_running_stats:
        _require_channel_dim_1(x, "BatchNorm")
        return _batch_norm(x, mod.running_mean, mod.running_var,
                           None if mod.weight is None else mod.weight.detach(),
                           None if mod.bias is None else mod.bias.detach(), mod.eps)
    if kind is nn.LayerNorm:
        return _layer_norm(node, x, mod.normalized_shape, None if mod.weight is None else mod.weight.detach(),
                           None if mod.bias is None else mod.bias.detach(), mod.eps)
    if kind in _ACT_MODULES:
        return ops.activation, [x], ops.ActivationSpec(_ACT_MODULES[kind](mod))
    if kind is nn.PReLU:
        return _prelu(x, mod.weight)
    if kind is nn.MaxPool2d and not mod.return_indices:
        return _pool("max", x, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
    if kind is nn.AvgPool2d:
        return _pool("avg", x, mod.kernel_size, mod.stride, mod.padding, 1, mod.ceil_mode,
                     mod.count_include_pad, mod.divisor_override)
    if kind is nn.AdaptiveAvgPool2d:
        return _adaptive_pool(node, "avg", x)
    if kind is nn.AdaptiveMaxPool2d and not mod.return_indices:
        return _adaptive_pool(node, "max", x)
    if kind in (nn.ZeroPad2d, nn.ConstantPad2d):
        return _pad(x, mod.padding, "constant", getattr(mod, "value", 0.0))
    if kind is nn.Flatten:
        return ops.flatten, [x], ops.FlattenSpec(mod.start_dim, mod.end_dim)
    if kind is nn.ChannelShuffle:
        return ops.channel_shuffle, [x], ops.ChannelShuffleSpec(mod.groups)
    if isinstance(mod, _DROPOUT_MODULES):
        return ops.identity, [x], ops.IdentitySpec(type(mod).__name__)
    raise _NotCanonical(f"no lowering for module {type(mod).__name__}")


# ---------------------------------------------------------------------------------------------
# Elementwise arithmetic: same-shape tensors, broadcast gates, and per-channel constants.

def _as_constant(gm: fx.GraphModule, v) -> torch.Tensor | None:
    """A Python number or a module constant as a float tensor; None for a computed tensor."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return torch.tensor(float(v))
    if isinstance(v, fx.Node) and v.op == "get_attr":
        t = operator.attrgetter(v.target)(gm)
        return t.detach().float() if isinstance(t, torch.Tensor) else None
    return None


def _per_channel_vector(const: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``const`` as a [C] vector if, broadcast against ``shape``, it varies only along the
    channel dim (or not at all); else None."""
    rank = len(shape)
    if const.dim() > rank:
        return None
    full = const.reshape((1,) * (rank - const.dim()) + tuple(const.shape))
    cdim = ops.channel_dim(rank) % rank
    if any(s != 1 for d, s in enumerate(full.shape) if d != cdim):
        return None
    c = shape[cdim]
    if full.shape[cdim] not in (1, c):
        return None
    return full.reshape(-1).expand(c).clone()


def _arith(gm: fx.GraphModule, node: fx.Node, kind: str, a, b, alpha=1) -> Canonical:
    out_shape = _shape(node)
    if out_shape is None or alpha != 1:
        raise _NotCanonical(f"{kind} with alpha={alpha}")
    ca, cb = _as_constant(gm, a), _as_constant(gm, b)
    if ca is None and cb is None:
        return _tensor_arith(kind, a, b, out_shape)
    if ca is not None and cb is not None:
        raise _NotCanonical("arithmetic on constants only")
    x, const, x_first = (a, cb, True) if cb is not None else (b, ca, False)
    if _shape(x) != out_shape:
        raise _NotCanonical("a constant that broadcasts the tensor to a larger shape")
    vec = _per_channel_vector(const, out_shape)
    if vec is None:
        other = b if x_first else a
        if kind in ("add", "mul") and isinstance(other, fx.Node):
            # A module constant that varies along other dims (a position embedding): a broadcast input.
            return (ops.add, [x, other], ops.AddSpec()) if kind == "add" else (ops.mul, [x, other], ops.MulSpec())
        raise _NotCanonical(f"{kind} by a constant of shape {tuple(const.shape)}")
    ones, zeros = torch.ones_like(vec), torch.zeros_like(vec)
    if kind == "mul":
        scale, shift = vec, zeros
    elif kind == "add":
        scale, shift = ones, vec
    elif kind == "sub":
        scale, shift = (ones, -vec) if x_first else (-ones, vec)
    else:  # div
        if not x_first:
            raise _NotCanonical("a constant divided by a tensor")
        scale, shift = 1.0 / vec, zeros
    return ops.affine, [x], ops.AffineSpec(scale, shift)


def _broadcasts_to(small: tuple[int, ...], big: tuple[int, ...]) -> bool:
    if len(small) > len(big):
        return False
    small = (1,) * (len(big) - len(small)) + small
    return all(s in (1, b) for s, b in zip(small, big))


def _tensor_arith(kind: str, a, b, out_shape) -> Canonical:
    sa, sb = _shape(a), _shape(b)
    if sa is None or sb is None or kind not in ("add", "mul"):
        raise _NotCanonical(f"{kind} of two computed tensors" if kind in ("sub", "div")
                            else "arithmetic on non-tensors")
    if a.meta["dtype"] != b.meta["dtype"]:
        raise _NotCanonical("arithmetic across dtypes")
    # The full-size operand first: the kernels broadcast the second (an SE gate (N, C, 1, 1)).
    if sa != out_shape:
        a, b, sa, sb = b, a, sb, sa
    if sa != out_shape or not _broadcasts_to(sb, sa):
        raise _NotCanonical("arithmetic where neither operand has the result's shape")
    return (ops.add, [a, b], ops.AddSpec()) if kind == "add" else (ops.mul, [a, b], ops.MulSpec())


# ---------------------------------------------------------------------------------------------
# Views: channel slices (chunk / split / narrow / x[:, a:b]), permutes, reshapes.

def _kwargs(node: fx.Node) -> dict:
    norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if norm is None:
        raise _NotCanonical(f"could not read the arguments of {getattr(node.target, '__name__', node.target)}")
    return dict(norm.kwargs)


def _arg(node: fx.Node, index: int, name: str, default=None):
    """Positional-or-keyword argument of a call, without schema lookups (torch builtins with
    overloads, like torch.cat, do not normalize on every torch version)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_SPLITS = {("call_method", "chunk"): "chunk", ("call_function", torch.chunk): "chunk",
           ("call_method", "split"): "split", ("call_function", torch.split): "split",
           ("call_method", "tensor_split"): None, ("call_method", "unbind"): None}


def _split_slice(node: fx.Node) -> Canonical:
    """``getitem(chunk(x, k, dim=1), i)`` / ``getitem(split(x, s, dim=1), i)``: a channel slice."""
    parent, index = node.args
    kind = _SPLITS.get((parent.op, parent.target))
    if kind is None or not isinstance(index, int):
        raise _NotCanonical("an item of a tuple this capture does not know")
    x = parent.args[0]
    shape = _shape(x)
    how = _arg(parent, 1, "chunks" if kind == "chunk" else "split_size_or_sections")
    if kind == "split" and parent.op == "call_method" and how is None:
        how = parent.kwargs.get("split_size")
    dim = _arg(parent, 2, "dim", 0)
    if shape is None or not isinstance(dim, int) or _dim(dim, len(shape)) != 1 or how is None:
        raise _NotCanonical(f"{kind} along dim {dim} (only the channel dim 1 becomes a view)")
    parts = torch.arange(shape[1])
    pieces = parts.chunk(how) if kind == "chunk" else parts.split(how)
    piece = pieces[index]
    return ops.channel_slice, [x], ops.SliceSpec(int(piece[0]), len(piece), 1)


def _getitem(node: fx.Node) -> Canonical:
    src, index = node.args
    if not isinstance(src, fx.Node):
        raise _NotCanonical("indexing a non-tensor")
    if (src.op, src.target) in _SPLITS:
        return _split_slice(node)
    shape = _shape(src)
    if shape is None or not isinstance(index, tuple) or len(index) < 2:
        raise _NotCanonical("indexing other than x[:, start:stop:step]")
    first, chan, *rest = index
    full = slice(None, None, None)
    if first != full or not isinstance(chan, slice) or any(r not in (full, Ellipsis) for r in rest):
        raise _NotCanonical("indexing other than x[:, start:stop:step]")
    start, stop, step = chan.indices(shape[1])
    length = len(range(start, stop, step))
    if step < 1 or length < 1:
        raise _NotCanonical("an empty or reversed channel slice")
    return ops.channel_slice, [src], ops.SliceSpec(start, length, step)


def _dims_arg(args) -> tuple[int, ...]:
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = args[0]
    if not all(isinstance(d, int) for d in args):
        raise _NotCanonical("dims computed at run time")
    return tuple(args)


def _permute(x, dims) -> Canonical:
    shape = _shape(x)
    if shape is None:
        raise _NotCanonical("permute of a non-tensor")
    return ops.permute, [x], ops.PermuteSpec(tuple(_dim(d, len(shape)) for d in dims))


def _transpose(x, d0, d1) -> Canonical:
    shape = _shape(x)
    if shape is None or not isinstance(d0, int) or not isinstance(d1, int):
        raise _NotCanonical("transpose of a non-tensor or by computed dims")
    dims = list(range(len(shape)))
    d0, d1 = _dim(d0, len(shape)), _dim(d1, len(shape))
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return ops.permute, [x], ops.PermuteSpec(tuple(dims))


def _reshape(node: fx.Node, x) -> Canonical:
    out_shape = _shape(node)
    if out_shape is None or _shape(x) is None:
        raise _NotCanonical("reshape of a non-tensor")
    return ops.reshape, [x], ops.ReshapeSpec(out_shape, literal_leading=_literal_leading(node))


def _literal_leading(node: fx.Node) -> bool:
    """Whether a view/reshape names its leading size as a literal int in the model's code; the
    other forms ((un)squeeze, view_as, reshape_as) take their sizes from their operands."""
    if node.op == "call_method" and node.target in ("view", "reshape"):
        target = node.args[1:] or (node.kwargs.get("size", node.kwargs.get("shape")),)
    elif node.op == "call_function" and node.target is torch.reshape:
        target = node.args[1:] or (node.kwargs.get("shape"),)
    else:
        return False
    if len(target) == 1 and isinstance(target[0], (tuple, list)):
        target = tuple(target[0])
    return bool(target) and isinstance(target[0], int) and target[0] != -1


# ---------------------------------------------------------------------------------------------
# Dispatch on functions and methods.

def _cat(node: fx.Node) -> Canonical:
    tensors, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
    rank = len(node.meta.get("shape", ()))
    if rank not in (2, 4) or not isinstance(dim, int) or dim % rank != 1 \
            or not all(isinstance(n, fx.Node) for n in tensors):
        raise _NotCanonical(f"cat along dim {dim} of a rank-{rank} tensor (only channel cats are lowered)")
    return ops.cat, list(tensors), ops.CatSpec(1)


def _normalize_function(gm: fx.GraphModule, node: fx.Node) -> Canonical:
    t = node.target
    if t is operator.getitem:
        return _getitem(node)
    if t in _ARITH_FUNCTIONS:
        if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
            raise _NotCanonical(f"{_ARITH_FUNCTIONS[t]} with extra arguments")
        return _arith(gm, node, _ARITH_FUNCTIONS[t], *node.args, **node.kwargs)
    if t in _CAT_FUNCTIONS:
        return _cat(node)
    if t is torch.flatten:
        return ops.flatten, [_arg(node, 0, "input")], ops.FlattenSpec(_arg(node, 1, "start_dim", 0),
                                                                       _arg(node, 2, "end_dim", -1))
    if t in (torch.permute,):
        return _permute(node.args[0], _dims_arg(node.args[1:] or (node.kwargs["dims"],)))
    if t in (torch.transpose, torch.swapaxes):
        return _transpose(*node.args)
    if t in (torch.reshape,):
        return _reshape(node, node.args[0])
    if t in (torch.mean, torch.amax):
        return _spatial_reduction(node, "avg" if t is torch.mean else "max", node.args[0],
                                  _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False), node.kwargs.get("dtype"))
    if t is torch.narrow:
        return _narrow(node.args[0], *node.args[1:])
    if getattr(t, "__name__", "") == "stochastic_depth" and getattr(t, "__module__", "").startswith("torchvision"):
        if node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True):
            raise _NotCanonical("stochastic depth in training mode")
        return ops.identity, [node.args[0]], ops.IdentitySpec("stochastic_depth")
    if t in _ACT_FUNCTIONS:
        return ops.activation, [node.args[0]], ops.ActivationSpec(_ACT_FUNCTIONS[t](*node.args, **node.kwargs))
    if t in (F.conv2d, torch.conv2d):
        # Read positionally: the schema has two overloads (padding as ints or as a string).
        return _conv(_arg(node, 0, "input"), _attr(gm, _arg(node, 1, "weight")), _attr(gm, _arg(node, 2, "bias")),
                     _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0), _arg(node, 5, "dilation", 1),
                     _arg(node, 6, "groups", 1))
    if t not in _KWARG_FUNCTIONS:
        raise _NotCanonical(f"no lowering for {getattr(t, '__module__', '')}.{getattr(t, '__name__', t)}")
    kw = _kwargs(node)
    x = kw.get("input")
    if t in _DROPOUT_FUNCTIONS and not kw.get("training", True):
        return ops.identity, [x], ops.IdentitySpec(t.__name__)
    if t is F.prelu:
        return _prelu(x, _attr(gm, kw["weight"]))
    if t is F.linear:
        return ops.linear, [x], ops.LinearSpec(_attr(gm, kw["weight"]), _attr(gm, kw.get("bias")))
    if t is F.batch_norm and not kw.get("training", False):
        _require_channel_dim_1(x, "batch_norm")
        return _batch_norm(x, _attr(gm, kw["running_mean"]), _attr(gm, kw["running_var"]),
                           _attr(gm, kw.get("weight")), _attr(gm, kw.get("bias")), kw.get("eps", 1e-5))
    if t is F.layer_norm:
        return _layer_norm(node, x, kw["normalized_shape"], _attr(gm, kw.get("weight")), _attr(gm, kw.get("bias")),
                           kw.get("eps", 1e-5))
    if t is F.max_pool2d and not kw.get("return_indices", False):
        return _pool("max", x, kw["kernel_size"], kw.get("stride"), kw.get("padding", 0),
                     kw.get("dilation", 1), kw.get("ceil_mode", False))
    if t is F.avg_pool2d:
        return _pool("avg", x, kw["kernel_size"], kw.get("stride"), kw.get("padding", 0), 1,
                     kw.get("ceil_mode", False), kw.get("count_include_pad", True), kw.get("divisor_override"))
    if t is F.adaptive_avg_pool2d:
        return _adaptive_pool(node, "avg", x)
    if t is F.adaptive_max_pool2d and not kw.get("return_indices", False):
        return _adaptive_pool(node, "max", x)
    if t is F.pad:
        return _pad(x, kw["pad"], kw.get("mode", "constant"), kw.get("value"))
    if t in (getattr(F, "channel_shuffle", None), torch.channel_shuffle):
        return ops.channel_shuffle, [x], ops.ChannelShuffleSpec(kw["groups"])
    raise _NotCanonical(f"no lowering for {getattr(t, '__module__', '')}.{getattr(t, '__name__', t)}")


# Functions whose arguments are read through their schema (keywords or positions alike).
_KWARG_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.prelu, F.linear,
                    F.batch_norm, F.layer_norm, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                    F.adaptive_max_pool2d, F.pad, torch.channel_shuffle} | (
    {F.channel_shuffle} if hasattr(F, "channel_shuffle") else set())


def _narrow(x, dim, start, length) -> Canonical:
    shape = _shape(x)
    if shape is None or not all(isinstance(v, int) for v in (dim, start, length)) or _dim(dim, len(shape)) != 1:
        raise _NotCanonical("narrow other than along the channel dim by constants")
    return ops.channel_slice, [x], ops.SliceSpec(_dim(start, shape[1]), length, 1)


_VIEW_METHODS = ("view", "reshape", "unsqueeze", "squeeze", "view_as", "reshape_as")


def _normalize_method(gm: fx.GraphModule, node: fx.Node) -> Canonical:
    name, args = node.target, node.args
    x = args[0] if args else None
    if name in _ACT_METHODS:
        return ops.activation, [x], ops.ActivationSpec(_ACT_METHODS[name](*args, **node.kwargs))
    if name in _ARITH_METHODS:
        if len(args) != 2 or set(node.kwargs) - {"alpha"}:
            raise _NotCanonical(f"Tensor.{name} with extra arguments")
        return _arith(gm, node, _ARITH_METHODS[name], *args, **node.kwargs)
    if name == "flatten":
        start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
        if not isinstance(start, int) or not isinstance(end, int):
            raise _NotCanonical("flatten by computed dims")
        return ops.flatten, [x], ops.FlattenSpec(start, end)
    if name == "permute":
        return _permute(x, _dims_arg(args[1:] or (node.kwargs["dims"],)))
    if name in ("transpose", "swapaxes"):
        return _transpose(*args)
    if name in _VIEW_METHODS:
        return _reshape(node, x)
    if name == "contiguous":
        return ops.identity, [x], ops.IdentitySpec("contiguous")
    if name in ("mean", "amax"):
        return _spatial_reduction(node, "avg" if name == "mean" else "max", x,
                                  _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False), node.kwargs.get("dtype"))
    if name == "narrow":
        return _narrow(*args)
    if name == "chunk" or name == "split":
        raise _NotCanonical(f"Tensor.{name} whose parts are not only indexed")
    raise _NotCanonical(f"no lowering for Tensor.{name}")


def _normalize(gm: fx.GraphModule, node: fx.Node) -> Canonical:
    """The node's canonical form; raises _NotCanonical (with the reason) when there is none."""
    if node.op == "call_module":
        canon = _normalize_module(gm, node)
    elif node.op == "call_function":
        canon = _normalize_function(gm, node)
    elif node.op == "call_method":
        canon = _normalize_method(gm, node)
    else:
        raise _NotCanonical(node.op)
    fn, inputs, _ = canon
    if not all(isinstance(i, fx.Node) and "shape" in i.meta for i in inputs):
        raise _NotCanonical("inputs that are not tensors")
    if "shape" not in node.meta or not node.meta["dtype"].is_floating_point:
        raise _NotCanonical("a result that is not one floating-point tensor")
    return canon


Expansion = list[tuple[Callable, list, Any, tuple[int, ...]]]  # (op, inputs, spec, shape); int input: an earlier step


def _expand_attention(gm: fx.GraphModule, node: fx.Node) -> Expansion | None:
    """``nn.MultiheadAttention(x, x, x, need_weights=False)`` (batch first, no masks) as three
    canonical ops: the fused q/k/v projection (a GEMM), the attention core (a library call to
    ``F.scaled_dot_product_attention``) and the output projection (a GEMM, which can take the
    residual add in its epilogue). Its result is item 0 of the module's (output, None) tuple."""
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    if type(mod) is not nn.MultiheadAttention:
        return None
    x = node.args[0] if node.args else None
    shape = _shape(x)
    usable = (len(node.args) == 3 and node.args[1] is x and node.args[2] is x and shape is not None
              and len(shape) == 3 and mod.batch_first and mod._qkv_same_embed_dim and mod.bias_k is None
              and not mod.add_zero_attn and node.kwargs == {"need_weights": False}
              and all(u.op == "call_function" and u.target is operator.getitem
                      and (u.args[1] == 0 or not u.users) for u in node.users))
    if not usable:
        node.meta["fallback_reason"] = ("MultiheadAttention other than batch-first self-attention without "
                                        "masks or returned weights")
        return None
    n, seq, d = shape
    in_bias = None if mod.in_proj_bias is None else mod.in_proj_bias.detach()
    out_bias = None if mod.out_proj.bias is None else mod.out_proj.bias.detach()
    return [(ops.linear, [x], ops.LinearSpec(mod.in_proj_weight.detach(), in_bias), (n, seq, 3 * d)),
            (ops.attention, [0], ops.AttentionSpec(mod.num_heads), (n, seq, d)),
            (ops.linear, [1], ops.LinearSpec(mod.out_proj.weight.detach(), out_bias), (n, seq, d))]


def _try_normalize(gm: fx.GraphModule, node: fx.Node) -> Canonical | None:
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    try:
        return _normalize(gm, node)
    except _NotCanonical as exc:
        node.meta["fallback_reason"] = str(exc)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        node.meta["fallback_reason"] = f"unsupported arguments ({type(exc).__name__}: {exc})"
    return None


# ---------------------------------------------------------------------------------------------

_IN_PLACE_FUNCTIONS = {torch.relu_, F.relu_, operator.iadd, operator.imul, operator.isub, operator.itruediv}


def _mutates_first_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An in-place op (``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``x.add_(y)``,
    ``x += y``): eager code that reads its input afterwards sees the result."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_function":
        return node.target in _IN_PLACE_FUNCTIONS or node.kwargs.get("inplace") is True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    return False


def _holds_tensor(meta) -> bool:
    if isinstance(meta, TensorMetadata):
        return True
    if isinstance(meta, (tuple, list)):
        return any(_holds_tensor(m) for m in meta)
    if isinstance(meta, dict):
        return any(_holds_tensor(m) for m in meta.values())
    return False


def _record_tensor_meta(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        if isinstance(tm, TensorMetadata):
            node.meta["shape"] = tuple(tm.shape)
            node.meta["dtype"] = tm.dtype
        node.meta["tensor_valued"] = _holds_tensor(tm)


def as_input_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    """Accept a tensor or a tuple/list of tensors; anything else is a clear error."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs or \
            not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a tensor or a non-empty tuple of tensors, got "
                        f"{type(example_inputs).__name__}")
    return tuple(inputs)


def trace(module: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(module)
    except Exception as exc:  # torch.fx raises many types (TraceError, TypeError, ...)
        raise CompileError(
            f"torch.fx could not trace {type(module).__name__}: {type(exc).__name__}: {exc}. "
            "torch_gie needs a model without data-dependent Python control flow (an `if` or loop "
            "on tensor values); move such logic out of forward() or make it depend on constants."
        ) from exc


@torch.no_grad()
def capture(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Trace ``module`` (already in eval mode), record shapes, and normalize to canonical ops."""
    gm = trace(module)
    try:
        ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        oom = out_of_memory_in(exc)
        if oom is not None:  # the caller's build_step names the step and the bytes
            raise oom from None
        raise CompileError(f"{type(module).__name__} failed on the example inputs "
                           f"({', '.join(str(tuple(t.shape)) for t in example_inputs)}): "
                           f"{type(exc).__name__}: {exc}") from exc
    _record_tensor_meta(gm)

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    expanded: set[fx.Node] = set()  # modules whose tuple result's item 0 is env[node]
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in expanded:
            env[node] = env[node.args[0]] if node.args[1] == 0 else None
            continue
        steps = _expand_attention(gm, node)
        if steps is not None:
            created: list[fx.Node] = []
            for k, (fn, inputs, spec, shape) in enumerate(steps):
                args = tuple(created[i] if isinstance(i, int) else env[i] for i in inputs)
                new = graph.create_node("call_function", fn, args, {}, name=f"{node.name}_{fn.__name__}{k}")
                new.meta.update(spec=spec, shape=shape, dtype=node.args[0].meta["dtype"], tensor_valued=True,
                                source=node.name)
                created.append(new)
            env[node] = created[-1]
            expanded.add(node)
            continue
        canon = _try_normalize(gm, node)
        if _mutates_first_input(gm, node):
            # Later readers of the mutated tensor must see the result (functionalize the op).
            pending_alias = node.args[0]
        else:
            pending_alias = None
        if canon is None:
            new = graph.node_copy(node, lambda n: env[n])
            if "fallback_reason" in node.meta:
                new.meta["fallback_reason"] = node.meta["fallback_reason"]
        else:
            fn, inputs, spec = canon
            new = graph.create_node("call_function", fn, tuple(env[i] for i in inputs), {}, name=node.name)
            new.meta["spec"] = spec
        for key in ("shape", "dtype", "tensor_valued"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        new.meta["source"] = node.name
        env[node] = new
        if isinstance(pending_alias, fx.Node) and pending_alias in env:
            env[pending_alias] = new
    out = fx.GraphModule(gm, graph)
    out.graph.eliminate_dead_code()
    out.recompile()
    log.debug("captured %s: %d nodes", type(module).__name__, len(graph.nodes))
    return out
