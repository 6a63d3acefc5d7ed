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
from ..kernels.elementwise import Activation, Add, ChannelAffine, Dequantize, Mul, Quantize
from ..kernels.gemm import Linear
from ..kernels.layer_norm import LayerNorm
from ..kernels.pool2d import AdaptivePool2d, Pool2d
from ..kernels.squeeze_excitation import SqueezeExcitation
from ..plan import pads_input_channels
from ..quantize.arith import LayerQuant
from ..runtime.program import Converters
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
    dtype, quant = _quant(node, dtype)
    layer = cls(s.weight.to(device), _on(s.bias, device), stride=s.stride, padding=s.padding,
                dilation=s.dilation, groups=s.groups, activation=ep.activation,
                post_activation=ep.post_activation, act_slope=_on(s.act_slope, device), dtype=dtype,
                input_hw=(h, w), batch=n, quant=quant, residual=ep.residual, **_precision(dtype, options))
    # The compiler's channel-padded network input holds zeros in its padding lanes. Set only when
    # true: the attribute then joins the tuner's layer signature of the stem alone, and every
    # other layer keeps its timing-cache key.
    if node.args[0].op == "placeholder" and pads_input_channels(node.args[0]):
        layer.pad_lanes_finite = True
    gated, residual = s.input_gate, ep.residual

    def call(k, i, o):
        k(i[0], o, i[-1] if residual else None, **({"gate": i[1]} if gated else {}))
    return BoundKernel(layer, call, cls.__name__)


def _quant(node: fx.Node, dtype: torch.dtype) -> tuple[torch.dtype, LayerQuant | None]:
    """(kernel dtype, LayerQuant) of a layer: int8 with its quantization where the precision
    plan made it an int8 layer (``node.meta["quant"]``), else the float dtype."""
    quant = node.meta.get("quant")
    return (torch.int8, quant) if quant is not None else (dtype, None)


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _linear(node: fx.Node, dtype: torch.dtype, device: torch.device, options: dict) -> BoundKernel:
    s, ep = spec(node), spec(node).epilogue
    rows = math.prod(node.args[0].meta["shape"][:-1])  # 1 for a batch-1 classifier: GEMV
    if s.act_slope is not None and len(node.meta["shape"]) not in (2, 3):
        raise NotImplementedError("a PReLU on a Linear's output of rank > 3 (slopes along dim 1)")
    dtype, quant = _quant(node, dtype)
    layer = Linear(s.weight.to(device), _on(s.bias, device), activation=ep.activation,
                   post_activation=ep.post_activation, act_slope=_on(s.act_slope, device), dtype=dtype,
                   rows=rows, quant=quant, **_precision(dtype, options))
    if ep.residual:
        return BoundKernel(layer, lambda k, i, o: k(i[0], o[0], i[1]), "Linear")
    return BoundKernel(layer, lambda k, i, o: k(i[0], o[0]), "Linear")


def _elementwise_rank(node: fx.Node) -> None:
    if len(node.meta["shape"]) not in (2, 3, 4):
        raise NotImplementedError(f"elementwise kernels take rank 2 to 4, got shape {node.meta['shape']}")


def _affine(node, dtype, device, options) -> BoundKernel:
    s = spec(node)
    _elementwise_rank(node)
    layer = ChannelAffine(s.scale.to(device), s.shift.to(device), s.activation, dtype, _on(s.act_slope, device))
    return BoundKernel(layer, lambda k, i, o: k(i[0], o[0]), "ChannelAffine")


def _activation(node, dtype, device, options) -> BoundKernel:
    s = spec(node)
    if s.slope is not None:
        _elementwise_rank(node)
        layer = Activation(s.act, s.slope.to(device))
        return BoundKernel(layer, lambda k, i, o: k(i[0], o[0]), "Activation")
    return BoundKernel(Activation(s.act), lambda k, i, o: k(_rows(i[0]), _rows(o[0])), "Activation")


def _binary(cls):
    def lower_binary(node, dtype, device, options) -> BoundKernel:
        _elementwise_rank(node)
        return BoundKernel(cls(spec(node).activation), lambda k, i, o: k(i[0], i[1], o[0]), cls.__name__)
    return lower_binary


