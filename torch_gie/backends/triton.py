"""The Triton backend: each canonical node becomes a bound kernel object from
``torch_gie.kernels`` (weights packed once, epilogue and geometry fixed), called every forward
with the node's inputs and its planned output views."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import fx

from .. import ops
from ..graph import spec
from ..kernels.conv2d import Conv2d
from ..kernels.depthwise_conv2d import DepthwiseConv2d
from ..kernels.elementwise import Activation, Add, ChannelAffine
from ..kernels.gemm import Linear
from ..kernels.pool2d import AdaptiveAvgPool2d, Pool2d
from ..runtime.steps import Kernel


def is_depthwise(s: ops.ConvSpec) -> bool:
    """One input channel per group (C_in == groups): a direct kernel beats a GEMM with K = KH*KW."""
    return s.groups > 1 and s.weight.shape[1] == 1 and s.out_splits is None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Elementwise kernels take (N, C) or (N, C, H, W); other ranks become (rows, last dim)."""
    return t if t.dim() in (2, 4) else t.reshape(-1, t.shape[-1])


class BoundKernel:
    """Adapts a kernel object to the program's ``kernel(inputs, outs)`` call and names it."""

    def __init__(self, layer, call, what: str):
        self.layer, self._call, self._what = layer, call, what

    def __call__(self, inputs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
        self._call(self.layer, inputs, outs)

    def describe(self) -> str:
        cfg = getattr(self.layer, "config", None)
        return self._what + (f" {cfg}" if cfg else "")


def _precision(dtype: torch.dtype, options: dict) -> dict:
    """fp32 dots default to "tf32x3": three tf32 products, fp32-level error at tensor-core speed."""
    return {"fp32_precision": options.get("fp32_precision", "tf32x3")} if dtype == torch.float32 else {}


def _conv(node: fx.Node, dtype: torch.dtype, device: torch.device, options: dict) -> BoundKernel:
    s, ep = spec(node), spec(node).epilogue
    cls = DepthwiseConv2d if is_depthwise(s) else Conv2d
    n, _, h, w = node.args[0].meta["shape"]  # the real size lets the kernel offer split-K tilings
    layer = cls(s.weight.to(device), None if s.bias is None else s.bias.to(device), stride=s.stride,
                padding=s.padding, dilation=s.dilation, groups=s.groups, activation=ep.activation,
                post_activation=ep.post_activation, dtype=dtype, input_hw=(h, w), batch=n,
                **_precision(dtype, options))
    if ep.residual:
        return BoundKernel(layer, lambda k, i, o: k(i[0], o, i[1]), cls.__name__)
    return BoundKernel(layer, lambda k, i, o: k(i[0], o), cls.__name__)


def _linear(node: fx.Node, dtype: torch.dtype, device: torch.device, options: dict) -> BoundKernel:
    s, ep = spec(node), spec(node).epilogue
    rows = math.prod(node.args[0].meta["shape"][:-1])  # 1 for a batch-1 classifier: GEMV
    layer = Linear(s.weight.to(device), None if s.bias is None else s.bias.to(device),
                   activation=ep.activation, post_activation=ep.post_activation, dtype=dtype,
                   rows=rows, **_precision(dtype, options))
    if ep.residual:
        return BoundKernel(layer, lambda k, i, o: k(i[0], o[0], i[1]), "Linear")
    return BoundKernel(layer, lambda k, i, o: k(i[0], o[0]), "Linear")


def _affine(node, dtype, device, options) -> BoundKernel:
    s = spec(node)
    layer = ChannelAffine(s.scale.to(device), s.shift.to(device), s.activation, dtype)
    return BoundKernel(layer, lambda k, i, o: k(i[0], o[0]), "ChannelAffine")


def _activation(node, dtype, device, options) -> BoundKernel:
    return BoundKernel(Activation(spec(node).name), lambda k, i, o: k(_rows(i[0]), _rows(o[0])), "Activation")


def _add(node, dtype, device, options) -> BoundKernel:
    return BoundKernel(Add(spec(node).activation),
                       lambda k, i, o: k(_rows(i[0]), _rows(i[1]), _rows(o[0])), "Add")


def _pool(node, dtype, device, options) -> BoundKernel:
    s = spec(node)
    layer = Pool2d(s.kind, s.kernel_size, s.stride, s.padding, s.dilation, s.ceil_mode,
                   s.count_include_pad, s.divisor_override)
    return BoundKernel(layer, lambda k, i, o: k(i[0], o[0]), f"Pool2d({s.kind})")


def _adaptive_pool(node, dtype, device, options) -> BoundKernel:
    layer = AdaptiveAvgPool2d(spec(node).output_size)
    return BoundKernel(layer, lambda k, i, o: k(i[0], o[0]), "AdaptiveAvgPool2d")


_LOWERINGS = {
    ops.conv2d: _conv, ops.linear: _linear, ops.affine: _affine, ops.activation: _activation,
    ops.add: _add, ops.pool2d: _pool, ops.adaptive_pool2d: _adaptive_pool,
}


def lower(node: fx.Node, dtype: torch.dtype, device: torch.device, options: dict) -> Kernel:
    if node.target not in _LOWERINGS:
        raise NotImplementedError(f"no Triton lowering for {node.target.__name__}")
    return _LOWERINGS[node.target](node, dtype, device, options)
