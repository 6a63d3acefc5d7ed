"""Capture: trace an ``nn.Module`` with torch.fx, propagate shapes on the example inputs, and
normalize every supported module, function and method into one canonical op (``torch_gie.ops``).

Whatever is not recognised is kept as the original fx node (a *fallback*); it runs the user's
own PyTorch code, so any traceable model compiles, and the report lists what fell back.
"""
from __future__ import annotations

import logging
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
from .errors import CompileError

log = logging.getLogger(__name__)

Canonical = tuple[Callable, list, Any]  # (op function, input nodes, spec)

_ACTIVATION_MODULES = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid",
}
_ACTIVATION_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu6",
    F.silu: "silu", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid"}
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The constant tensor behind a get_attr node (None for None; raises for anything else)."""
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return operator.attrgetter(node.target)(gm).detach()
    raise _NotCanonical


class _NotCanonical(Exception):
    """Raised inside a normalizer: this node stays a fallback."""


def _conv_padding(padding, weight: torch.Tensor, dilation, stride) -> tuple[int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same" and tuple(stride) == (1, 1):
            pads = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            if any(p % 2 for p in pads):  # asymmetric padding: not expressible as one pair
                raise _NotCanonical
            return (pads[0] // 2, pads[1] // 2)
        raise _NotCanonical
    return _pair(padding)


def _conv(gm, x, weight, bias, stride, padding, dilation, groups) -> Canonical:
    if weight.dim() != 4:
        raise _NotCanonical
    stride, dilation = _pair(stride), _pair(dilation)
    spec = ops.ConvSpec(weight, bias, stride, _conv_padding(padding, weight, dilation, stride),
                        dilation, groups)
    return ops.conv2d, [x], spec


def _batch_norm(x, mean, var, weight, bias, eps) -> Canonical:
    if mean is None or var is None:
        raise _NotCanonical
    scale = torch.rsqrt(var.float() + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean.float() * scale
    if bias is not None:
        shift = shift + bias.float()
    return ops.affine, [x], ops.AffineSpec(scale, shift)


def _pool(kind, x, kernel_size, stride, padding, dilation=1, ceil_mode=False,
          count_include_pad=True, divisor_override=None) -> Canonical:
    kernel_size = _pair(kernel_size)
    stride = _pair(stride) if stride not in (None, []) else kernel_size
    spec = ops.PoolSpec(kind, kernel_size, stride, _pair(padding), _pair(dilation), bool(ceil_mode),
                        bool(count_include_pad), divisor_override)
    return ops.pool2d, [x], spec


def _normalize_module(gm: fx.GraphModule, node: fx.Node) -> Canonical:
    mod = gm.get_submodule(node.target)
    x = node.args[0] if node.args else None
    if len(node.args) != 1 or node.kwargs:
        raise _NotCanonical
    if type(mod) is nn.Conv2d and mod.padding_mode == "zeros":
        return _conv(gm, x, mod.weight.detach(), None if mod.bias is None else mod.bias.detach(),
                     mod.stride, mod.padding, mod.dilation, mod.groups)
    if type(mod) is nn.Linear:
        return ops.linear, [x], ops.LinearSpec(mod.weight.detach(),
                                               None if mod.bias is None else mod.bias.detach())
    if type(mod) in (nn.BatchNorm2d, nn.BatchNorm1d) and mod.track_running_stats:
        return _batch_norm(x, mod.running_mean, mod.running_var,
                           None if mod.weight is None else mod.weight.detach(),
                           None if mod.bias is None else mod.bias.detach(), mod.eps)
    if type(mod) in _ACTIVATION_MODULES:
        return ops.activation, [x], ops.ActivationSpec(_ACTIVATION_MODULES[type(mod)])
    if type(mod) is nn.GELU:
        return ops.activation, [x], ops.ActivationSpec("gelu" if mod.approximate == "none" else "gelu_tanh")
    if type(mod) is nn.MaxPool2d and not mod.return_indices:
        return _pool("max", x, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
    if type(mod) is nn.AvgPool2d:
        return _pool("avg", x, mod.kernel_size, mod.stride, mod.padding, 1, mod.ceil_mode,
                     mod.count_include_pad, mod.divisor_override)
    if type(mod) is nn.AdaptiveAvgPool2d:
        return _adaptive_pool(node, x, mod.output_size)
    if type(mod) is nn.Flatten:
        return ops.flatten, [x], ops.FlattenSpec(mod.start_dim, mod.end_dim)
    if isinstance(mod, _DROPOUT_MODULES):
        return ops.identity, [x], ops.IdentitySpec(type(mod).__name__)
    raise _NotCanonical


def _adaptive_pool(node: fx.Node, x, output_size) -> Canonical:
    out_shape = node.meta.get("shape")
    if out_shape is None or len(out_shape) != 4:
        raise _NotCanonical
    return ops.adaptive_avg_pool2d, [x], ops.AdaptiveAvgPoolSpec(tuple(out_shape[2:]))


def _kwargs(node: fx.Node) -> dict:
    norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if norm is None:
        raise _NotCanonical
    return dict(norm.kwargs)


def _same_shape_tensors(a, b) -> bool:
    return (isinstance(a, fx.Node) and isinstance(b, fx.Node) and "shape" in a.meta and "shape" in b.meta
            and a.meta["shape"] == b.meta["shape"] and a.meta["dtype"] == b.meta["dtype"])


def _arg(node: fx.Node, index: int, name: str, default=None):
    """Positional-or-keyword argument of a call, without schema lookups (torch builtins with
    overloads, like torch.cat, do not normalize on every torch version)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _normalize_function(gm: fx.GraphModule, node: fx.Node) -> Canonical:
    t = node.target
    if t in _ADD_FUNCTIONS:
        if len(node.args) != 2 or node.kwargs or not _same_shape_tensors(*node.args):
            raise _NotCanonical
        return ops.add, list(node.args), ops.AddSpec()
    if t in _CAT_FUNCTIONS:
        tensors, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
        rank = len(node.meta.get("shape", ()))
        if rank not in (2, 4) or not isinstance(dim, int) or dim % rank != 1 \
                or not all(isinstance(n, fx.Node) for n in tensors):
            raise _NotCanonical
        return ops.cat, list(tensors), ops.CatSpec(1)
    if t is torch.flatten:
        return ops.flatten, [_arg(node, 0, "input")], ops.FlattenSpec(_arg(node, 1, "start_dim", 0),
                                                                       _arg(node, 2, "end_dim", -1))
    if t in _ACTIVATION_FUNCTIONS and len(node.args) >= 1 and not set(node.kwargs) - {"inplace"}:
        return ops.activation, [node.args[0]], ops.ActivationSpec(_ACTIVATION_FUNCTIONS[t])
    kw = _kwargs(node)
    x = kw.get("input")
    if t in _ACTIVATION_FUNCTIONS:
        return ops.activation, [x], ops.ActivationSpec(_ACTIVATION_FUNCTIONS[t])
    if t is F.gelu:
        return ops.activation, [x], ops.ActivationSpec("gelu" if kw.get("approximate", "none") == "none"
                                                        else "gelu_tanh")
    if t is F.hardtanh and kw.get("min_val", -1.0) == 0.0 and kw.get("max_val", 1.0) == 6.0:
        return ops.activation, [x], ops.ActivationSpec("relu6")
    if getattr(t, "__name__", "") == "stochastic_depth" and getattr(t, "__module__", "").startswith("torchvision"):
        if node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True):
            raise _NotCanonical
        return ops.identity, [node.args[0]], ops.IdentitySpec("stochastic_depth")
    if t in _DROPOUT_FUNCTIONS and not kw.get("training", True):
        return ops.identity, [x], ops.IdentitySpec(t.__name__)
    if t is F.conv2d:
        return _conv(gm, x, _attr(gm, kw["weight"]), _attr(gm, kw.get("bias")), kw.get("stride", 1),
                     kw.get("padding", 0), kw.get("dilation", 1), kw.get("groups", 1))
    if t is F.linear:
        return ops.linear, [x], ops.LinearSpec(_attr(gm, kw["weight"]), _attr(gm, kw.get("bias")))
    if t is F.batch_norm and not kw.get("training", False):
        return _batch_norm(x, _attr(gm, kw["running_mean"]), _attr(gm, kw["running_var"]),
                           _attr(gm, kw.get("weight")), _attr(gm, kw.get("bias")), kw.get("eps", 1e-5))
    if t is F.max_pool2d and not kw.get("return_indices", False):
        return _pool("max", x, kw["kernel_size"], kw.get("stride"), kw.get("padding", 0),
                     kw.get("dilation", 1), kw.get("ceil_mode", False))
    if t is F.avg_pool2d:
        return _pool("avg", x, kw["kernel_size"], kw.get("stride"), kw.get("padding", 0), 1,
                     kw.get("ceil_mode", False), kw.get("count_include_pad", True), kw.get("divisor_override"))
    if t is F.adaptive_avg_pool2d:
        return _adaptive_pool(node, x, kw["output_size"])
    raise _NotCanonical


