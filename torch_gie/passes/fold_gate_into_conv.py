"""Fold a per-(image, channel) gate multiply into the convs that read its result: the gate is
applied as each conv loads its input (a prologue on the implicit GEMM's A operand), so the
squeeze-and-excitation multiply costs no pass over the feature map:

``conv(x * gate)  =>  conv(x, gate=gate)``  with gate (N, C, 1, 1).

Every consumer must be a non-depthwise conv reading the product as its data input (the
depthwise kernel multiplies directly and has no such prologue); otherwise the multiply stays a
kernel of its own."""
from torch import fx

from .. import ops
from ..graph import is_canonical, spec
from .base import PassContext, PassResult


def is_channel_gate(mul: fx.Node) -> bool:
    """``x * g`` with x (N, C, H, W) and g (N, C, 1, 1), no activation after (an (N, C) operand
    would broadcast over H and W, not over channels)."""
    if not is_canonical(mul, ops.mul) or spec(mul).activation is not None:
        return False
    x, g = mul.args
    xs, gs = x.meta["shape"], g.meta["shape"]
    return len(xs) == 4 and tuple(gs) == (xs[0], xs[1], 1, 1) and g.op != "get_attr"


def can_take_gate(conv: fx.Node, mul: fx.Node) -> bool:
    if not is_canonical(conv, ops.conv2d) or conv.args[0] is not mul or mul in conv.args[1:]:
        return False
    s = spec(conv)
    depthwise = s.groups > 1 and s.weight.shape[1] == 1
    return not depthwise and not s.input_gate and s.out_splits is None


def fold_gate_into_conv(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    for mul in list(gm.graph.nodes):
        if not is_channel_gate(mul) or not mul.users or not all(can_take_gate(u, mul) for u in mul.users):
            continue
        x, gate = mul.args
        for conv in list(mul.users):
            conv.args = (x, gate, *conv.args[1:])
            conv.meta["spec"] = ops.replace(spec(conv), input_gate=True)
            result.fusion("prologue", [mul, conv], conv.name, what="input gate")
        gm.graph.erase_node(mul)
        result.count("folded")
    return result
