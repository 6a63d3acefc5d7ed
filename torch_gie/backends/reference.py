"""The reference backend: every canonical op runs its PyTorch reference implementation
(``torch_gie.ops``) and copies the result into its planned view(s). Slow but obviously right:
it checks the plan (placements, concat slices, lifetimes) independently of the kernels.

int8 layers (``node.meta["quant"]``) run the exact integer arithmetic of the int8 kernels
(``torch_gie.quantize.arith``): the same weight codes, int32-exact accumulation over codes with
zero-point padding, the fp32 epilogue and the same rounding and saturation; the Triton kernels
are tested against it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx

from .. import ops
from ..graph import spec
from ..quantize import arith
from ..runtime.program import Converters
from ..runtime.steps import Kernel


def cast_spec(node: fx.Node, dtype: torch.dtype):
    """The node's spec with its constant tensors converted once to ``dtype``."""
    s = spec(node)
    fields = {k: v.to(dtype) for k, v in vars(s).items() if isinstance(v, torch.Tensor)}
    return ops.replace(s, **fields) if fields else s


def _on_device(s, device: torch.device):
    return ops.replace(s, **{k: v.to(device) for k, v in vars(s).items() if isinstance(v, torch.Tensor)})


def lower(node: fx.Node, dtype: torch.dtype, device: torch.device) -> Kernel:
    if node.meta.get("quant") is not None:
        return lower_int8(node, node.meta["quant"], device)
    s = _on_device(cast_spec(node, dtype), device)
    fn = node.target

    def run(inputs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
        result = fn(s, *inputs)
        for out, value in zip(outs, result if isinstance(result, tuple) else (result,)):
            out.copy_(value)

    return run


def _store(outs: Sequence[torch.Tensor], y: torch.Tensor, q: arith.LayerQuant, splits=None) -> None:
    parts = torch.split(y, list(splits), dim=1) if splits else (y,)
    for out, part in zip(outs, parts):
        out.copy_(arith.requantize(part, q.output) if q.output is not None else part.to(q.out_dtype))


def _residual(t: torch.Tensor, q: arith.LayerQuant) -> torch.Tensor:
    return arith.dequantize(t, q.residual) if q.residual is not None else t.to(torch.float32)


def gate_codes(x: torch.Tensor, gate: torch.Tensor, qp: arith.QParams) -> torch.Tensor:
    """A squeeze-excitation gate applied to codes at x's own scale, as the conv kernel's
    prologue does: clamp(rint((code - zp) * gate) + zp)."""
    g = gate.to(torch.float32).reshape(x.shape[0], x.shape[1], 1, 1)
    q = arith.round_half_even(((x.to(torch.float32) - qp.zero_point) * g).clamp(-512, 512)) + qp.zero_point
    return q.clamp(arith.QMIN, arith.QMAX).to(torch.int8)


def lower_int8(node: fx.Node, q: arith.LayerQuant, device: torch.device) -> Kernel:
    """The exact emulation of an int8 layer (conv, Linear, pool) reading codes of ``q.input``."""
    s = _on_device(spec(node), device)
    if node.target in (ops.conv2d, ops.linear):
        w_codes, w_scale = arith.quantize_weight(s.weight)
        combined, folded = arith.fold_zero_point(s.bias, w_codes, w_scale, q.input)
        slope = None if s.act_slope is None else s.act_slope.to(torch.float32)

        def run(inputs, outs):
            x = inputs[0]
            if node.target is ops.linear:
                y = arith.linear_int8(x, q.input, w_codes, combined, folded)
                residual = inputs[1] if s.epilogue.residual else None
            else:
                gate, residual = ops._conv_extra(s, inputs[1:])
                if gate is not None:
                    x = gate_codes(x, gate, q.input)
                y = arith.conv2d_int8(x, q.input, w_codes, combined, folded, s.stride, ops.padding4(s.padding),
                                      s.dilation, s.groups)
            y = ops._apply_epilogue(y, s.epilogue, None if residual is None else _residual(residual, q), slope)
            _store(outs, y, q, getattr(s, "out_splits", None))
        return run
    if node.target in (ops.pool2d, ops.adaptive_pool2d):
        fn = node.target

        def pool(inputs, outs):
            _store(outs, fn(s, arith.dequantize(inputs[0], q.input)), q)
        return pool
    raise NotImplementedError(f"no int8 reference for {node.target.__name__}")


def converters() -> Converters:
    """Quantize / dequantize between int8 parts of a graph and the rest, with arith's rounding."""
    def quantize(qp):
        return lambda x, out: out.copy_(arith.quantize(x.to(torch.float32), qp))

    def dequantize(qp, dtype):
        return lambda x, out: out.copy_(arith.dequantize(x, qp, dtype))
    return Converters(quantize, dequantize)