def _normalize_method(node: fx.Node) -> Canonical:
    if node.target in _ACTIVATION_METHODS and len(node.args) == 1 and not node.kwargs:
        return ops.activation, [node.args[0]], ops.ActivationSpec(_ACTIVATION_METHODS[node.target])
    if node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs \
            and _same_shape_tensors(*node.args):
        return ops.add, list(node.args), ops.AddSpec()
    if node.target == "flatten" and all(isinstance(a, int) for a in node.args[1:]):
        return ops.flatten, [node.args[0]], ops.FlattenSpec(*node.args[1:], **node.kwargs)
    raise _NotCanonical


def _normalize(gm: fx.GraphModule, node: fx.Node) -> Canonical | None:
    try:
        if node.op == "call_module":
            canon = _normalize_module(gm, node)
        elif node.op == "call_function":
            canon = _normalize_function(gm, node)
        elif node.op == "call_method":
            canon = _normalize_method(node)
        else:
            return None
    except (_NotCanonical, KeyError, TypeError, ValueError, RuntimeError):
        return None
    fn, inputs, _ = canon
    tensor_ins = all(isinstance(i, fx.Node) and "shape" in i.meta for i in inputs)
    if not tensor_ins or "shape" not in node.meta or not node.meta["dtype"].is_floating_point:
        return None
    return canon


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
        raise CompileError(f"{type(module).__name__} failed on the example inputs "
                           f"({', '.join(str(tuple(t.shape)) for t in example_inputs)}): "
                           f"{type(exc).__name__}: {exc}") from exc
    _record_tensor_meta(gm)

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        canon = _normalize(gm, node)
        if canon is None:
            new = graph.node_copy(node, lambda n: env[n])
        else:
            fn, inputs, spec = canon
            new = graph.create_node("call_function", fn, tuple(env[i] for i in inputs), {}, name=node.name)
            new.meta["spec"] = spec
        for key in ("shape", "dtype", "tensor_valued"):
            if key in node.meta:
                new.meta[key] = node.meta[key]
        new.meta["source"] = node.name
        env[node] = new
    out = fx.GraphModule(gm, graph)
    out.graph.eliminate_dead_code()
    log.debug("captured %s: %d nodes", type(module).__name__, len(graph.nodes))
    return out