def _pool(node, dtype, device, options) -> BoundKernel:
    s = spec(node)
    dtype, quant = _quant(node, dtype)
    layer = Pool2d(s.kind, s.kernel_size, s.stride, s.padding, s.dilation, s.ceil_mode,
                   s.count_include_pad, s.divisor_override, pad_is_zeros=s.pad_is_zeros,
                   dtype=dtype, quant=quant)
    return BoundKernel(layer, lambda k, i, o: k(i[0], o[0]), f"Pool2d({s.kind})")


def _adaptive_pool(node, dtype, device, options) -> BoundKernel:
    s = spec(node)
    dtype, quant = _quant(node, dtype)
    layer = AdaptivePool2d(s.kind, s.output_size, dtype=dtype, quant=quant)
    return BoundKernel(layer, lambda k, i, o: k(i[0], o[0]), f"AdaptivePool2d({s.kind})")


def _layer_norm(node, dtype, device, options) -> BoundKernel:
    s = spec(node)
    layer = LayerNorm(_on(s.weight, device), _on(s.bias, device), s.eps, s.dim, dtype)
    return BoundKernel(layer, lambda k, i, o: k(i[0], o[0]), "LayerNorm")


def _squeeze_excitation(node, dtype, device, options) -> BoundKernel:
    s = spec(node)
    layer = SqueezeExcitation(s.w1.to(device), _on(s.b1, device), s.act1, s.w2.to(device), _on(s.b2, device),
                              s.act2, dtype)
    return BoundKernel(layer, lambda k, i, o: k(i[0], o[0]), "SqueezeExcitation")


class TorchWork:
    """Work a PyTorch kernel does inside the compiled graph on planned buffers: a library call
    (flash attention through ``F.scaled_dot_product_attention``) or a data movement (a pad or a
    channel shuffle no producer could write in place). Not a fallback: the op is canonical."""

    def __init__(self, launches: int, fn):
        self.launches, self._fn = launches, fn

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self._fn(x, out)


def _attention(node, dtype, device, options) -> BoundKernel:
    s = spec(node)

    def attend(qkv, out):
        o = torch.nn.functional.scaled_dot_product_attention(*ops.attention_heads(s, qkv))
        out.unflatten(-1, (s.heads, -1)).copy_(o.transpose(1, 2))
    return BoundKernel(TorchWork(2, attend), lambda k, i, o: k(i[0], o[0]),
                       "scaled_dot_product_attention (library call)")


def _pad(node, dtype, device, options) -> BoundKernel:
    s = spec(node)
    left, _, top, _ = s.pads
    h, w = node.args[0].meta["shape"][2:]

    def pad(x, out):
        out.fill_(s.value)
        out[:, :, top:top + h, left:left + w].copy_(x)
    return BoundKernel(TorchWork(2, pad), lambda k, i, o: k(i[0], o[0]), "pad (torch)")


def _channel_shuffle(node, dtype, device, options) -> BoundKernel:
    g = spec(node).groups
    c = node.meta["shape"][1]

    def shuffle(x, out):
        out.unflatten(1, (c // g, g)).copy_(x.unflatten(1, (g, c // g)).transpose(1, 2))
    return BoundKernel(TorchWork(1, shuffle), lambda k, i, o: k(i[0], o[0]), "channel_shuffle (torch)")


_LOWERINGS = {
    ops.conv2d: _conv, ops.linear: _linear, ops.affine: _affine, ops.activation: _activation,
    ops.add: _binary(Add), ops.mul: _binary(Mul), ops.pool2d: _pool, ops.adaptive_pool2d: _adaptive_pool,
    ops.layer_norm: _layer_norm, ops.squeeze_excitation: _squeeze_excitation, ops.pad: _pad,
    ops.channel_shuffle: _channel_shuffle, ops.attention: _attention,
}


def lower(node: fx.Node, dtype: torch.dtype, device: torch.device, options: dict) -> Kernel:
    if node.target not in _LOWERINGS:
        raise NotImplementedError(f"no Triton lowering for {node.target.__name__}")
    return _LOWERINGS[node.target](node, dtype, device, options)


def converters() -> Converters:
    """Quantize / dequantize kernels between int8 parts of a graph and the rest."""
    return Converters(lambda qp: Quantize(qp), lambda qp, dtype: Dequantize(qp, dtype))
