"""Fold an eval-mode BatchNorm (a per-channel affine) into the conv or linear before it:
``conv(x, w, b) -> bn  =>  conv(x, w * s, b * s + t)`` with ``s = gamma / sqrt(var + eps)``,
``t = beta - mean * s``. New weight tensors are made; the user's are never modified."""
from torch import fx

from .. import ops
from ..graph import is_canonical, spec
from .base import PassContext, PassResult, replace_node, sole_user


def can_fold_into(producer: fx.Node, affine_node: fx.Node) -> bool:
    """The affine's input is a conv/linear whose only user is the affine and that applies
    nothing after its bias yet (an activation or residual would not commute with the scale)."""
    if not (is_canonical(producer, ops.conv2d) or is_canonical(producer, ops.linear)):
        return False
    if sole_user(producer) is not affine_node or not spec(producer).epilogue.is_empty:
        return False
    if getattr(spec(producer), "out_splits", None) is not None:
        return False
    # The affine's channels must be the producer's output channels: dim 1 of a conv's 4D
    # output, the last dim of a linear's (N, F) or (N, L, F) output.
    if is_canonical(producer, ops.linear) and len(producer.meta["shape"]) not in (2, 3):
        return False
    return spec(affine_node).activation is None


def fold_batchnorm(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult()
    for node in list(gm.graph.nodes):
        if not is_canonical(node, ops.affine):
            continue
        producer = node.args[0]
        if not can_fold_into(producer, node):
            continue
        s, t = spec(node).scale, spec(node).shift
        p = spec(producer)
        w = p.weight.float() * s.view(-1, *([1] * (p.weight.dim() - 1)))
        b = t if p.bias is None else p.bias.float() * s + t
        producer.meta["spec"] = ops.replace(p, weight=w.to(p.weight.dtype), bias=b)
        replace_node(node, producer)
        result.count("folded")
        result.fusion("vertical", [producer, node], producer.name, what="batchnorm")
    return result
